"""``kind: router`` stages (Med-MoE): the modality classifier on the frozen model's pooled hidden states."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightningmodules.router_module import RouterModule, confusion_report
from pipeline.stages.base import Stage

log = logging.getLogger("medpipe")


class RouterStage(Stage):
    """Attaches ``modality_classifier`` (the ``router`` section's structure entry) and trains it alone
    with ``RouterModule``; logs its confusion matrix (``router/confusion_matrix.{json,png}``). Not
    evaluated: the LLM is unchanged."""

    evaluated = False

    def module(self, built: Any) -> RouterModule:
        return RouterModule(
            model=built.model,
            modalities=list(self.config.router.modalities),
            dataset_modality=OmegaConf.to_container(self.config.router.dataset_modality),
            **self.optim_settings(),
        )

    def log_artifacts(self, module: RouterModule, *, tracker: Any, run_id: str | None, out_dir: Path) -> dict[str, Any]:
        """The validation confusion matrix (the training one without a validation split), json + png."""
        confusion = module.confusion
        if not confusion:
            return {}
        import matplotlib.pyplot as plt

        from pipeline.plots import confusion_matrix_figure

        split = "val" if "val" in confusion else "train"
        report = confusion_report(confusion[split], module.modalities, split=split)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "confusion_matrix.json").write_text(json.dumps(report, indent=2))
        tracker.log_text(run_id, json.dumps(report, indent=2), "router/confusion_matrix.json")
        tracker.log_metrics(run_id, {f"router/{split}_accuracy_final": report["accuracy"]})
        figure = confusion_matrix_figure(
            report["matrix"],
            report["modalities"],
            title=f"stage {self.name}: modality router ({split}, acc {report['accuracy']:.3f})",
        )
        figure.savefig(out_dir / "confusion_matrix.png")
        tracker.log_figure(run_id, figure, "router/confusion_matrix.png")
        plt.close(figure)
        log.info(
            "stage %s: modality router %s accuracy %.3f over %d samples",
            self.name,
            split,
            report["accuracy"],
            report["count"],
        )
        return {"confusion_matrix": report}
