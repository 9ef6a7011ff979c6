"""The stage LightningModule for MedPLIB's grounded model: CE + mask losses, masks at evaluation.

It overrides the loss (``compute_loss``) and the answer generation only; the training, validation and
test steps, the MoE aux losses and the optimiser are ``VLMModule``'s.

Training loss = ``ce_weight`` * CE + ``bce_weight`` * BCE + ``dice_weight`` * Dice (+ ``focal_weight`` *
focal) (+ MoE aux losses, through the parent's ``MoEMonitor``). The mask terms are per mask at the
image's original resolution, averaged over the masks of the batch (``lightningmodules/losses``); in a
batch that mixes samples with and without masks only the ``<SEG>``s that have a target mask count
(``pair_with_targets``), and a batch without any mask adds an exact 0 that still reaches every
trainable grounding parameter (``GroundingHead.zero_loss``, for DDP).

MedPLIB's weights: stage III CE 1, BCE 1, Dice 5; stage IV CE 1, BCE 2, Dice 0.5 (papers.md section 3).

Evaluation (``test_step``): greedy generation; when the answer has ``<SEG>``, the mask decoder runs from
that position's hidden state (:meth:`GroundedMultimodalLM.generate_with_masks`); without one, from the
hidden state ``no_seg_mask`` names (``last_answer_token``, MedPLIB's evaluate) or no mask at all
(``none``: IoU 0). A sample with a target mask gets per-image ``iou`` (MedPLIB: sigmoid(logit) >
``mask_threshold``, IoU 0 for an empty union or no mask), ``dice`` = 2 IoU / (1 + IoU) and ``pixel_dice``
(MONAI's per-image Dice, None for an empty target) in its prediction row; ``seg_produced`` False marks an
answer without ``<SEG>`` (and ``no_seg_mask`` how its mask was made), counted in ``no_seg_count``. The
first ``overlay_count`` grounding samples are kept in ``overlay_samples`` (record, predicted mask, target
mask); the evaluation draws them for MLflow.
"""

from __future__ import annotations

from typing import Any

import torch

from lightningmodules.losses import mask_losses
from lightningmodules.metrics.segmentation import binarize, dice_from_iou, mask_iou
from lightningmodules.models.grounding import pair_with_targets
from lightningmodules.models.language import decode_answers
from lightningmodules.vlm_module import OverlaySample, StepLoss, VLMModule, model_inputs

GROUNDING_INPUTS = ("region_masks_input", "region_weights", "region_batch_index")


def grounded_inputs(batch: dict[str, Any], *, with_labels: bool = True) -> dict[str, Any]:
    """The parent's model inputs plus the regions' masks at the vision input resolution (R, H_in, W_in), their
    patch-grid weights (R, G, G) and sample index (R,)."""
    return {**model_inputs(batch, with_labels=with_labels), **{k: batch.get(k) for k in GROUNDING_INPUTS}}


def sam_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "sam_pixel_values": batch.get("sam_pixel_values"),
        "image_sizes": batch.get("image_sizes"),
        "sam_resized_sizes": batch.get("sam_resized_sizes"),
    }


def pixel_dice(pred: torch.Tensor | None, target: torch.Tensor) -> float | None:
    """MONAI DiceMetric's per-image value: 2|A and B| / (|A| + |B|); None for an empty target (MONAI: NaN)."""
    target = target.bool()
    if not bool(target.any()):
        return None
    if pred is None:
        return 0.0
    intersection = int((pred & target).sum())
    return 2.0 * intersection / (int(pred.sum()) + int(target.sum()))


class GroundingVLMModule(VLMModule):
    validation_terms = ("ce", "bce", "dice")

    def __init__(
        self,
        *,
        ce_weight: float = 1.0,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        focal_weight: float = 0.0,
        focal_gamma: float = 2.0,
        mask_threshold: float = 0.1,
        no_seg_mask: str = "last_answer_token",
        overlay_count: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.no_seg_count = 0

    # -- losses ------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (weighted total), ``ce``, ``bce``, ``dice``, ``focal`` and ``masks`` (count) of one batch."""
        hp = self.hparams
        out = self.model(**grounded_inputs(batch))
        predictions, targets = [], []
        if batch.get("sam_pixel_values") is not None and bool((batch["input_ids"] == self.model.seg_token_id).any()):
            masks, batch_index = self.model.segment(out.hidden_states, batch["input_ids"], **sam_inputs(batch))
            sample_targets = batch.get("masks") or [None] * batch["input_ids"].shape[0]
            predictions, targets, _unpaired = pair_with_targets(masks, batch_index, sample_targets)
        terms = mask_losses(
            predictions,
            targets,
            bce_weight=hp.bce_weight,
            dice_weight=hp.dice_weight,
            focal_weight=hp.focal_weight,
            focal_gamma=hp.focal_gamma,
            zero=self.model.grounding.zero_loss(),
        )
        loss = hp.ce_weight * out.loss + terms["loss"]
        return {
            "loss": loss,
            "ce": out.loss.detach(),
            "bce": terms["bce"],
            "dice": terms["dice"],
            "focal": terms["focal"],
            "masks": torch.tensor(float(len(predictions))),
        }

    def compute_loss(self, batch: dict[str, Any]) -> StepLoss:
        terms = self.losses(batch)
        return StepLoss(loss=terms.pop("loss"), lm_loss=terms["ce"], terms=terms)

    # -- evaluation ----------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.no_seg_count = 0

    def generate_answers(self, batch: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
        """Greedy answers and, for samples with a target mask, the scores of the mask decoded at ``<SEG>``."""
        if self.tokenizer is None:
            raise RuntimeError("GroundingVLMModule needs a tokenizer to generate")
        self.moe.end()  # KV-cache steps route every token, whatever the last batch's mask
        settings = self.generation_settings()
        ids, masks = self.model.generate_with_masks(
            **grounded_inputs(batch, with_labels=False),
            **sam_inputs(batch),
            **settings,
            no_seg=self.hparams.no_seg_mask,
        )
        seg_produced = (ids == self.model.seg_token_id).any(dim=1).tolist()  # (B,)
        texts = decode_answers(self.tokenizer, ids, settings["eos_token_id"])
        records = batch["records"]
        targets = batch.get("masks") or [None] * len(records)
        extras = [
            {} if target is None else self.score_mask(record, masks[index], target, seg_produced=seg_produced[index])
            for index, (record, target) in enumerate(zip(records, targets, strict=True))
        ]
        return texts, extras

    def score_mask(
        self, record: Any, logits: torch.Tensor | None, target: torch.Tensor, *, seg_produced: bool
    ) -> dict[str, Any]:
        """Per-image MedPLIB IoU / Dice and MONAI's pixel Dice; no mask (``no_seg_mask: none``) scores IoU 0."""
        pred = None if logits is None else binarize(logits.float().cpu(), self.hparams.mask_threshold)  # (H, W)
        if not seg_produced:
            self.no_seg_count += 1
        iou = mask_iou(pred, target.cpu())
        if len(self.overlay_samples) < self.hparams.overlay_count:
            self.overlay_samples.append(OverlaySample(record=record, pred=pred, target=target.cpu()))
        return {
            "seg_produced": seg_produced,
            **({} if seg_produced else {"no_seg_mask": self.hparams.no_seg_mask}),
            "iou": iou,
            "dice": dice_from_iou(iou),
            "pixel_dice": pixel_dice(pred, target.cpu()),
        }


def grounding_module_settings(cfg: Any, stage: Any = None) -> dict[str, Any]:
    """GroundingVLMModule's loss weights and evaluation settings from an experiment config (empty without
    ``model.grounding``): the stage's ``grounding_loss`` when set, else ``model.grounding.loss``."""
    grounding = cfg.model.get("grounding")
    if grounding is None:
        return {}
    loss = stage.grounding_loss if stage is not None and stage.get("grounding_loss") is not None else grounding.loss
    return {
        "ce_weight": loss.ce,
        "bce_weight": loss.bce,
        "dice_weight": loss.dice,
        "focal_weight": loss.focal,
        "focal_gamma": loss.focal_gamma,
        "mask_threshold": cfg.evaluation.mask_threshold,
        "no_seg_mask": cfg.evaluation.no_seg_mask,
        "overlay_count": grounding.overlays,
    }
