"""``medpipe export --format medpipe``: the folder loads with torch and transformers alone (``medpipe_loader.py``,
copied beside the weights) and computes medpipe's logits, pixels and greedy tokens, for dense and MoE models."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
MEDPIPE_PACKAGES = ("pipeline", "lightningmodules", "medcore", "datamodules")
# what the loader may import: the standard library, torch, transformers and what transformers itself requires
# (safetensors, numpy), and Pillow for its image transform
ALLOWED = {"__future__", "json", "math", "pathlib", "typing", "torch", "transformers", "safetensors", "numpy", "PIL"}

# runs in a fresh interpreter: medpipe's packages cannot be imported, the loader comes from the exported folder
LOADER_SCRIPT = """
import sys
for name in {packages!r}:
    sys.modules[name] = None  # import pipeline / lightningmodules / ... raises ImportError
import torch
from PIL import Image
inputs = torch.load(sys.argv[1], weights_only=True)
results = {{}}
for folder, case in inputs["cases"].items():
    sys.path.insert(0, folder)
    import medpipe_loader
    model, tokenizer = medpipe_loader.load(folder)
    pixels = model.preprocess([Image.open(inputs["image"])])
    with torch.no_grad():
        logits = model(case["ids"], case["mask"], case["pixels"])
    tokens = model.generate(case["ids"], case["mask"], case["pixels"], max_new_tokens=6, min_new_tokens=6,
                            pad_token_id=0)
    prompt = model.prompt_ids(tokenizer, "<image> what is shown?")
    results[folder] = {{"logits": logits, "pixels": pixels, "tokens": tokens, "prompt": prompt}}
    sys.path.remove(folder)
    del sys.modules["medpipe_loader"]
assert not any(name.split(".")[0] in {packages!r} for name, module in sys.modules.items() if module is not None)
torch.save(results, sys.argv[2])
"""


def _built(tmp: Path, cache_dir: Path, *overrides: str, moe: dict | None = None):
    from pipeline.structure import add_moe

    cfg = load_config(REPO / "experiments" / "demo.yaml", [f"output_dir={tmp}/out", *overrides], check_paths=False)
    built = build_model(cfg.model, cache_dir=cache_dir)
    if moe is not None:
        add_moe(built.model, **moe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # not the fresh init: routers, experts, meta experts, connector
        for name, param in built.model.named_parameters():
            if (".mlp." in name and name.startswith("llm.")) or name.startswith("connector."):
                param.add_(torch.randn(param.shape, generator=generator) * (1.0 if ".router." in name else 0.2))
    return cfg, built


def test_the_loader_imports_only_torch_and_transformers() -> None:
    from pipeline import medpipe_loader

    tree = ast.parse(Path(medpipe_loader.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED, imported - ALLOWED
    assert not imported & set(MEDPIPE_PACKAGES)


CASES = {
    "dense-avgpool": ((), None),  # the demo's 2 x 2 pooling: a model MoE-LLaVA's layout cannot express
    "moe-meta-top1": (("model.connector.aggregation=none",), {"layers": [0, 1], "num_experts": 3, "top_k": 1}),
    "phi-moe-top2-capacity-drops": (
        ("model.llm.path=tiny:phi", "model.connector.type=linear"),
        {"layers": [1], "num_experts": 4, "top_k": 2, "meta_expert": False, "renormalize": True,
         "router_bias": False, "capacity_factor": 1.0, "eval_capacity_factor": 0.5, "drop_policy": "position"},
    ),
}  # fmt: skip


def test_exported_folders_give_medpipes_logits_without_medpipe(tmp_path, tiny_clip, cache_dir) -> None:
    from pipeline.export_medpipe import export_medpipe

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    cases, expected = {}, {}
    for case, (overrides, moe) in CASES.items():
        cfg, built = _built(tmp_path / case, cache_dir, f"model.vision.path={tiny_clip}", *overrides, moe=moe)
        written = export_medpipe(built, cfg.model, tmp_path / case / "export", vision_path=tiny_clip)
        config = json.loads((written.out / "medpipe_config.json").read_text())
        assert config["format"] == "medpipe" and len(config["moe_layers"]) == (len(moe["layers"]) if moe else 0)
        assert (written.out / "medpipe_loader.py").read_text() == (REPO / "pipeline" / "medpipe_loader.py").read_text()
        model = built.model.eval()
        image_ids = [model.image_token_id] * model.num_image_tokens
        ids = torch.tensor([[1, 5, 9, *image_ids, 11, 12], [1, 7, *image_ids, 13, 14, 15]])  # (2, T)
        mask = torch.ones_like(ids)
        pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (2, 3, H, W)
        with torch.no_grad():
            logits = model.output_logits(model(ids, mask, pixel_values=pixels).hidden_states)  # (2, T, V)
        tokens = model.generate(ids, mask, pixels, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)  # (2, 6)
        if moe is not None and moe.get("eval_capacity_factor") == 0.5:
            assert (
                model.llm.model.layers[1].mlp.capacity.limit(
                    num_tokens=ids.numel(), top_k=2, num_experts=4, training=False
                )
                < ids.numel()
            )  # the capacity drops assignments at this size
        cases[str(written.out)] = {"ids": ids, "mask": mask, "pixels": pixels}
        expected[str(written.out)] = (logits, tokens, built.transform(picture), model)
    torch.save({"cases": cases, "image": str(tmp_path / "picture.png")}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER_SCRIPT.format(packages=MEDPIPE_PACKAGES))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    for folder, (logits, tokens, pixels, model) in expected.items():
        got = results[folder]
        torch.testing.assert_close(got["logits"], logits, atol=1e-6, rtol=0)
        assert got["tokens"].tolist() == tokens.tolist()
        torch.testing.assert_close(got["pixels"][0], pixels, atol=1e-6, rtol=0)
        prompt = got["prompt"][0].tolist()
        assert prompt.count(model.image_token_id) == model.num_image_tokens


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("model.connector.type=cmoe",), "model.connector.type is 'cmoe'"),
    ],
)
def test_what_the_loader_cannot_compute_is_refused(tmp_path, tiny_clip, cache_dir, overrides, named) -> None:
    from pipeline.export import ExportError, export_model

    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [f"output_dir={tmp_path}/out", f"model.vision.path={tiny_clip}", *overrides],
        check_paths=False,
    )
    built = build_model(cfg.model, cache_dir=cache_dir)
    with pytest.raises(ExportError, match="cannot export in the medpipe format: ") as info:
        export_model("medpipe", built, cfg.model, tmp_path / "export")
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()
