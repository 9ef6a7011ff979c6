"""Checkpoints load as weights only; remote code runs only when the config says so."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pipeline", "datamodules", "lightningmodules", "medcore", "tests", "benchmarks", "notebooks")


def torch_load_calls() -> list[tuple[str, int, bool]]:
    """(file, line, weights_only=True given) for every ``torch.load(...)`` call in the repository."""
    calls = []
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    safe = any(
                        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in node.keywords
                    )
                    calls.append((str(path.relative_to(REPO)), node.lineno, safe))
    return calls


def test_the_scan_covers_every_package() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}  # pipeline (pipeline/zoo inside), medcore, ...
    assert packages and packages <= set(SOURCES)


def test_every_torch_load_is_weights_only() -> None:
    calls = torch_load_calls()
    assert any(f == "pipeline/safe_load.py" for f, _, _ in calls)  # the scan sees the hand-over loader
    assert [(f, line) for f, line, safe in calls if not safe] == []


class Payload:
    def __reduce__(self):
        return (print, ("code ran from a checkpoint",))


def test_a_handover_carrying_code_is_refused(tmp_path: Path) -> None:
    from pipeline.handover import FORMAT_VERSION, load_handover
    from pipeline.safe_load import NotAHandoverError

    path = tmp_path / "handover.pt"
    torch.save({"format": FORMAT_VERSION, "stage": "x", "meta": {"evil": Payload()}, "state_dict": {}}, path)
    with pytest.raises(NotAHandoverError, match=r"it holds a Python object \(print\), which torch.load\(weights_only"):
        load_handover(path)


@pytest.mark.parametrize("setting,expected", [(None, False), ("false", False), ("true", True)])
def test_trust_remote_code_only_when_the_config_sets_it(setting, expected, monkeypatch) -> None:
    import pipeline.model_factory as factory
    from pipeline.config import load_config

    seen: dict[str, bool] = {}

    class Stop(Exception):
        pass

    class StandInTokenizer(list):  # len() = 0; every added token maps to id 0
        def convert_tokens_to_ids(self, token: str) -> int:
            return 0

    def tokenizer(path, **kwargs):
        seen["tokenizer"] = kwargs["trust_remote_code"]
        return StandInTokenizer()

    def causal_lm(path, **kwargs):
        seen["llm"] = kwargs["trust_remote_code"]
        raise Stop

    monkeypatch.setattr(factory, "load_tokenizer", tokenizer)
    monkeypatch.setattr(factory, "load_causal_lm", causal_lm)
    overrides = [] if setting is None else [f"model.llm.trust_remote_code={setting}"]
    cfg = load_config(REPO / "experiments" / "demo.yaml", overrides, check_paths=False)
    with pytest.raises(Stop):
        factory.build_model(cfg.model)
    assert seen == {"tokenizer": expected, "llm": expected}
