"""MedPLIB's model: the LLaVA-shaped model plus a SAM grounding head and a region-prompt adapter.

:class:`GroundedMultimodalLM` is a :class:`MultimodalLM` with two more parts:

- ``grounding`` (:class:`GroundingHead`): the last-layer hidden state of the position that predicts
  ``<SEG>`` -> ``seg_projection`` MLP -> sparse prompt of SAM's mask decoder -> one mask per ``<SEG>``
  at the image's original resolution (:meth:`segment`, :meth:`generate_with_masks`);
- ``region`` (:class:`RegionEncoder`, optional): the vision tower's patch features under a region mask
  pooled into one token, written over the ``<region_feat>`` placeholder the encoder puts between
  ``<region>`` and ``</region>`` (:meth:`embed`).

The LightningModule (``lightningmodules/grounding_module.py``) owns the CE + mask losses. Tokens:
:data:`GROUNDING_TOKENS` are added to the tokenizer by ``pipeline/model_factory.py`` when
``model.grounding`` is set (embeddings resized with mean initialisation, as for ``<image>``).

Generation: greedy decoding first, then - only for batches where a ``<SEG>`` was generated - one
teacher-forced pass over prompt + generated tokens gives the hidden state that produced each
``<SEG>`` (the same positions and positional ids as in training, where right padding makes
positions 0..T-1). A sample without ``<SEG>`` gets no mask: the fallback is None, scored as IoU 0
by MedPLIB's metrics and counted in ``grounding.no_seg_count``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightningmodules.models.grounding import SEG_TOKEN, GroundingHead, seg_hidden_states
from lightningmodules.models.multimodal import IGNORE_INDEX, MultimodalLM, MultimodalOutput
from lightningmodules.models.region import (
    REGION_END,
    REGION_PLACEHOLDER,
    REGION_START,
    RegionEncoder,
    region_grid_weights,
    splice_region_tokens,
)

MASK_START, MASK_END = "<mask>", "</mask>"
# MedPLIB's added tokens, plus the placeholder the region token is written over
GROUNDING_TOKENS = [SEG_TOKEN, REGION_START, REGION_END, MASK_START, MASK_END, REGION_PLACEHOLDER]


class GroundedMultimodalLM(MultimodalLM):
    """``MultimodalLM`` + ``grounding`` head + optional ``region`` encoder (see the module docstring).

    ``image_transform`` is the vision tower's ``ImageTransform``: region masks follow the image through
    its pad / resize / crop onto the patch grid (``region_grid_weights``).
    """

    def __init__(
        self,
        *,
        grounding: GroundingHead,
        seg_token_id: int,
        region: RegionEncoder | None = None,
        region_token_id: int | None = None,
        image_transform: Any = None,
        **parts: Any,
    ) -> None:
        super().__init__(**parts)
        self.grounding = grounding
        self.region = region
        self.seg_token_id = int(seg_token_id)
        self.region_token_id = None if region_token_id is None else int(region_token_id)
        self.image_transform = image_transform

    def train(self, mode: bool = True) -> GroundedMultimodalLM:
        super().train(mode)
        self.grounding.train(mode)  # keeps SAM's frozen encoders in eval mode
        return self

    # -- regions -----------------------------------------------------------------------------------
    def region_weights(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """(H_i, W_i) masks at original resolution -> (R, G, G) patch coverage on the vision grid."""
        grid = self.region.grid_size
        return torch.stack(
            [region_grid_weights(m.cpu(), grid_size=grid, image_transform=self.image_transform) for m in masks]
        )  # (R, G, G)

    def region_tokens(
        self, input_ids: torch.Tensor, features: torch.Tensor | None, region_masks: Sequence[Any] | None
    ) -> torch.Tensor | None:
        """(R, d_llm) tokens for the ``<region_feat>`` placeholders, in reading order; None without any."""
        if self.region is None or self.region_token_id is None:
            return None
        placeholders = input_ids == self.region_token_id  # (B, T)
        per_sample = placeholders.sum(dim=1).tolist()  # (B,)
        if sum(per_sample) == 0:
            return None
        has_image = (input_ids == self.image_token_id).any(dim=1)  # (B,)
        image_index = torch.cumsum(has_image.long(), 0) - 1  # (B,): sample -> row of pixel_values
        masks, rows = [], []
        for b, count in enumerate(per_sample):
            if count == 0:
                continue
            given = None if region_masks is None else region_masks[b]
            sample_masks = [] if given is None else [given] if isinstance(given, torch.Tensor) else list(given)
            if len(sample_masks) != count or not bool(has_image[b]):
                raise ValueError(
                    f"sample {b}: {count} <region> prompt(s) but {len(sample_masks)} region mask(s) "
                    f"{'' if has_image[b] else 'and no image '}in the batch ('region_masks')"
                )
            masks += sample_masks
            rows += [int(image_index[b])] * count
        weights = self.region_weights(masks).to(features.device)  # (R, G, G)
        return self.region(features[rows], weights)  # (R, d_llm)

    # -- forward -----------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_task_ids: torch.Tensor | None = None,
        region_masks: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with visual tokens at image positions and region tokens at placeholders."""
        embeds = self.input_embeddings()(input_ids)  # (B, T, D)
        image_positions = input_ids == self.image_token_id  # (B, T)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(image_positions.sum()) != n_images * self.num_image_tokens:
            raise ValueError(
                f"batch has {int(image_positions.sum())} image-token positions but {n_images} images x "
                f"{self.num_image_tokens} tokens; the collator and model disagree on num_image_tokens"
            )
        features = None
        if n_images:
            features = self.vision(pixel_values)  # (N, P, D_vision)
            visual = self.connector(self.aggregation(features), task_ids=image_task_ids).to(embeds.dtype)  # (N, I, D)
            embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        tokens = self.region_tokens(input_ids, features, region_masks)
        if tokens is not None:
            embeds = splice_region_tokens(embeds, input_ids, tokens, placeholder_id=self.region_token_id)
        elif self.region is not None and self.training and self.region.adapter.weight.requires_grad:
            # no region in this batch: an exact 0 keeps the adapter in the graph (DDP without unused parameters)
            embeds = embeds + 0.0 * (self.region.adapter.weight.sum() + self.region.adapter.bias.sum())
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_task_ids: torch.Tensor | None = None,
        region_masks: Sequence[Any] | None = None,
        **_: object,
    ) -> MultimodalOutput:
        embeds = self.embed(input_ids, pixel_values, image_task_ids, region_masks)
        hidden = self.decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, D)
        loss, count = None, 0
        if labels is not None:
            targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
            supervised = targets != IGNORE_INDEX  # (B, T-1)
            count = int(supervised.sum())
            logits = self.lm_head()(hidden[:, :-1][supervised])  # (n_targets, V)
            loss = F.cross_entropy(logits.float(), targets[supervised]) if count else hidden.sum() * 0.0
        return MultimodalOutput(loss=loss, hidden_states=hidden, token_count=count)

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
        region_masks: Sequence[Any] | None = None,
        *,
        sam_pixel_values: torch.Tensor | None,
        image_sizes: Sequence[Any] | None,
        sam_resized_sizes: Sequence[Any] | None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, list[Any]]:
        """Greedy answers (B, K) and per sample the first ``<SEG>``'s (H, W) mask logits or None (fallback)."""
        embeds = self.embed(input_ids, pixel_values, image_task_ids, region_masks)  # (B, T, D)
        generated = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
        )  # (B, K)
        batch = input_ids.shape[0]
        produced = generated == self.seg_token_id  # (B, K)
        if sam_pixel_values is None or not bool(produced.any()):
            self.grounding.no_seg_count += batch if sam_pixel_values is not None else 0
            return generated, [None] * batch
        hidden = self.generated_hidden_states(embeds, attention_mask, generated, pad_token_id)  # (B, T+K, D)
        prompt_length = input_ids.shape[1]
        predicts_seg = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # (B, T+K)
        predicts_seg[:, prompt_length - 1 : -1] = produced  # position t produced token t+1
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
