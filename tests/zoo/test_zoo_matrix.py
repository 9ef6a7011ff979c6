"""The zoo x recipe matrix: every recipe trains and evaluates on real-architecture checkpoints.

- the two-stage demo recipe on each of the nine LLM families (Vicuna, Phi-2 and StableLM-2 ship no chat
  template: they run on LLaVA / Med-MoE conversation presets; Mistral and Gemma-2 reject a system role:
  they run with a system prompt, merged into the first user turn);
- the Med-MoE chain on a gated (StableLM-2) and an ungated (Phi-2) family, the paper's two LLMs;
- MedPLIB's four stages on a Llama-style (Vicuna) and a Phi-style family;
- Uni-Med's CMoE connector on SigLIP and on DINOv2 with registers.

Each run asserts that every stage updates its trainable weights and that every evaluation answer ends at a
stop token (the family's end-of-turn token, its eos or its checkpoint's eos list) before the token budget,
with no template text in the decoded answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from zoo_helpers import TEMPLATE_TOKENS

from medcore.choices import TINY_LLM_FAMILIES

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
MED_MOE = REPO / "experiments" / "med_moe" / "tiny.yaml"
MEDPLIB = REPO / "experiments" / "medplib" / "tiny.yaml"
UNI_MED = REPO / "experiments" / "uni_med" / "tiny.yaml"
MAX_NEW_TOKENS = 32
# families without a chat template in their release run on the conversation template their papers used
PRESETS = {"vicuna": "llava_v1", "phi2": "phi", "stablelm2": "stablelm"}
SYSTEM_PROMPT = "You are a careful radiology assistant."


def llm_overrides(family: str) -> list[str]:
    out = [f"model.llm.path=tiny:{family}"]
    if family in PRESETS:
        out.append(f"model.llm.conversation={PRESETS[family]}")
    if family in ("mistral-instruct", "gemma2-it"):  # templates that raise on a system message
        out.append(f"model.llm.system_prompt='{SYSTEM_PROMPT}'")
    return out


def common(tmp: Path) -> list[str]:
    return [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.system_metrics=false",
        "mlflow.register_model=false",
        "trainer.enable_progress_bar=false",
        f"evaluation.max_new_tokens={MAX_NEW_TOKENS}",
    ]


def demo(family: str, tmp: Path) -> tuple[Path, list[str]]:
    return DEMO, [
        *common(tmp),
        *llm_overrides(family),
        "data.datasets.phantom_captions.synthetic.train_images=16",
        "data.datasets.phantom_captions.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.train_images=24",
        "data.datasets.phantom_slake.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8",
        "stages.align.max_epochs=1",
        "stages.instruct.max_epochs=2",
        "evaluation.after_each_stage=false",
    ]


def med_moe(family: str, tmp: Path) -> tuple[Path, list[str]]:
    return MED_MOE, [
        *common(tmp),
        *llm_overrides(family),
        "data.datasets.phantom_captions.synthetic.train_images=16",
        "data.datasets.phantom_slake.synthetic.train_images=24",
        "data.datasets.phantom_slake.synthetic.questions_per_image=3",
        "data.datasets.phantom_slake.synthetic.val_images=6",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8",
        "stages.stage1.max_epochs=1",
        "stages.stage2.max_epochs=1",
        "stages.router.max_epochs=2",
        "stages.stage3.max_epochs=1",
    ]


def medplib(family: str, tmp: Path) -> tuple[Path, list[str]]:
    out = [*common(tmp), *llm_overrides(family), "model.grounding.sam_path=tiny:sam", "data.batch_size=8"]
    for name in ("mecovqa_complex", "mecovqa_region", "mecovqa_grounding"):
        out += [f"data.datasets.{name}.synthetic.train_images=16", f"data.datasets.{name}.synthetic.test_images=4"]
    out += ["data.datasets.alignment.synthetic.train_images=16", "evaluation.batch_size=8"]
    return MEDPLIB, out + [
        f"stages.{s}.max_epochs=1" for s in ("alignment", "language_expert", "grounding_expert", "moe")
    ]


def uni_med(tower: str, tmp: Path) -> tuple[Path, list[str]]:
    out = [*common(tmp), f"model.vision.path=tiny:{tower}", "data.mixture.samples_per_epoch=48"]
    out += ["stages.uni_med.max_epochs=2", "evaluation.batch_size=8"]
    for name in ("vqa", "refer", "identify", "caption", "cls", "qa"):
        key = f"data.datasets.{name}.synthetic"
        out += [f"{key}.train_images=8", f"{key}.val_images=2", f"{key}.test_images={2 if name == 'vqa' else 0}"]
    return UNI_MED, out


@dataclass
class Run:
    trained: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]  # per stage: trainable at start, end
    generated: list[tuple[torch.Tensor, list[int]]]  # (B, K) ids and the stop ids of each generate call
    predictions: list[dict]


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def run(recipe: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run the recipe, keeping each stage's trainable weights at its start and end (before any LoRA merge)
    and every generation's raw token ids."""
    from lightning.pytorch import Callback

    from lightningmodules.models.multimodal import MultimodalLM
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    cfg = load_config(recipe, overrides)
    starts: list[dict[str, torch.Tensor]] = []
    ends: list[dict[str, torch.Tensor]] = []
    generated: list[tuple[torch.Tensor, list[int]]] = []

    generate = MultimodalLM.generate_from_embeds

    def recording(self, *args, **kwargs):  # every answer of every evaluation passes through here
        ids = generate(self, *args, **kwargs)
        generated.append((ids.detach().clone(), list(kwargs["eos_token_id"])))
        return ids

    monkeypatch.setattr(MultimodalLM, "generate_from_embeds", recording)

    def on_stage_start(name: str, model: torch.nn.Module) -> None:
        starts.append(trainable(model))

    class EndOfTraining(Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            ends.append(trainable(pl_module.model))

    result = run_experiment(cfg, on_stage_start=on_stage_start, extra_callbacks=lambda name: [EndOfTraining()])
    assert result.evaluation is not None
    lines = result.evaluation.predictions_file.read_text().splitlines()
    return Run(list(zip(starts, ends, strict=True)), generated, [json.loads(line) for line in lines])


def check(outcome: Run) -> None:
    for index, (start, end) in enumerate(outcome.trained):
        assert start and start.keys() == end.keys(), f"stage {index} trains nothing"
        unchanged = [k for k, v in start.items() if torch.equal(end[k], v)]
        # a tensor may legitimately stay put (an expert no token reached); the stage as a whole must move
        assert len(unchanged) <= len(start) // 10, f"stage {index}: {len(unchanged)}/{len(start)} unchanged"
    assert outcome.generated and outcome.predictions
    for ids, stops in outcome.generated:
        for row in ids.tolist():
            assert any(token in stops for token in row), f"an answer ran to {MAX_NEW_TOKENS} tokens: {row}"
    for row in outcome.predictions:
        assert not any(token in row["text"] for token in TEMPLATE_TOKENS), row


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_LLM_FAMILIES)
def test_demo_recipe_on_every_llm_family(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check(run(*demo(family, tmp_path), monkeypatch))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["stablelm2", "phi2"])
def test_med_moe_chain_on_a_gated_and_an_ungated_family(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check(run(*med_moe(family, tmp_path), monkeypatch))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vicuna", "phi2"])
def test_medplib_chain_on_llama_and_phi_families(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check(run(*medplib(family, tmp_path), monkeypatch))


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["siglip", "dinov2-reg"])
def test_uni_med_cmoe_on_siglip_and_dinov2(tower: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check(run(*uni_med(tower, tmp_path), monkeypatch))
