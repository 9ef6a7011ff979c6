"""LightningModule of a Med-MoE router stage: the modality classifier on pooled LLM hidden states.

Only ``model.modality_classifier`` trains (cross-entropy on each sample's modality); the multimodal model
runs without gradients. Accuracy is logged per step and epoch, the validation confusion matrix (the
training one when there is no validation split) is kept for the runner's MLflow artifact.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightningmodules.moe_monitor import MoEMonitor
from lightningmodules.optimization import configure_from_hparams


class ModalityLabelError(ValueError):
    """A record's modality is missing or not one of the classifier's classes."""


class RouterModule(L.LightningModule):
    def __init__(
        self,
        *,
        model: nn.Module,
        modalities: list[str],
        dataset_modality: dict[str, str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        scheduler: str = "cosine",
        min_lr_ratio: float = 0.0,
        warmup_steps: int | None = None,
        warmup_start_ratio: float = 0.0,
        decay_from: str = "warmup_end",
    ) -> None:
        super().__init__()
        if not hasattr(model, "modality_classifier"):
            raise ValueError(
                "RouterModule needs model.modality_classifier (pipeline.structure.add_modality_classifier)"
            )
        self.model = model
        self.modalities = list(modalities)
        self.dataset_modality = dict(dataset_modality or {})
        self._lookup = {m.lower(): i for i, m in enumerate(self.modalities)}
        self.save_hyperparameters(ignore=["model"])
        n = len(self.modalities)
        self.register_buffer("train_confusion", torch.zeros(n, n, dtype=torch.long), persistent=False)
        self.register_buffer("val_confusion", torch.zeros(n, n, dtype=torch.long), persistent=False)
        self.confusion: dict[str, torch.Tensor] = {}  # split -> (C, C) of the last finished epoch
        self.moe = MoEMonitor(model)

    @property
    def classifier(self) -> nn.Module:
        return self.model.modality_classifier

    def on_fit_start(self) -> None:
        self.model.eval()  # frozen LLM: no dropout in the features
        self.classifier.train()

    def labels(self, records: list[Any]) -> torch.Tensor:
        """(B,) class index of each record's modality (or its dataset's, ``dataset_modality``)."""
        out = []
        for record in records:
            name = getattr(record, "modality", None) or self.dataset_modality.get(getattr(record, "dataset", None))
            if name is None:
                raise ModalityLabelError(
                    f"record {record.id} (dataset {record.dataset}): field 'modality' is empty; "
                    f"set the stage's router.dataset_modality.{record.dataset}"
                )
            index = self._lookup.get(str(name).lower())
            if index is None:
                raise ModalityLabelError(
                    f"record {record.id} (dataset {record.dataset}): field 'modality' is "
                    f"{name!r}, not one of router.modalities {self.modalities}"
                )
            out.append(index)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, C) classifier logits on the frozen model's last hidden states."""
        self.moe.begin(batch["attention_mask"])
        with torch.no_grad():
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
                image_task_ids=batch.get("image_task_ids"),
            )
        return self.classifier(out.hidden_states.detach(), batch["attention_mask"])  # (B, C)

    def _step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        logits = self.logits(batch)  # (B, C)
        target = self.labels(batch["records"])  # (B,)
        loss = F.cross_entropy(logits.float(), target)
        pred = logits.argmax(dim=-1)  # (B,)
        n = len(self.modalities)
        confusion = getattr(self, f"{split}_confusion")
        confusion += torch.bincount(target * n + pred, minlength=n * n).view(n, n)  # (C, C) rows = true
        batch_size = target.shape[0]
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=split == "val")
        self.log(
            f"{split}/accuracy",
            (pred == target).float().mean(),
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=split == "val",
        )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def _finish(self, split: str) -> None:
        confusion = getattr(self, f"{split}_confusion")
        if self.trainer is not None and self.trainer.world_size > 1:
            confusion = self.trainer.strategy.reduce(confusion.clone(), reduce_op="sum")
        if int(confusion.sum()) > 0 and not (self.trainer is not None and self.trainer.sanity_checking):
            self.confusion[split] = confusion.detach().cpu().clone()
        getattr(self, f"{split}_confusion").zero_()

    def on_train_epoch_end(self) -> None:
        self._finish("train")

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_from_hparams(
            self,
            self.classifier.parameters(),
            empty_message="the modality classifier is frozen: a router stage trains it (train: [modality_classifier])",
        )


def confusion_report(confusion: torch.Tensor, modalities: list[str], *, split: str) -> dict[str, Any]:
    """JSON-able confusion matrix (rows = true modality, columns = predicted) with accuracy and per-class recall."""
    total = int(confusion.sum())
    rows = confusion.sum(dim=1)  # (C,)
    return {
        "split": split,
        "modalities": list(modalities),
        "matrix": confusion.tolist(),
        "count": total,
        "accuracy": float(confusion.diag().sum()) / total if total else 0.0,
        "recall": {
            m: (float(confusion[i, i]) / int(rows[i]) if int(rows[i]) else None) for i, m in enumerate(modalities)
        },
    }
