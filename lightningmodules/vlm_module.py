"""LightningModule for a training stage of a vision-language model.

Owns the loss, optimiser, schedule, logging and evaluation metrics; the network is the plain
:class:`~lightningmodules.models.multimodal.MultimodalLM` passed in. Which parameters train is set on
the model before it gets here (see :mod:`pipeline.trainable`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from lightningmodules.metrics.routing import RoutingByTask, routing_metric_names
from lightningmodules.metrics.vqa_metrics import bleu1, closed_accuracy, open_recall
from lightningmodules.moe_monitor import MoEMonitor
from lightningmodules.schedules import lr_lambda


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_task_ids")


def model_inputs(batch: dict[str, Any], *, with_labels: bool = True) -> dict[str, Any]:
    keys = MODEL_INPUTS if with_labels else tuple(k for k in MODEL_INPUTS if k != "labels")
    return {k: batch.get(k) for k in keys}


class VLMModule(L.LightningModule):
    def __init__(
        self,
        *,
        model: nn.Module,
        tokenizer: Any = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        scheduler: str = "cosine",
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 16,
        closed_protocol: str = "default",
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.test_metrics = nn.ModuleDict(
            {
                "closed_accuracy": closed_accuracy(closed_protocol),
                "open_recall": open_recall(),
                "bleu1": bleu1(),
            }
        )
        self.predictions: list[dict[str, Any]] = []
        # connector mixture-of-experts (CMoE): per-task mean routing weights over each validation epoch
        connector = getattr(model, "connector", None)
        self.task_names = list(task_names or [])
        self.routing = (
            RoutingByTask(num_tasks=connector.num_tasks, num_experts=connector.num_experts)
            if hasattr(connector, "last_routing")
            else None
        )
        self.routing_table: torch.Tensor | None = None  # (tasks, E) of the last validation epoch
        self.moe = MoEMonitor(model)  # no-op without MoE layers

    # -- training --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # HF models load in eval mode and Lightning keeps module modes as it finds them: without this
        # LoRA and LLM dropout would be off during training
        self.model.train()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.moe.begin(batch["attention_mask"])
        out = self.model(**model_inputs(batch))
        batch_size = batch["input_ids"].shape[0]
        aux = self.moe.aux_loss()
        if aux is not None:  # MoE: weighted load-balancing + z-loss (coefficients 0 by default)
            self.log("train/lm_loss", out.loss, batch_size=batch_size)
            self.log("train/aux_loss", aux, batch_size=batch_size)
            self.log_dict(self.moe.step_metrics(batch.get("records")), batch_size=batch_size)
            out.loss = out.loss + aux
        self.stop_on_non_finite(out.loss)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        if batch.get("truncated"):
            self.log("data/truncated", float(batch["truncated"]), reduce_fx="sum", batch_size=batch_size)
        return out.loss

    def stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Raise before the backward pass when any rank's loss is NaN or inf, so no bad update is
        applied and the last checkpoint stays the last good one."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)  # every rank stops together
        if bad:
            step = self.trainer.global_step if self._trainer is not None else -1
            raise NonFiniteLossError(
                f"training loss is {float(loss.detach())} at step {step}: stopping; the last good "
                "checkpoint is kept (lower optim.lr, or set trainer.gradient_clip_val)"
            )

    def on_train_epoch_end(self) -> None:
        if self.moe.enabled:
            self.log_dict(self.moe.modality_metrics())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.routing is not None:
            self.model.connector.last_routing = None  # a text-only batch does not run the connector
        self.moe.begin(batch["attention_mask"])
        out = self.model(**model_inputs(batch))
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        routing = self.model.connector.last_routing if self.routing is not None else None
        if routing is not None and routing.task_ids is not None:
            self.routing.update(routing.weights, routing.task_ids)

    def on_validation_epoch_end(self) -> None:
        if self.routing is None:
            return
        table = self.routing.compute()  # (tasks, E), summed over ranks
        self.routing.reset()
        if self.trainer.sanity_checking:
            return
        self.routing_table = table.cpu()
        names = self.task_names or [f"task{t}" for t in range(table.shape[0])]
        metrics = routing_metric_names(self.routing_table, names)
        if metrics:  # already reduced over ranks: every rank logs the same numbers
            self.log_dict(metrics)

    # -- evaluation ------------------------------------------------------------------------------
    def generate_texts(self, batch: dict[str, Any]) -> list[str]:
        if self.tokenizer is None:
            raise RuntimeError("VLMModule needs a tokenizer to generate")
        self.moe.end()  # KV-cache steps route every token, whatever the last batch's mask
        ids = self.model.generate(
            **model_inputs(batch, with_labels=False),
            max_new_tokens=self.hparams.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        texts = self.generate_texts(batch)
        records = batch["records"]
        answers = [r.answer for r in records]
        kinds = [r.answer_type for r in records]
        for metric in self.test_metrics.values():
            metric.update(texts, answers, kinds)
        for record, text in zip(records, texts, strict=True):
            self.predictions.append(
                {
                    "question_id": record.id,
                    "prompt": record.question,
                    "text": text,
                    "answer": record.answer,
                    "answer_type": record.answer_type,
                    "task": record.task,
                    "dataset": record.dataset,
                    "modality": record.modality,
                }
            )

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def on_test_epoch_end(self) -> None:
        for name, metric in self.test_metrics.items():
            self.log(f"test/{name}", metric.compute().float())
            metric.reset()
        self.predictions = gather_predictions(self.predictions)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)  # biases and norms: no decay
        if not decay and not no_decay:
            raise RuntimeError("no trainable parameters: check the stage's `train` groups")
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(math.ceil(hp.warmup_ratio * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_lambda(
                step, total_steps=total, warmup_steps=warmup, scheduler=hp.scheduler, min_lr_ratio=hp.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def gather_predictions(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's predictions on every rank (rank order); unchanged in a single process.

    DistributedSampler pads the last batches with repeated samples: callers drop repeated ids.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return predictions
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, predictions)
    return [p for part in gathered for p in part]
