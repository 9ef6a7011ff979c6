"""The LLaVA-shaped model: vision tower -> connector -> causal LM, with image tokens spliced in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SAMPLING_KEYS = ("temperature", "top_p", "top_k")  # apply with do_sample only


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded (``evaluation.*`` in the config); the defaults are plain greedy decoding.

    ``num_beams`` > 1: beam search; ``do_sample``: draws from torch's global generator; ``temperature`` /
    ``top_p`` / ``top_k`` (sampling only; None = 1.0 / no nucleus filter / no top-k filter, not HF's 50);
    ``repetition_penalty`` (None = none)."""

    num_beams: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


GREEDY = Decoding()


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

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., V) as the LLM's own forward computes them: the LM head,
        then the family's transform of the logits (:func:`family_logits`)."""
        return family_logits(self.lm_head()(hidden), self.llm.config)

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
            logits = self.output_logits(hidden[:, :-1][supervised])  # (n_targets, V)
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
        decoding: Decoding = GREEDY,
        **inputs: Any,
    ) -> torch.Tensor:
        """Decoding with KV cache for a left-padded batch (greedy by default); returns (B, <=max_new_tokens).

        See :meth:`generate_from_embeds` for the stop tokens and the decoding settings."""
        embeds = self.embed(input_ids, pixel_values, image_task_ids, **inputs)
        return self.generate_from_embeds(
            embeds,
            attention_mask,
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            decoding=decoding,
        )

    def stop_token_ids(self, eos_token_id: int | list[int] | None = None) -> list[int]:
        """``eos_token_id`` (the caller's: tokenizer eos, end-of-turn token) followed by the checkpoint's
        generation-config eos ids (e.g. Gemma-2-it ``[1, 107]``), without repeats."""
        return unique_ids(eos_token_id, self.llm.generation_config.eos_token_id)

    @torch.no_grad()
    def generate_from_embeds(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        decoding: Decoding = GREEDY,
    ) -> torch.Tensor:
        """Decoding from prompt embeddings (B, T, D) (:meth:`embed`); returns the new tokens (B, <=max_new_tokens).

        Only the settings passed here apply (:func:`decoding_config`): nothing comes from the checkpoint's
        ``generation_config.json`` (HF fills every unset field of a passed config from the model's, so the
        model's is swapped for a neutral one for the call). The defaults are greedy in the strict sense: no
        repetition penalty, sampling or other logits processing. Decoding stops at any of :meth:`stop_token_ids`.
        ``input_ids`` (B, T), the prompt's ids, let ``repetition_penalty`` count the prompt's tokens too, as
        HF's ``generate(input_ids)`` does (the image / region placeholders count as prompt tokens: the model
        never emits them); without them only the generated tokens are penalised.
        """
        config = decoding_config(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=self.stop_token_ids(eos_token_id),
            pad_token_id=pad_token_id,
            decoding=decoding,
        )
        prompt = {} if input_ids is None else {"input_ids": input_ids}
        with neutral_generation_config(self.llm):
            out = self.llm.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config, **prompt
            )
        return out if input_ids is None else out[:, input_ids.shape[1] :]  # HF returns prompt + new ids then


def unique_ids(*ids: int | list[int] | None) -> list[int]:
    """Token ids (each an int, a list or None) flattened in order, without repeats."""
    out: list[int] = []
    for value in ids:
        for token in [] if value is None else [value] if isinstance(value, int) else value:
            if token not in out:
                out.append(int(token))
    return out


def decoding_config(
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_token_id: list[int],
    pad_token_id: int | None,
    decoding: Decoding = GREEDY,
):
    """A ``GenerationConfig`` with HF's global defaults (no penalty, no sampling, one beam) and the given
    settings; the defaults are plain greedy decoding.

    ``num_beams`` > 1: beam search (HF's ``length_penalty`` 1, ``early_stopping`` False); ``do_sample``: draws
    from torch's global generator; ``temperature`` / ``top_p`` / ``top_k`` (sampling only; None = 1.0 / no
    nucleus filter / no top-k filter, not HF's 50); ``repetition_penalty`` (None = none)."""
    from transformers import GenerationConfig

    num_beams, do_sample, repetition_penalty = decoding.num_beams, decoding.do_sample, decoding.repetition_penalty
    temperature, top_p, top_k = decoding.temperature, decoding.top_p, decoding.top_k
    if not do_sample:
        given = [
            key for key, value in zip(SAMPLING_KEYS, (temperature, top_p, top_k), strict=True) if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} apply to sampling only: set do_sample=True or leave them None")
    settings = {
        **GenerationConfig._get_default_generation_params(),
        "do_sample": do_sample,
        "num_beams": num_beams,
        "use_cache": True,
        "max_length": None,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens or None,
        "eos_token_id": eos_token_id or None,
        "pad_token_id": pad_token_id,
    }
    if repetition_penalty is not None:
        settings["repetition_penalty"] = repetition_penalty
    if do_sample:
        settings["temperature"] = 1.0 if temperature is None else temperature
        settings["top_p"] = 1.0 if top_p is None else top_p
        settings["top_k"] = 0 if top_k is None else top_k  # 0: HF adds no top-k filter
    return GenerationConfig(**settings)


@contextmanager
def neutral_generation_config(llm: nn.Module) -> Iterator[None]:
    """Within the block, ``llm.generation_config`` is an empty one: ``generate`` then takes nothing from
    the checkpoint's (``penalty``, ``temperature``, ``suppress_tokens``, ``cache_implementation``...).
    A LoRA-wrapped LLM (PEFT) reads its base model's, so the swap happens there."""
    from transformers import GenerationConfig

    hf_model = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    checkpoint = hf_model.generation_config
    hf_model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf_model.generation_config = checkpoint


def family_logits(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """The transform a family's ``ForCausalLM.forward`` applies after the LM head, from its config:
    Cohere's ``logit_scale`` (multiply), Granite's ``logits_scaling`` (divide), Gemma-2/3's
    ``final_logit_softcapping`` (``cap * tanh(logits / cap)``). Other families: unchanged."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
