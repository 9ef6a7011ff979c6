"""The headline target: a tiny grounding run on synthetic lesions reaches mDice >= 0.6 on its test split.

Stage III of the tiny recipe alone (LoRA on the FFN + SEG projection + mask decoder, CE 1 / BCE 1 /
Dice 5 / focal 1, plus the embeddings and LM head that stage II would have trained), trained from the
tiny LLM on MeCoVQA-layout phantom data whose Grounding records ask for the
lesion; evaluated by generation: the model must say ``<SEG>`` and the mask comes from that position's
hidden state (no ``<SEG>``: empty mask, IoU 0). SAM is ``tiny:medsam`` (pretrained on a disjoint phantom
stream, standing in for SAM-Med2D), its image and prompt encoders frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

log = logging.getLogger(__name__)
TARGET_MDICE = 0.6


@pytest.mark.slow
def test_tiny_grounding_run_reaches_the_mdice_target(tiny_grounding_run) -> None:
    cfg, result, counts = tiny_grounding_run
    assert counts["train"] >= 100 and counts["test"] >= 25
    metrics = result.evaluation.metrics
    print(
        f"\ntiny grounding run: test mDice {metrics['seg/mdice']:.3f}, mIoU {metrics['seg/miou']:.3f}, "
        f"{metrics['seg/count']:.0f} images, no <SEG> {metrics['seg/no_mask']:.0f}, "
        f"MONAI Dice {metrics['seg/monai_dice']:.3f}"
    )
    assert metrics["seg/count"] == counts["test"]
    assert metrics["seg/no_mask"] == 0  # the model learned to answer with <SEG>
    assert any(k.startswith("seg/mdice/") for k in metrics)  # per modality
    overlays = list((Path(cfg.output_dir) / "eval" / "overlays").glob("*.png"))
    assert len(overlays) == cfg.model.grounding.overlays
    from mlflow.tracking import MlflowClient  # the overlays are png artifacts of the evaluation run

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id],
        filter_string="tags.stage = 'evaluate'",
    )
    logged = [a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation/overlays")]
    assert len(logged) == len(overlays) and all(p.endswith(".png") for p in logged)
    assert runs[0].data.metrics["eval/seg/mdice"] == pytest.approx(metrics["seg/mdice"])
    assert metrics["seg/mdice"] >= TARGET_MDICE
