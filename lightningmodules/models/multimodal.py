"""The LLaVA-shaped model: vision tower -> connector -> causal LM, with image tokens spliced in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class MultimodalOutput:
    loss: torch.Tensor | None
    hidden_states: torch.Tensor  # (B, T, D) last layer, after the final norm
    token_count: int  # number of supervised target tokens in the batch


class MultimodalLM(nn.Module):
    """Composes the parts; owns no loss weighting, metrics or optimisers (the stage module does).

    The collator expands each ``<image>`` placeholder into ``num_image_tokens`` copies of
    ``image_token_id``; their embeddings are replaced by the connector's output, image by image.
    Samples without an image (text-only tasks) simply have no placeholder.
    """

    def __init__(
        self,
        *,
        vision: nn.Module,
        connector: nn.Module,
        llm: nn.Module,
        image_token_id: int,
        num_image_tokens: int,
        aggregation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.aggregation = aggregation if aggregation is not None else nn.Identity()
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def train(self, mode: bool = True) -> MultimodalLM:
        """Train mode for the learning parts; a frozen vision tower stays in eval mode."""
        super().train(mode)
        if getattr(self.vision, "frozen", False):
            self.vision.eval()
        return self

    # -- parts ---------------------------------------------------------------------------------
    def input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def decoder(self) -> nn.Module:
        """The LM body (embeddings -> blocks -> final norm) without the LM head."""
        return self.llm.get_decoder()

    def lm_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # -- forward -------------------------------------------------------------------------------
    def visual_tokens(self, features: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Vision features (N, P, D_vision) -> (N, num_image_tokens, D_llm): aggregation, then connector."""
        return self.connector(self.aggregation(features), task_ids=task_ids)

    def encode_images(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_image_tokens, D_llm)."""
        return self.visual_tokens(self.vision(pixel_values), task_ids)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_task_ids: torch.Tensor | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """Token embeddings with visual tokens at the image positions, then :meth:`extra_embeddings`: (B, T, D).

        ``inputs`` are the batch's further model inputs, handed to the hook (e.g. region weights).
        """
        embeds = self.input_embeddings()(input_ids)  # (B, T, D)
        image_positions = input_ids == self.image_token_id  # (B, T)
        n_positions = int(image_positions.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_positions != n_images * self.num_image_tokens:
            raise ValueError(
                f"batch has {n_positions} image-token positions but {n_images} images x "
                f"{self.num_image_tokens} tokens; the collator and model disagree on num_image_tokens"
            )
        features = None
        if n_images:
            features = self.vision(pixel_values)  # (N, P, D_vision)
            visual = self.visual_tokens(features, image_task_ids).to(embeds.dtype)  # (N, I, D)
            # row-major order of positions matches image order: sample by sample, left to right
            embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        return self.extra_embeddings(embeds, input_ids=input_ids, image_features=features, **inputs)

    def extra_embeddings(
        self, embeds: torch.Tensor, *, input_ids: torch.Tensor, image_features: torch.Tensor | None, **inputs: Any
    ) -> torch.Tensor:
        """Hook: write further tokens into ``embeds`` (B, T, D); ``image_features`` (N, P, D_vision) are the
        vision tower's output (None without images). The plain model adds nothing and ignores ``inputs``."""
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_task_ids: torch.Tensor | None = None,
        **inputs: Any,
    ) -> MultimodalOutput:
        """CE over the supervised targets and the last-layer hidden states (B, T, D); ``inputs`` go to :meth:`embed`."""
        embeds = self.embed(input_ids, pixel_values, image_task_ids, **inputs)
        out = self.decoder()(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, D)
        loss, count = None, 0
        if labels is not None:
            targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
            supervised = targets != IGNORE_INDEX
            count = int(supervised.sum())
            # the LM head only runs where there is a target: answers are a few % of the tokens
            logits = self.lm_head()(hidden[:, :-1][supervised])  # (n_targets, V)
            loss = F.cross_entropy(logits.float(), targets[supervised]) if count else hidden.sum() * 0.0
        return MultimodalOutput(loss=loss, hidden_states=hidden, token_count=count)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_task_ids: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """Greedy decoding with KV cache for a left-padded batch; returns (B, <=max_new_tokens)."""
        embeds = self.embed(input_ids, pixel_values, image_task_ids, **inputs)
        return self.generate_from_embeds(
            embeds,
            attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )

    @torch.no_grad()
    def generate_from_embeds(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding from prompt embeddings (B, T, D) (:meth:`embed`); returns (B, <=max_new_tokens)."""
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
