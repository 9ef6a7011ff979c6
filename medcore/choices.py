"""Config choices that parts outside the config also check: one ``Literal`` per choice, its values as a tuple.

The config schema (``pipeline/config/schema.py``) types its fields with these, so OmegaConf rejects any
other value when a YAML layer is merged; the parts (aggregation, CMoE connector, LR schedules, the tiny
model zoo) check their keyword arguments against the same tuples.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "AGGREGATIONS",
    "CONVERSATION_PRESETS",
    "REGION_POOLINGS",
    "ROUTER_INPUTS",
    "SCHEDULERS",
    "TINY_LLM_FAMILIES",
    "TINY_MODELS",
    "TINY_TOWERS",
    "WEIGHTINGS",
    "Aggregation",
    "ConversationPreset",
    "RegionPooling",
    "RouterInput",
    "Scheduler",
    "TinyLLMFamily",
    "TinyModel",
    "TinyTower",
    "Weighting",
]

# visual tokens before the connector (lightningmodules/models/aggregation.py)
Aggregation = Literal["none", "concat4", "avgpool", "maxpool"]
# what the CMoE router reads (lightningmodules/models/cmoe.py)
RouterInput = Literal["task_token", "token", "task"]
# how CMoE mixes its experts: hard = task t -> expert t mod E, constant = 1/E
Weighting = Literal["soft", "sparse", "hard", "constant"]
# learning-rate schedule after warmup (lightningmodules/schedules.py)
Scheduler = Literal["cosine", "linear", "constant"]
# where the decay's progress starts counting: after the warmup, or at step 0 (LAVIS / Uni-Med)
DecayFrom = Literal["warmup_end", "start"]
# which routed assignments an over-full MoE expert keeps: the first in token order (GShard) or a random subset
# (DeepSpeed's top1gating with use_rts; MedPLIB stage IV)
DropPolicy = Literal["position", "random"]
# model.init: released checkpoint layouts medpipe imports (pipeline/importers): LLaVA-1.5 / LLaVA-Med v1.5 as
# released, transformers' Llava, MoE-LLaVA / Med-MoE (moe_llava), MedPLIB (medplib), Uni-Med (uni_med)
ImportFormat = Literal["llava", "hf_llava", "moe_llava", "medplib", "uni_med"]
# MedPLIB evaluation, an answer without <SEG>: its mask from the hidden state that produced the answer's last token
# before the stop (5ab54bc's evaluate), or none (IoU 0; the first release 9c3efe9)
NoSegMask = Literal["last_answer_token", "none"]
# how a MedPLIB region prompt becomes one token (lightningmodules/models/region.py): "points" = the released
# code (bilinear samples at up to region_max_points random mask pixels, averaged), "area" = coverage-weighted
# mean of the patch features
RegionPooling = Literal["points", "area"]
# what a tiny:<name> model path may name (pipeline/zoo builds them; "tokenizer" is not a model)
TinyModel = Literal["clip", "llama", "phi", "qwen2", "stablelm", "sam", "medsam"]
# LLaVA-family conversation templates as chat templates (medcore/conversations.py, model.llm.conversation)
ConversationPreset = Literal["vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct", "plain", "phi", "stablelm"]
# real-architecture checkpoints at tiny sizes, saved as each family's download looks (pipeline/zoo/families)
TinyLLMFamily = Literal[
    "llama2-chat",
    "vicuna",
    "mistral-instruct",
    "phi2",
    "stablelm2",
    "qwen2-instruct",
    "qwen3",
    "gemma2-it",
    "llama3-instruct",
]
TinyTower = Literal["clip-336", "siglip", "siglip-odd", "dinov2-reg"]

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
ROUTER_INPUTS: tuple[str, ...] = get_args(RouterInput)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
DECAY_FROM: tuple[str, ...] = get_args(DecayFrom)
DROP_POLICIES: tuple[str, ...] = get_args(DropPolicy)
IMPORT_FORMATS: tuple[str, ...] = get_args(ImportFormat)
REGION_POOLINGS: tuple[str, ...] = get_args(RegionPooling)
TINY_LLM_FAMILIES: tuple[str, ...] = get_args(TinyLLMFamily)
TINY_TOWERS: tuple[str, ...] = get_args(TinyTower)
TINY_MODELS: tuple[str, ...] = get_args(TinyModel) + TINY_LLM_FAMILIES + TINY_TOWERS
CONVERSATION_PRESETS: tuple[str, ...] = get_args(ConversationPreset)
