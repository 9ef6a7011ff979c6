"""Pixel grounding (LISA / MedPLIB): the LLM hidden state that predicts ``<SEG>`` prompts SAM's mask decoder.

Pieces, in the order a batch meets them:

- ``sam_pixel_values`` (B, 3, S, S): SAM's own copy of each image, prepared by the dataset
  (``datamodules.images.SamImageTransform``: resize the longest side to S, normalise, pad
  bottom/right with zeros to S x S), with each image's resized (h, w) and original (H, W) sizes.
- :func:`seg_hidden_states` (teacher forcing) and :func:`generation_seg_hidden_states` (greedy
  generation): the last-layer hidden state of the position whose next-token prediction is
  ``<SEG>``. Every ``<SEG>`` counts; each one yields one mask.
- :class:`GroundingHead`: ``seg_projection`` MLP (d_llm -> d_llm -> prompt_dim) + a transformers
  ``SamModel`` whose image and prompt encoders are frozen and whose mask decoder trains. The projected
  embedding is the single sparse prompt token; the dense prompt is SAM's "no mask" embedding;
  ``multimask_output=False`` gives one mask per ``<SEG>``.
- :func:`postprocess_mask`: low-res logits -> padded input size S -> crop the bottom/right padding to
  the resized (h, w) -> bilinear to the original (H, W). (MedPLIB's released code pads SAM inputs in
  the centre and crops the 4x-downsampled logits with full-resolution offsets, which misplaces masks of
  non-square images; this follows SAM's own pre- and post-processing instead.)

No ``<SEG>`` in a generated answer: :meth:`GroundingHead.predict` returns None for that sample (the
MedPLIB metrics score a missing mask as IoU 0) and adds one to ``no_seg_count``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SEG_TOKEN = "<SEG>"
Size = tuple[int, int]


def load_sam(path: str | Path) -> nn.Module:
    """A transformers ``SamModel`` from a checkpoint directory (``config.json`` + weights)."""
    from transformers import SamModel

    return SamModel.from_pretrained(path)


def postprocess_mask(
    low_res_logits: torch.Tensor, *, padded_size: int, resized_size: Size, original_size: Size
) -> torch.Tensor:
    """(h', w') low-res mask logits -> (H, W) logits at the original resolution.

    Upsample to the padded input (S, S), keep the top-left resized (h, w) block (the image; the rest
    is SAM's bottom/right padding), then resize bilinearly to the original (H, W).
    """
    logits = low_res_logits[None, None]  # (1, 1, h', w')
    logits = F.interpolate(
        logits, size=(padded_size, padded_size), mode="bilinear", align_corners=False
    )  # (1, 1, S, S)
    logits = logits[..., : resized_size[0], : resized_size[1]]  # (1, 1, h, w): padding cropped
    logits = F.interpolate(logits, size=tuple(original_size), mode="bilinear", align_corners=False)  # (1, 1, H, W)
    return logits[0, 0]  # (H, W)


# -- where the <SEG> embeddings come from -----------------------------------------------------------


def seg_hidden_states(
    hidden: torch.Tensor, input_ids: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: hidden (B, T, D), input_ids (B, T) -> (embeddings (N, D), batch_index (N,)).

    Position t-1 predicts token t, so a ``<SEG>`` at t contributes ``hidden[b, t-1]``. Every
    ``<SEG>`` of a sample is used, in reading order (row-major: sample by sample, left to right);
    a sample without one contributes nothing. A ``<SEG>`` at position 0 has no predicting position
    and is skipped.
    """
    predicts_seg = input_ids[:, 1:] == seg_token_id  # (B, T-1): position t predicts <SEG> at t+1
    embeddings = hidden[:, :-1][predicts_seg]  # (N, D)
    batch_index = predicts_seg.nonzero()[:, 0]  # (N,)
    return embeddings, batch_index


def generation_seg_hidden_states(
    step_hidden: Sequence[torch.Tensor], generated_ids: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation: the hidden state that produced each generated ``<SEG>``.

    ``step_hidden[k]`` is the last-layer hidden state of generation step k, (B, t_k, D) (the whole
    prompt at step 0, one position afterwards; with transformers' ``generate`` that is
    ``out.hidden_states[k][-1]`` under ``output_hidden_states=True, return_dict_in_generate=True``).
    Its last position produced ``generated_ids[:, k]`` (B, K: the new tokens only). Returns
    (embeddings (N, D), batch_index (N,)) in the same order as :func:`seg_hidden_states`.
    """
    steps = generated_ids.shape[1]
    producing = torch.stack([h[:, -1] for h in step_hidden[:steps]], dim=1)  # (B, K, D)
    is_seg = generated_ids == seg_token_id  # (B, K)
    return producing[is_seg], is_seg.nonzero()[:, 0]  # (N, D), (N,)


def pair_with_targets(
    masks: Sequence[torch.Tensor],
    batch_index: torch.Tensor,
    targets: Sequence[torch.Tensor | Sequence[torch.Tensor] | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Training: the k-th ``<SEG>`` of sample b pairs with sample b's k-th target mask.

    ``targets[b]`` is one (H, W) mask, a list of them, or None. Returns (predictions, targets,
    unpaired) where ``unpaired`` counts ``<SEG>`` masks without a target (dropped from the mask loss;
    a target without a ``<SEG>``, e.g. truncated away, simply has no prediction).
    """
    predictions, paired, unpaired = [], [], 0
    seen: dict[int, int] = {}
    for mask, sample in zip(masks, batch_index.tolist(), strict=True):
        k = seen.get(sample, 0)
        seen[sample] = k + 1
        target = targets[sample]
        sample_targets = [] if target is None else [target] if isinstance(target, torch.Tensor) else list(target)
        if k < len(sample_targets):
            predictions.append(mask)
            paired.append(sample_targets[k])
        else:
            unpaired += 1
    return predictions, paired, unpaired


# -- the head -------------------------------------------------------------------------------------


class GroundingHead(nn.Module):
    """``<SEG>`` embedding -> SAM mask logits at each image's original resolution.

    ``sam`` is a transformers ``SamModel`` (:func:`load_sam`). Its image encoder and prompt encoder
    (and the shared positional embedding) are frozen and stay in eval mode; the mask decoder trains
    unless ``train_mask_decoder=False`` - except its IoU head and the hypernetwork MLPs of the three
    multimask outputs, which never influence the single mask (no gradient reaches them in LISA /
    MedPLIB either) and are frozen. ``seg_projection`` is LISA's ``text_hidden_fcs``:
    Linear(d_llm, d_llm) -> ReLU -> Linear(d_llm, prompt_dim).
    """

    def __init__(self, *, sam: nn.Module, llm_hidden_size: int, train_mask_decoder: bool = True) -> None:
        super().__init__()
        config = sam.config
        self.sam = sam
        self.image_size = int(config.vision_config.image_size)
        self.prompt_dim = int(config.prompt_encoder_config.hidden_size)
        self.embedding_size = int(config.prompt_encoder_config.image_embedding_size)
        self.seg_projection = nn.Sequential(
            nn.Linear(llm_hidden_size, llm_hidden_size), nn.ReLU(), nn.Linear(llm_hidden_size, self.prompt_dim)
        )
        self.sam.requires_grad_(False)
        if train_mask_decoder:
            decoder = self.sam.mask_decoder
            decoder.requires_grad_(True)
            # cannot affect the single (multimask_output=False) mask: kept frozen so that every
            # trainable parameter gets a gradient each step (DDP without find_unused_parameters)
            decoder.iou_prediction_head.requires_grad_(False)
            decoder.output_hypernetworks_mlps[1:].requires_grad_(False)
        self.no_seg_count = 0  # samples whose generated answer had no <SEG> (see predict)

    def train(self, mode: bool = True) -> GroundingHead:
        """Train mode for the projection and mask decoder; the frozen encoders stay in eval mode."""
        super().train(mode)
        self.sam.vision_encoder.eval()
        self.sam.prompt_encoder.eval()
        return self

    # -- steps ------------------------------------------------------------------------------------
    def image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, g, g), without autograd (the image encoder is frozen)."""
        dtype = next(self.sam.vision_encoder.parameters()).dtype
        with torch.no_grad():
            return self.sam.get_image_embeddings(sam_pixel_values.to(dtype))

    def decode(self, *, image_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Mask decoder, one sparse prompt token per mask: (N, C, g, g), (N, C) -> (N, 4g, 4g) logits."""
        count, channels, height, width = image_embeddings.shape
        decoder_dtype = self.sam.mask_decoder.iou_token.weight.dtype
        sparse = prompt_embeddings.to(decoder_dtype)[:, None, None, :]  # (N, 1, 1, C): 1 prompt set of 1 token
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight  # (1, C)
        dense = no_mask.reshape(1, channels, 1, 1).expand(count, channels, height, width)  # (N, C, g, g)
        positional = self.sam.get_image_wide_positional_embeddings()  # (1, C, g, g)
        positional = positional.expand(count, -1, -1, -1).to(decoder_dtype)  # (N, C, g, g)
        masks, _iou = self.sam.mask_decoder(
            image_embeddings=image_embeddings.to(decoder_dtype),
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(decoder_dtype),
            multimask_output=False,
        )  # masks (N, 1, 1, 4g, 4g)
        return masks[:, 0, 0]  # (N, 4g, 4g)

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        *,
        sam_pixel_values: torch.Tensor,
        seg_embeddings: torch.Tensor,
        batch_index: torch.Tensor,
        original_sizes: Sequence[Size],
        resized_sizes: Sequence[Size],
    ) -> list[torch.Tensor]:
        """One (H_b, W_b) logit mask per ``<SEG>``, at its image's original resolution.

        ``sam_pixel_values`` (B, 3, S, S) and the size lists (length B) are per sample of the batch;
        ``seg_embeddings`` (N, d_llm) are raw LLM hidden states (projected here) and ``batch_index``
        (N,) names each one's sample. Only images that have a ``<SEG>`` go through the encoder.
        """
        if seg_embeddings.shape[0] == 0:
            return []
        used, position = torch.unique(batch_index, return_inverse=True)  # (U,), (N,)
        embeddings = self.image_embeddings(sam_pixel_values[used])  # (U, C, g, g)
        prompts = self.seg_projection(seg_embeddings)  # (N, prompt_dim)
        low_res = self.decode(image_embeddings=embeddings[position], prompt_embeddings=prompts)  # (N, 4g, 4g)
        return [
            postprocess_mask(
                low_res[i],
                padded_size=self.image_size,
                resized_size=tuple(resized_sizes[b]),
                original_size=tuple(original_sizes[b]),
            )
            for i, b in enumerate(batch_index.tolist())
        ]

    @torch.no_grad()
    def predict(
        self,
        *,
        sam_pixel_values: torch.Tensor,
        seg_embeddings: torch.Tensor,
        batch_index: torch.Tensor,
        original_sizes: Sequence[Size],
        resized_sizes: Sequence[Size],
    ) -> list[torch.Tensor | None]:
        """Evaluation: one mask (logits) per sample - its first ``<SEG>``'s - or None without a ``<SEG>``.

        A None is the documented fallback: MedPLIB's scoring counts it as IoU 0, and it is added to
        ``no_seg_count`` so the rate can be logged (reset it per evaluation with ``no_seg_count = 0``).
        """
        batch_size = sam_pixel_values.shape[0]
        first_of_sample: dict[int, int] = {}
        for i, sample in enumerate(batch_index.tolist()):
            first_of_sample.setdefault(sample, i)
        keep = torch.tensor(list(first_of_sample.values()), dtype=torch.long, device=batch_index.device)  # (U,)
        masks = self.forward(
            sam_pixel_values=sam_pixel_values,
            seg_embeddings=seg_embeddings[keep],
            batch_index=batch_index[keep],
            original_sizes=original_sizes,
            resized_sizes=resized_sizes,
        )
        by_sample = dict(zip(batch_index[keep].tolist(), masks, strict=True))
        self.no_seg_count += batch_size - len(by_sample)
        return [by_sample.get(b) for b in range(batch_size)]

    def zero_loss(self) -> torch.Tensor:
        """0 with a grad_fn over every trainable parameter of the head: the mask loss of a batch
        without masks, so DDP sees gradients (of zero) for the decoder and projection every step."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return torch.zeros(())
        return torch.stack([p.sum() for p in params]).sum() * 0.0
