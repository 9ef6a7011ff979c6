"""MedPLIB's model: the LLaVA-shaped model plus a SAM grounding head and a region-prompt adapter.

:class:`GroundedMultimodalLM` is a :class:`MultimodalLM` with two more parts:

- ``grounding`` (:class:`GroundingHead`): the last-layer hidden state of the position that predicts
  ``<SEG>`` -> ``seg_projection`` MLP -> sparse prompt of SAM's mask decoder -> one mask per ``<SEG>``
  at the image's original resolution (:meth:`segment`, :meth:`generate_with_masks`);
- ``region`` (:class:`RegionEncoder`, optional): the vision tower's patch features under a region
  pooled into one token, written over the ``<region_feat>`` placeholder the encoder puts between
  ``<region>`` and ``</region>`` (the :meth:`extra_embeddings` hook of ``MultimodalLM.embed``). The
  collator hands over each region, in reading order, as its mask at the vision input resolution
  ``region_masks_input`` (R, H_in, W_in) bool, its soft patch coverage ``region_weights`` (R, G, G), and
  ``region_batch_index`` (R,), the sample of each (``datamodules/regions.py``). ``model.grounding.
  region_pooling`` "points" (MedPLIB's released code: bilinear samples of the patch map at up to 512 random
  mask pixels, averaged, then the adapter; an empty mask gives zeros) pools the masks; "area" (the
  coverage-weighted mean) pools the weights (``lightningmodules/models/region.py``).

The LightningModule (``lightningmodules/grounding_module.py``) owns the CE + mask losses. Tokens:
:data:`GROUNDING_TOKENS` are added to the tokenizer by ``pipeline/model_factory.py`` when
``model.grounding`` is set (embeddings resized with mean initialisation, as for ``<image>``).

Generation: greedy decoding first, then one teacher-forced pass over prompt + generated tokens gives
the hidden state that produced each ``<SEG>`` (the same positions and positional ids as in training,
where right padding makes positions 0..T-1). A sample without ``<SEG>`` (``no_seg``):

- ``"last_answer_token"`` (MedPLIB 5ab54bc ``MedPLIB.evaluate``: ``last_hidden_state[:, -2]`` of the
  generation's concatenated hidden states): the mask is decoded from the hidden state that produced the
  answer's last token before its end token, position ``T + L - 3`` for an answer of L tokens (its stop
  token included) after a prompt of T;
- ``"none"`` (MedPLIB's first release 9c3efe9, whose ``evaluate`` returns no mask): None, scored as IoU 0.

Either way the sample is counted in ``grounding.no_seg_count``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightningmodules.models.grounding import SEG_TOKEN, GroundingHead, seg_hidden_states
from lightningmodules.models.language import first_stops
from lightningmodules.models.multimodal import GREEDY, Decoding, MultimodalLM, unique_ids
from lightningmodules.models.region import (
    REGION_END,
    REGION_PLACEHOLDER,
    REGION_START,
    RegionEncoder,
    splice_region_tokens,
)
from medcore.choices import NoSegMask

MASK_START, MASK_END = "<mask>", "</mask>"
# MedPLIB's added tokens, plus the placeholder the region token is written over
GROUNDING_TOKENS = [SEG_TOKEN, REGION_START, REGION_END, MASK_START, MASK_END, REGION_PLACEHOLDER]


class GroundedMultimodalLM(MultimodalLM):
    """``MultimodalLM`` + ``grounding`` head + optional ``region`` encoder (see the module docstring)."""

    def __init__(
        self,
        *,
        grounding: GroundingHead,
        seg_token_id: int,
        region: RegionEncoder | None = None,
        region_token_id: int | None = None,
        **parts: Any,
    ) -> None:
        super().__init__(**parts)
        self.grounding = grounding
        self.region = region
        self.seg_token_id = int(seg_token_id)
        self.region_token_id = None if region_token_id is None else int(region_token_id)

    def train(self, mode: bool = True) -> GroundedMultimodalLM:
        super().train(mode)
        self.grounding.train(mode)  # keeps SAM's frozen encoders in eval mode
        return self

    # -- regions -----------------------------------------------------------------------------------
    def region_tokens(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None,
        region_weights: torch.Tensor | None,
        region_batch_index: torch.Tensor | None,
        region_masks_input: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """(R, d_llm) tokens for the ``<region_feat>`` placeholders, in reading order; None without any.

        ``region_masks_input`` (R, H_in, W_in) bool, ``region_weights`` (R, G, G) and ``region_batch_index``
        (R,) come sample by sample; the regions of a sample without placeholders (truncated away) are
        dropped. "points" pooling reads the masks; "area" the weights (the masks, area-pooled, without them).
        """
        if self.region is None or self.region_token_id is None:
            return None
        key, masks = "region_masks_input", region_masks_input
        if self.region.pooling == "area" and (region_weights is not None or region_masks_input is None):
            key, masks = "region_weights", region_weights
        if masks is None:
            region_batch_index = None  # no mask tensor: every placeholder lacks its region
        per_sample = (input_ids == self.region_token_id).sum(dim=1)  # (B,)
        if int(per_sample.sum()) == 0:
            return None
        samples = (
            torch.zeros(0, dtype=torch.long, device=input_ids.device)
            if region_batch_index is None
            else region_batch_index.to(input_ids.device)
        )  # (R,)
        given = torch.bincount(samples, minlength=input_ids.shape[0])  # (B,)
        has_image = (input_ids == self.image_token_id).any(dim=1)  # (B,)
        wrong = (per_sample > 0) & ((given != per_sample) | ~has_image)  # (B,)
        if bool(wrong.any()):
            b = int(wrong.nonzero()[0, 0])
            raise ValueError(
                f"sample {b}: {int(per_sample[b])} <region> prompt(s) but {int(given[b])} region mask(s) "
                f"{'' if has_image[b] else 'and no image '}in the batch ({key!r})"
            )
        image_index = torch.cumsum(has_image.long(), 0) - 1  # (B,): sample -> row of pixel_values
        kept = per_sample[samples] > 0  # (R,)
        masks = masks.to(image_features.device)[kept.to(image_features.device)]  # (R', H, W)
        return self.region(image_features[image_index[samples[kept]]], masks)  # (R', d_llm)

    def extra_embeddings(
        self,
        embeds: torch.Tensor,
        *,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None,
        region_weights: torch.Tensor | None = None,
        region_batch_index: torch.Tensor | None = None,
        region_masks_input: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Region tokens over the ``<region_feat>`` placeholders (the hook of ``MultimodalLM.embed``)."""
        tokens = self.region_tokens(input_ids, image_features, region_weights, region_batch_index, region_masks_input)
        if tokens is not None:
            return splice_region_tokens(embeds, input_ids, tokens, placeholder_id=self.region_token_id)
        if self.region is not None and self.training and self.region.adapter.weight.requires_grad:
            # no region in this batch: an exact 0 keeps the adapter in the graph (DDP without unused parameters)
            return embeds + 0.0 * (self.region.adapter.weight.sum() + self.region.adapter.bias.sum())
        return embeds

    # -- masks -------------------------------------------------------------------------------------
    def segment(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        sam_pixel_values: torch.Tensor,
        image_sizes: Sequence[Any],
        sam_resized_sizes: Sequence[Any],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher forcing: one (H_b, W_b) logit mask per ``<SEG>`` in ``input_ids`` and its sample index (N,)."""
        embeddings, batch_index = seg_hidden_states(hidden, input_ids, self.seg_token_id)  # (N, D), (N,)
        projection_dtype = self.grounding.seg_projection[0].weight.dtype
        masks = self.grounding(
            sam_pixel_values=sam_pixel_values,
            seg_embeddings=embeddings.to(projection_dtype),
            batch_index=batch_index,
            original_sizes=image_sizes,
            resized_sizes=sam_resized_sizes,
        )
        return masks, batch_index

    @torch.no_grad()
    def generate_with_masks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_task_ids: torch.Tensor | None = None,
        *,
        sam_pixel_values: torch.Tensor | None,
        image_sizes: Sequence[Any] | None,
        sam_resized_sizes: Sequence[Any] | None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        decoding: Decoding = GREEDY,
        no_seg: NoSegMask = "last_answer_token",
        **inputs: Any,
    ) -> tuple[torch.Tensor, list[Any]]:
        """Answers (B, K) (greedy by default; the decoding settings of :meth:`generate_from_embeds`) and per
        sample the first ``<SEG>``'s (H, W) mask logits, or for an answer without one what ``no_seg`` says
        (module docstring).

        ``inputs`` are the further model inputs of :meth:`embed` (``region_masks_input``, ``region_weights``,
        ``region_batch_index``).
        """
        embeds = self.embed(input_ids, pixel_values, image_task_ids, **inputs)  # (B, T, D)
        generated = self.generate_from_embeds(
            embeds,
            attention_mask,
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            decoding=decoding,
        )  # (B, K)
        batch = input_ids.shape[0]
        produced = generated == self.seg_token_id  # (B, K)
        without_seg = ~produced.any(dim=1)  # (B,)
        if sam_pixel_values is None or (no_seg == "none" and bool(without_seg.all())):
            self.grounding.no_seg_count += batch if sam_pixel_values is not None else 0
            return generated, [None] * batch
        hidden = self.generated_hidden_states(embeds, attention_mask, generated, pad_token_id)  # (B, T+K, D)
        prompt_length = input_ids.shape[1]
        predicts_seg = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # (B, T+K)
        predicts_seg[:, prompt_length - 1 : -1] = produced  # position t produced token t+1
        if no_seg == "last_answer_token" and bool(without_seg.any()):
            width = generated.shape[1]
            ends = first_stops(generated, unique_ids(eos_token_id))  # answer length = stop position + 1, or K
            lengths = torch.tensor([min(end + 1, width) for end in ends], device=generated.device)  # (B,)
            position = (prompt_length + lengths - 3).clamp(min=0)  # (B,) produced the last token before the stop
            rows = without_seg.nonzero()[:, 0]  # (B',)
            predicts_seg[rows, position[rows]] = True
            self.grounding.no_seg_count += int(without_seg.sum())  # predict() counts only samples without any
        projection_dtype = self.grounding.seg_projection[0].weight.dtype
        masks = self.grounding.predict(
            sam_pixel_values=sam_pixel_values,
            seg_embeddings=hidden[predicts_seg].to(projection_dtype),  # (N, D)
            batch_index=predicts_seg.nonzero()[:, 0],
            original_sizes=image_sizes,
            resized_sizes=sam_resized_sizes,
        )
        return generated, masks

    def generated_hidden_states(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, generated: torch.Tensor, pad_token_id: int | None
    ) -> torch.Tensor:
        """Last-layer hidden states over prompt (left-padded) + generated tokens: (B, T+K, D).

        Position ids count real tokens only (0 at each sample's first real token), as in training.
        """
        new_embeds = self.input_embeddings()(generated).to(embeds.dtype)  # (B, K, D)
        full = torch.cat([embeds, new_embeds], dim=1)  # (B, T+K, D)
        new_mask = torch.ones_like(generated, dtype=attention_mask.dtype)  # (B, K)
        mask = torch.cat([attention_mask, new_mask], dim=1)  # (B, T+K)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T+K)
        return self.decoder()(
            inputs_embeds=full, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, T+K, D)

    # -- trainable groups --------------------------------------------------------------------------
    def grounding_parameter_names(self) -> list[str]:
        """The ``grounding`` group: SEG projection + the mask decoder parts that shape the single mask."""
        head = self.grounding
        names = [f"grounding.seg_projection.{n}" for n, _ in head.seg_projection.named_parameters()]
        for n, _ in head.sam.mask_decoder.named_parameters():
            # the IoU head and the multimask hypernetworks never shape the single mask (kept frozen)
            skip = n.startswith("iou_prediction_head.") or (
                n.startswith("output_hypernetworks_mlps.") and not n.startswith("output_hypernetworks_mlps.0.")
            )
            if not skip:
                names.append(f"grounding.sam.mask_decoder.{n}")
        return names
