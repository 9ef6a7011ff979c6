"""The layer rules, checked on the source: every import of every module (function-level ones included).

pipeline -> lightningmodules, datamodules; lightningmodules -> lightningmodules/models; datamodules never
import lightningmodules; the model parts never import datamodules, pipeline or the LightningModules; medcore,
the shared leaf, imports none of them (nor torch). ``import pipeline.config`` (validation) imports no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("pipeline", "datamodules", "lightningmodules", "medcore")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, list[str]]]:
    """(line, names) per import statement in the file, in line order; names are absolute modules, and
    ``from a import b`` gives ``[a, a.b]`` (b may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, [module] + [f"{module}.{a.name}" for a in node.names if a.name != "*"]))
    return sorted(found)


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# (package whose files are checked, what it must not import, what is allowed inside a forbidden prefix)
RULES = {
    "datamodules": (("lightningmodules", "pipeline"), ()),
    "lightningmodules": (("pipeline", "datamodules"), ()),
    "lightningmodules.models": (
        ("datamodules", "pipeline", "lightningmodules"),
        ("lightningmodules.models",),
    ),
    "medcore": ((*PROJECT, "torch", "lightning", "transformers"), ("medcore",)),  # a leaf that config checks use
}


def crossings(package: str) -> list[str]:
    forbidden, allowed = RULES[package]
    folder = REPO.joinpath(*package.split("."))
    out = []
    for path in sorted(folder.rglob("*.py")):
        for line, names in imports_of(path):
            for name in names:  # the first forbidden one speaks for the statement
                if any(within(name, f) for f in forbidden) and not any(within(name, a) for a in allowed):
                    out.append(f"{path.relative_to(REPO)}:{line}: imports {name}")
                    break
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_layer_rules(package: str) -> None:
    found = crossings(package)
    assert not found, f"{package} crosses a layer rule:\n" + "\n".join(found)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "datamodules" / "sub" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from lightningmodules.metrics import boxes\n\nfrom .. import records\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert imports_of(source) == [
        (2, ["lightningmodules.metrics", "lightningmodules.metrics.boxes"]),
        (4, ["datamodules", "datamodules.records"]),
    ]
    assert crossings("datamodules") == ["datamodules/sub/mod.py:2: imports lightningmodules.metrics"]


def test_config_validation_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import pipeline.config\n"
        "from pipeline.config import load_config\n"
        "load_config('experiments/demo.yaml', check_paths=False)\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
