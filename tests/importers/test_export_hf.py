"""``medpipe export --format hf``: transformers alone loads the folder and generates exactly medpipe's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]


def _built(tmp_path: Path, cache_dir: Path, *overrides: str):
    cfg = load_config(REPO / "experiments" / "demo.yaml", [f"output_dir={tmp_path}/out", *overrides], check_paths=False)
    built = build_model(cfg.model, cache_dir=cache_dir)
    with torch.no_grad():  # a connector that is not the fresh init: the export must carry trained weights
        generator = torch.Generator().manual_seed(0)
        for param in built.model.connector.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return cfg, built


def test_exported_llava_generates_medpipes_tokens(tmp_path, tiny_clip, cache_dir) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.export import export_hf

    cfg, built = _built(tmp_path, cache_dir, "model.connector.aggregation=none")
    out = export_hf(built, cfg.model, tmp_path / "hf", vision_path=tiny_clip)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    model = built.model.eval()
    image_ids = [model.image_token_id] * model.num_image_tokens
    ids = torch.tensor([[1, 5, 9, *image_ids, 11, 12], [1, 7, *image_ids, 13, 14, 15]])  # (2, T)
    mask = torch.ones_like(ids)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (2, 3, H, W)
    ours = model.generate(ids, mask, pixels, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)  # (2, 8)
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, min_new_tokens=8, do_sample=False
        )[:, ids.shape[1] :]  # (2, 8)
    assert ours.tolist() == theirs.tolist()
    # the processor: the same pixels as medpipe's transform, <image> expanded to the visual tokens
    processor = AutoProcessor.from_pretrained(out)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    inputs = processor(images=picture, text="<image> what is shown?", return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"][0], built.transform(picture), atol=1e-5, rtol=0)
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens


def test_what_llava_cannot_express_is_refused_naming_the_setting(tmp_path, cache_dir) -> None:
    from pipeline.export import ExportError, export_hf

    cfg, built = _built(tmp_path, cache_dir)  # the demo pools 2 x 2
    with pytest.raises(ExportError, match=r"model.connector.aggregation is 'avgpool'"):
        export_hf(built, cfg.model, tmp_path / "hf")


def test_export_command_on_a_run_folder(tmp_path, tiny_clip, cache_dir, capsys) -> None:
    """A run folder (config.yaml, run_state.json, stages/<stage>/handover.pt) -> a folder transformers loads;
    one line when the model cannot be expressed."""
    from omegaconf import OmegaConf
    from transformers import LlavaForConditionalGeneration

    from pipeline.cli import main
    from pipeline.handover import save_handover
    from pipeline.run_state import RunState, save_run_state

    cfg, built = _built(tmp_path, cache_dir, "model.connector.aggregation=none")
    run = tmp_path / "run"
    (run / "stages" / "instruct").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    handover = save_handover(built.model, run / "stages" / "instruct" / "handover.pt", stage="instruct")
    state = RunState(name=cfg.name)
    state.stage("instruct").status, state.stage("instruct").handover = "done", str(handover)
    save_run_state(state, run)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    fc2 = hf.state_dict()["model.multi_modal_projector.linear_2.weight"]
    torch.testing.assert_close(fc2, built.model.connector.fc2.weight.detach())  # the hand-over's weights
    capsys.readouterr()
    code = main(
        ["export", str(run), "model.connector.aggregation=avgpool", "--format", "hf", "--out", str(tmp_path / "pooled")]
    )
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "model.connector.aggregation is 'avgpool'" in err
    assert "Traceback" not in err
