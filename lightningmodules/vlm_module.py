"""LightningModule for a training stage of a vision-language model.

Owns the loss, optimiser, schedule and logging; the network is the plain
:class:`~lightningmodules.models.multimodal.MultimodalLM` passed in. Which parameters train is set on
the model before it gets here (see :mod:`pipeline.trainable`). The training and validation steps are
generic: a subclass changes the loss through :meth:`VLMModule.compute_loss` only (grounded models:
``lightningmodules/grounding_module.py``). The test step only collects predictions; the reported
metrics are computed once, on de-duplicated predictions, by ``pipeline/evaluation.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from lightningmodules.metrics.routing import RoutingByTask, routing_metric_names
from lightningmodules.models.language import decode_answers, stop_token_ids
from lightningmodules.models.multimodal import GREEDY, Decoding
from lightningmodules.moe_monitor import MoEMonitor
from lightningmodules.optimization import configure_from_hparams
from lightningmodules.sharding import shard_model


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteWeightsError(RuntimeError):
    """A trained weight holds NaN or inf: the stage hands nothing over."""


def first_non_finite(model: nn.Module) -> tuple[str, float] | None:
    """The first trainable parameter (``requires_grad``) holding a NaN or an infinity, with one such value;
    None when every trainable weight is finite. A finite loss does not prove finite weights: the last step's
    update (lr inf, an overflow) is applied after its loss was checked."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            values = param.detach()
            values = values.to_local() if hasattr(values, "to_local") else values  # FSDP2: this rank's shard
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                return name, float(values[bad].flatten()[0])
    return None


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_task_ids")
# decoding settings (evaluation.* in the config) and their defaults: greedy decoding
DECODING_DEFAULTS: dict[str, Any] = asdict(GREEDY)


def model_inputs(batch: dict[str, Any], *, with_labels: bool = True) -> dict[str, Any]:
    keys = MODEL_INPUTS if with_labels else tuple(k for k in MODEL_INPUTS if k != "labels")
    return {k: batch.get(k) for k in keys}


@dataclass
class OverlaySample:
    """A grounded prediction kept for drawing: the record, the binarised predicted mask (None: no ``<SEG>``)
    and the target mask, both (H, W) bool on the CPU."""

    record: Any
    pred: torch.Tensor | None
    target: torch.Tensor


@dataclass
class StepLoss:
    """One batch's loss computation: ``loss`` to optimise (MoE aux losses are added by the step),
    ``lm_loss`` the language-model cross-entropy, ``terms`` extra scalars logged as ``train/<name>``."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


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
        warmup_steps: int | None = None,
        warmup_start_ratio: float = 0.0,
        decay_from: str = "warmup_end",
        max_new_tokens: int = 16,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        generation_seed: int | None = None,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.predictions: list[dict[str, Any]] = []
        self.overlay_samples: list[OverlaySample] = []  # grounded models: masks the evaluation draws
        self.task_names = list(task_names or [])
        self.routing_table: torch.Tensor | None = None  # (tasks, E) of the last validation epoch
        self.moe = MoEMonitor(model)  # the MoE context of each step; no-op without MoE parts

    @property
    def routing(self) -> RoutingByTask | None:
        """Connector mixture-of-experts (CMoE): per-task mean routing weights over each validation epoch."""
        return self.moe.by_task

    def configure_model(self) -> None:
        # trainer.strategy fsdp2 (ModelParallelStrategy) hands over its device mesh: shard the network on it
        mesh = self.device_mesh
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"])

    # -- training --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # HF models load in eval mode and Lightning keeps module modes as it finds them: without this
        # LoRA and LLM dropout would be off during training
        self.model.train()

    # terms of ``compute_loss`` also logged at validation (``val/<name>``, synchronised over ranks)
    validation_terms: tuple[str, ...] = ()

    def compute_loss(self, batch: dict[str, Any]) -> StepLoss:
        """The loss of one batch: the hook subclasses override (the steps around it are shared)."""
        out = self.model(**model_inputs(batch))
        return StepLoss(loss=out.loss, lm_loss=out.loss)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.moe.begin(batch["attention_mask"])
        step = self.compute_loss(batch)
        loss = step.loss
        batch_size = batch["input_ids"].shape[0]
        aux = self.moe.aux_loss()
        if aux is not None:  # MoE: weighted load-balancing + z-loss (coefficients 0 by default)
            self.log("train/lm_loss", step.lm_loss, batch_size=batch_size)
            self.log("train/aux_loss", aux, batch_size=batch_size)
            self.log_dict(self.moe.step_metrics(batch.get("records")), batch_size=batch_size)
            loss = loss + aux
        self.stop_on_non_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if step.terms:
            self.log_dict({f"train/{k}": v for k, v in step.terms.items()}, batch_size=batch_size)
        if batch.get("truncated"):
            self.log("data/truncated", float(batch["truncated"]), reduce_fx="sum", batch_size=batch_size)
        return loss

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

    def expert_load(self) -> dict[str, Any] | None:
        """Tokens routed to each expert per MoE layer and modality since the stage started (None without MoE)."""
        return self.moe.summary() if self.moe.enabled else None

    def on_train_epoch_end(self) -> None:
        if self.moe.enabled:
            self.log_dict(self.moe.modality_metrics())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.moe.begin(batch["attention_mask"])
        step = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("val/loss", step.loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if self.validation_terms:
            terms = {f"val/{k}": step.terms[k] for k in self.validation_terms}
            self.log_dict(terms, sync_dist=True, batch_size=batch_size)
        self.moe.update_by_task()

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
        settings = self.generation_settings()
        ids = self.model.generate(**model_inputs(batch, with_labels=False), **settings)
        return decode_answers(self.tokenizer, ids, settings["eos_token_id"])

    def generation_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``model.generate``: length, stop tokens (tokenizer eos, the chat template's
        end-of-turn token and the checkpoint's eos list), pad token and the decoding settings
        (``evaluation.num_beams`` ... ``repetition_penalty``; the defaults are greedy decoding)."""
        hp = self.hparams
        return {
            "max_new_tokens": hp.max_new_tokens,
            "eos_token_id": self.model.stop_token_ids(stop_token_ids(self.tokenizer)),
            "pad_token_id": self.tokenizer.pad_token_id,
            "decoding": Decoding(**{key: hp.get(key, default) for key, default in DECODING_DEFAULTS.items()}),
        }

    def generate_answers(self, batch: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
        """Hook: each sample's generated text and the extra fields of its prediction row (none here;
        grounded models add their mask scores)."""
        texts = self.generate_texts(batch)
        return texts, [{} for _ in texts]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Collect prediction rows only: ``pipeline/evaluation.py`` scores them once, de-duplicated."""
        texts, extras = self.generate_answers(batch)
        for record, text, extra in zip(batch["records"], texts, extras, strict=True):
            self.predictions.append({**prediction_row(record, text), **extra})

    def on_test_epoch_start(self) -> None:
        self.predictions = []
        self.overlay_samples = []
        seed = self.hparams.get("generation_seed")
        if self.hparams.get("do_sample") and seed is not None:
            # sampling draws from torch's global generator: the same answers for the same seed, batches and ranks,
            # whatever ran before the evaluation
            torch.manual_seed(seed + self.global_rank)

    def on_test_epoch_end(self) -> None:
        self.predictions = gather_predictions(self.predictions)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        return configure_from_hparams(self, self.model.parameters())


def prediction_row(record: Any, text: str) -> dict[str, Any]:
    """One sample's prediction with the record fields the evaluation pairs and breaks down by; a box record
    (REC) also carries its ground-truth box and original image size, so ``medpipe score`` can score the file
    in pixels as Uni-Med's eval_ref.py does."""
    row = {
        "question_id": record.id,
        "prompt": record.question,
        "text": text,
        "answer": record.answer,
        "answer_type": record.answer_type,
        "task": record.task,
        "dataset": record.dataset,
        "modality": record.modality,
    }
    if getattr(record, "box", None) is not None:
        row["box"] = [float(v) for v in record.box]  # [x, y, w, h] in the original image's pixels
        size = record.extra.get("image_size")
        row["image_size"] = None if size is None else [int(v) for v in size]  # (W, H)
    return row


def gather_predictions(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's predictions on every rank (rank order); unchanged in a single process.

    DistributedSampler pads the last batches with repeated samples: callers drop repeated ids.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return predictions
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, predictions)
    return [p for part in gathered for p in part]
