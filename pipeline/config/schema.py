"""The one typed schema every experiment YAML is validated against.

OmegaConf merges each YAML layer into these dataclasses, so an unknown key, a value of the wrong type or
a choice outside its ``Literal`` fails when the layer is merged, naming the layer. What a type cannot say
(ranges, one field against another in the same section) each dataclass lists in its ``problems(key)``,
beside its fields; :mod:`pipeline.config.validate` adds the references between sections and the paths on
disk. Defaults here are the shared defaults; experiments/defaults.yaml only documents and overrides.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from datamodules.problems import OnBadRecord
from datamodules.specs import DatasetSpec
from medcore.checks import Problem, choice, interval, positive
from medcore.choices import (
    Aggregation,
    ConversationPreset,
    DecayFrom,
    DropPolicy,
    ImportFormat,
    NoSegMask,
    RegionPooling,
    RouterInput,
    Scheduler,
    Weighting,
)
from pipeline.reproducibility import CPU_KERNELS
from pipeline.stages.kinds import is_router_stage
from pipeline.strategies import strategy_problem

ConnectorType = Literal["linear", "mlp", "cmoe"]
StageKind = Literal["vlm", "router"]  # router: Med-MoE's modality classifier on pooled LLM hidden states
# ffn: every decoder FFN (MoE experts + meta expert where converted), experts: MoE experts + meta experts,
# moe_router: the MoE token routers, modality_classifier: the router stage's classifier.
# MedPLIB (model.grounding): grounding = SEG projection + SAM mask decoder, region = the region-prompt adapter;
# embeddings = the LLM's input embeddings and LM head (LISA / MedPLIB train them: the added tokens' rows learn),
# norms = the LLM's normalisation layers (MedPLIB stage II: input / post-attention norms, and the final norm)
TrainableGroup = Literal[
    "connector", "lora", "llm", "vision", "ffn", "experts", "moe_router", "modality_classifier", "grounding", "region",
    "embeddings", "norms",
]  # fmt: skip
SamFormat = Literal["hf", "sam_med2d"]
MoELayerChoice = Literal["every_other", "all"]
RouterInit = Literal["random", "modality_classifier"]
SelectFeature = Literal["patch", "cls_patch"]
LLMDtype = Literal["float32", "bfloat16", "float16"]

TRAINABLE_GROUPS: tuple[str, ...] = get_args(TrainableGroup)  # a list field: checked in StageConfig.problems
MOE_LAYER_CHOICES: tuple[str, ...] = get_args(MoELayerChoice)  # or a list of indices: MoEConfig.problems
# a str field, not a Literal: YAML gives `precision: 32` as an int, which Lightning accepts as "32"
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
NO_AUTOCAST = ("32-true", "32")  # *-true half / 64-true: Lightning casts every weight, nothing is mixed
# groups whose float32 copies run inside a half-loaded LLM (LoRA casts its own input; new heads are float32)
LLM_FLOAT32_GROUPS = {"llm", "ffn", "experts", "moe_router", "embeddings"}


@dataclass
class VisionConfig:
    path: str = "tiny:clip"  # HF checkpoint dir, or tiny:<name> for the built-in tiny models
    select_layer: int = -2
    select_feature: SelectFeature = "patch"
    pad_square: bool = False  # LLaVA's expand2square with the mean colour before resizing
    dtype: LLMDtype = "float32"  # load dtype; trainable weights train in float32 (docs/scaling.md, precision)
    # path "timm:<model name>" (e.g. timm:eva_giant_patch14_clip_224, Uni-Med's EVA-CLIP ViT-g/14; needs the
    # optional extra medpipe[timm]) loads its weights from this local file; never downloaded
    checkpoint: str | None = None
    # a LayerNorm(hidden size) over the selected features, before the connector's aggregation (concat4): BLIP-2 /
    # MiniGPT-v2 / Uni-Med's ln_vision. Part of the vision tower (frozen with it, trains with the vision group),
    # created as the released code creates it: weight 1, bias 0, eps 1e-5, computed in float32
    output_norm: bool = False


@dataclass
class ConnectorConfig:
    type: ConnectorType = "mlp"
    aggregation: Aggregation = "none"  # visual tokens before the connector
    pool: int = 2  # pooling window for avgpool / maxpool
    # cmoe only (Uni-Med connector mixture-of-experts, lightningmodules/models/cmoe.py)
    num_experts: int = 5
    router_input: RouterInput = "task_token"
    weighting: Weighting = "soft"  # hard: task t -> expert t mod E, constant: 1/E
    top_k: int = 2  # experts per token for sparse
    router_hidden_ratio: float = 4.0  # router hidden width / router input width (paper: 4)
    num_tasks: int = 6  # learned task embeddings (task ids 0..num_tasks-1)
    task_embed_dim: int | None = None  # None: min(768, connector input width); 768 as in Uni-Med

    def problems(self, key: str) -> list[Problem]:
        found = [
            p
            for name in ("num_experts", "num_tasks", "router_hidden_ratio")
            for p in positive(f"{key}.{name}", getattr(self, name))
        ]
        if self.task_embed_dim is not None:
            found += positive(f"{key}.task_embed_dim", self.task_embed_dim)
        if self.weighting == "sparse" and not 1 <= self.top_k <= self.num_experts:
            found.append((f"{key}.top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}"))
        return found


@dataclass
class LLMConfig:
    path: str = "tiny:llama"
    dtype: LLMDtype = "float32"
    chat_template: str | None = None  # jinja; used when given or when the tokenizer has none
    # a LLaVA conversation template by name (medcore/conversations.py): prompts equal to the released code's
    # Conversation.get_prompt(), e.g. vicuna_v1 (LLaVA v1.5), mistral_instruct (LLaVA-Med v1.5), phi (Med-MoE);
    # replaces the tokenizer's template; not with chat_template
    conversation: ConversationPreset | None = None
    system_prompt: str | None = None  # merged into the first user turn when the template rejects a system role
    enable_thinking: bool = False  # templates with a thinking switch (Qwen3): off = no reasoning block trained
    attn_implementation: str | None = None
    trust_remote_code: bool = False  # never on unless set: remote code runs from the checkpoint
    gradient_checkpointing: bool = False

    def problems(self, key: str) -> list[Problem]:
        if self.chat_template is not None and self.conversation is not None:
            return [
                (
                    f"{key}.conversation",
                    f"set either {key}.chat_template or {key}.conversation, not both "
                    f"(conversation={self.conversation!r} is a chat template)",
                )
            ]
        return []


@dataclass
class InitConfig:
    """Start from a released checkpoint (pipeline/importers): its weights fill the model built from ``model:``
    (the LLM and connector, and the vision tower when the checkpoint has it), every key accounted for."""

    # llava: LLaVA-1.5 / LLaVA-Med v1.5 as released; hf_llava: transformers' Llava; moe_llava: MoE-LLaVA / Med-MoE
    # (stage 2 dense or stage 3 MoE folders); medplib: MedPLIB's merged folder; uni_med: Uni-Med's .pth
    format: ImportFormat = "llava"
    path: str = "???"  # the checkpoint folder (config.json + weights)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    grounding: GroundingConfig | None = None  # MedPLIB: <SEG> -> SAM mask decoder, region prompts
    init: InitConfig | None = None  # weights from a released checkpoint layout (model.llm.path: the same folder)

    def problems(self, key: str) -> list[Problem]:
        if self.grounding is not None and self.grounding.region and self.vision.select_feature != "patch":
            return [
                (
                    f"{key}.grounding.region",
                    "region prompts pool the patch grid: needs model.vision.select_feature: patch",
                )
            ]
        return []


@dataclass
class GroundingLossConfig:
    """Loss weights of a grounded model: CE + BCE + Dice (+ focal) (lightningmodules/grounding_module.py)."""

    ce: float = 1.0
    bce: float = 1.0
    dice: float = 5.0  # MedPLIB stage III (stage IV: bce 2, dice 0.5)
    focal: float = 0.0  # optional sigmoid focal loss (alpha 0.25)
    focal_gamma: float = 2.0

    def problems(self, key: str) -> list[Problem]:
        found = [
            (f"{key}.{term}", f"loss weights must be >= 0, got {getattr(self, term)}")
            for term in ("ce", "bce", "dice", "focal")
            if getattr(self, term) < 0
        ]
        return found + positive(f"{key}.focal_gamma", self.focal_gamma, allow_zero=True)


@dataclass
class GroundingConfig:
    """MedPLIB's grounding head and region adapter (lightningmodules/models/grounded.py)."""

    sam_path: str = "tiny:medsam"  # HF SamModel dir or tiny:<name>; sam_med2d: the sam-med2d_b.pth file
    sam_format: SamFormat = "hf"  # sam_med2d: the key-mapping converter, lightningmodules/models/sam_convert.py)
    sam_allow_missing_adapters: bool = False  # sam_med2d: load without the image-encoder adapters (see docs)
    train_mask_decoder: bool = True
    region: bool = True  # the <region> adapter: Linear(d_vision, d_llm) over pooled patch features
    # how a region mask becomes its token (lightningmodules/models/region.py): points = MedPLIB's released code
    # (bilinear samples of the patch map at up to region_max_points random mask pixels, averaged; random while
    # training, a fixed seed in evaluation); area = the coverage-weighted mean of the patch features
    region_pooling: RegionPooling = "points"
    region_max_points: int = 512  # points: MedPLIB's max_sample_point
    loss: GroundingLossConfig = field(default_factory=GroundingLossConfig)  # a stage's grounding_loss overrides
    overlays: int = 8  # evaluation: predicted / true mask overlays logged to MLflow

    def problems(self, key: str) -> list[Problem]:
        return positive(f"{key}.region_max_points", self.region_max_points)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "all-linear" = every Linear of the LLM except lm_head (peft's convention; alone). Family-neutral aliases,
    # resolved on the built LLM by structure (pipeline/trainable.py lora_targets; pre-flight checks the same):
    # "mlp" = the Linear layers of every decoder layer's feed-forward block (Llama / Mistral / Qwen / Gemma /
    # StableLM gate_proj, up_proj, down_proj; Phi fc1, fc2; GPT-2 c_fc, c_proj), "attention" = those of its
    # attention block (q_proj, k_proj, v_proj, o_proj; Phi's dense; GPT-2 c_attn, c_proj). Other entries are
    # module names as peft matches them (a module's dotted name or its suffix: q_proj, mlp.down_proj), and mix
    # with the aliases: [attention, fc1]
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def problems(self, key: str) -> list[Problem]:
        found = positive(f"{key}.r", self.r) + positive(f"{key}.alpha", self.alpha)
        found += interval(f"{key}.dropout", self.dropout, 0, 1)
        targets = list(self.target_modules)
        if not targets:
            found.append((f"{key}.target_modules", "empty: name all-linear, mlp, attention or module names"))
        elif "all-linear" in targets and len(targets) > 1:
            found.append((f"{key}.target_modules", f"all-linear stands alone, got {targets}"))
        return found


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03  # warmup steps = ceil(warmup_ratio * the stage's optimiser steps)
    scheduler: Scheduler = "cosine"  # after the warmup, updated every optimiser step
    min_lr_ratio: float = 0.0  # the decay's floor as a fraction of lr (Uni-Med: 1e-7 / 1e-5 = 0.01)
    # absolute warmup length in optimiser steps; replaces warmup_ratio (then set warmup_ratio: 0)
    warmup_steps: int | None = None
    # the warmup's first step as a fraction of lr: 0 = (step + 1) / warmup; s > 0 = s + (1 - s) * step / warmup
    # (LAVIS's warmup_lr_schedule; Uni-Med warms from 1e-6 to 1e-5: 0.1); lightningmodules/schedules.py
    warmup_start_ratio: float = 0.0
    # the decay's progress: warmup_end = (step - warmup) / (total - warmup); start = step / total, the warmup
    # steps counted (LAVIS's linear_warmup_cosine_lr, Uni-Med: the cosine starts at warmup / total)
    decay_from: DecayFrom = "warmup_end"

    def problems(self, key: str) -> list[Problem]:
        found = positive(f"{key}.lr", self.lr) + positive(f"{key}.weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2:
            found.append((f"{key}.betas", f"two values (beta1, beta2), got {list(self.betas)}"))
        found += [p for beta in self.betas for p in interval(f"{key}.betas", beta, 0, 1)]
        found += interval(f"{key}.min_lr_ratio", self.min_lr_ratio, 0, 1, include_high=True)
        if not 0 <= self.warmup_ratio < 1:
            found.append((f"{key}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        if self.warmup_steps is not None:
            found += positive(f"{key}.warmup_steps", self.warmup_steps, allow_zero=True)
            if self.warmup_ratio != 0:
                found.append(
                    (
                        f"{key}.warmup_steps",
                        f"{self.warmup_steps} replaces warmup_ratio: set {key}.warmup_ratio: 0 "
                        f"(got {self.warmup_ratio}), or warmup_steps: null",
                    )
                )
        if not 0 <= self.warmup_start_ratio < 1:
            found.append((f"{key}.warmup_start_ratio", f"must be in [0, 1), got {self.warmup_start_ratio}"))
        return found


@dataclass
class MoEConfig:
    """Stage-level LLM mixture of experts (Med-MoE stage 3; MedPLIB stage IV with ``sources``)."""

    layers: Any = "every_other"  # every_other (0, 2, 4, ...) | all | list of decoder layer indices
    num_experts: int | None = None  # default 4; with sources: len(sources)
    top_k: int = 1
    meta_expert: bool = True  # the dense FFN stays always on: out = moe(x) + ffn(x)
    renormalize: bool = False  # Med-MoE: combine weight = softmax prob of the chosen expert, not renormalised
    router_init: RouterInit = "random"  # modality_classifier: Med-MoE
    router_stage: str | None = None  # the router stage for modality_classifier; default: the last earlier one
    router_trainable: bool = False  # Med-MoE: frozen
    router_bias: bool = True  # Med-MoE / DeepSpeed gate: with bias; MedPLIB stage IV: Linear(d, 2) without
    # per-expert limit max(min_capacity, ceil(factor * tokens * k / E)) while training (null = dropless) and in
    # evaluation (eval_capacity_factor; null = capacity_factor); MedPLIB: 1.5 / 2.0 with random dropping
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: DropPolicy = "position"  # which assignments a full expert keeps: token order, or random (use_rts)
    # true: padding is routed and takes capacity like real tokens, as DeepSpeed's gate over the flattened micro-batch
    # (MedPLIB); false: padding is never routed and the limit counts real tokens
    capacity_counts_padding: bool = False
    aux_loss_coef: float = 0.0  # Switch load balancing (padding masked out); 0 as Med-MoE released
    z_loss_coef: float = 0.0  # router z-loss
    jitter: float = 0.0  # multiplicative router input noise while training
    sources: list[str] | None = None  # earlier stages whose FFNs become the experts (MedPLIB stage IV)

    def expert_count(self) -> int:
        """``num_experts``, else one per source stage, else 4."""
        return self.num_experts if self.num_experts is not None else (len(self.sources or []) or 4)

    def problems(self, key: str) -> list[Problem]:
        found: list[Problem] = []
        if isinstance(self.layers, str):
            found += choice(f"{key}.layers", self.layers, MOE_LAYER_CHOICES)
        else:
            values = list(self.layers) if self.layers is not None else []
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                found.append(
                    (
                        f"{key}.layers",
                        f"every_other, all, or a non-empty list of layer indices >= 0, got {self.layers!r}",
                    )
                )
        sources = list(self.sources or [])
        if self.sources is not None and len(sources) < 2:
            found.append((f"{key}.sources", f"needs >= 2 earlier stages (one per expert), got {sources}"))
        experts = self.expert_count()
        if sources and experts != len(sources):
            found.append((f"{key}.num_experts", f"{experts} but sources name {len(sources)} stages (one expert each)"))
        found += positive(f"{key}.num_experts", experts)
        if not 1 <= self.top_k <= experts:
            found.append((f"{key}.top_k", f"must be in [1, num_experts={experts}], got {self.top_k}"))
        if self.capacity_factor is not None:
            found += positive(f"{key}.capacity_factor", self.capacity_factor)
        if self.eval_capacity_factor is not None:
            found += positive(f"{key}.eval_capacity_factor", self.eval_capacity_factor)
            if self.capacity_factor is None:
                found.append((f"{key}.eval_capacity_factor", "set with capacity_factor (null: dropless throughout)"))
        found += positive(f"{key}.min_capacity", self.min_capacity, allow_zero=True)
        for coef in ("aux_loss_coef", "z_loss_coef", "jitter"):
            found += positive(f"{key}.{coef}", getattr(self, coef), allow_zero=True)
        if self.router_init != "modality_classifier" and self.router_stage is not None:
            found.append((f"{key}.router_stage", "set only with router_init: modality_classifier"))
        return found


@dataclass
class RouterStageConfig:
    """Labels of a ``kind: router`` stage: each sample's modality, as a class index of ``modalities``."""

    modalities: list[str] = field(default_factory=list)  # class c = modalities[c] = MoE expert c
    # records without a modality (PathVQA has none): the dataset's modality, e.g. {pathvqa: Pathology}
    dataset_modality: dict[str, str] = field(default_factory=dict)

    def problems(self, key: str) -> list[Problem]:
        if len(self.modalities) < 2:
            return [(f"{key}.modalities", "a router stage needs >= 2 modality names (class c = MoE expert c)")]
        if len(set(self.modalities)) != len(self.modalities):
            return [(f"{key}.modalities", f"names repeat: {list(self.modalities)}")]
        return [
            p
            for ds, modality in self.dataset_modality.items()
            for p in choice(f"{key}.dataset_modality.{ds}", modality, self.modalities)
        ]


@dataclass
class StageConfig:
    kind: StageKind = "vlm"
    train: list[str] = field(default_factory=lambda: ["connector"])  # parameter groups that learn
    lora: LoraConfig | None = None  # LoRA adapters for this stage, merged into the weights after it
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_epochs: int = 1
    max_steps: int = -1
    init_from: str | None = None  # a stage name or a hand-over file; default: the previous stage
    datasets: list[str] | None = None  # subset of data.datasets; default: all
    moe: MoEConfig | None = None  # turn decoder FFNs into MoE layers before this stage trains
    router: RouterStageConfig | None = None  # kind: router only
    grounding_loss: GroundingLossConfig | None = None  # grounded models: this stage's weights (else model's)
    # a LLaVA conversation preset (medcore/conversations.py) for this stage's prompts, in training and in its
    # evaluation (and the run's final evaluation when it is the last stage), e.g. Med-MoE's stage 1 `plain`;
    # it replaces the template model.llm sets (conversation, chat_template or the tokenizer's own) for this
    # stage only. null: model.llm's. `medpipe evaluate` and registry loading use model.llm's
    conversation: ConversationPreset | None = None
    # this stage's data.batch_size, data.max_length and trainer.accumulate_grad_batches (null: the run's), as the
    # released scripts set them per stage (MedPLIB stage IV: max length 1024; Med-MoE stage 1: accumulation 1)
    batch_size: int | None = None
    max_length: int | None = None
    accumulate_grad_batches: int | None = None

    def problems(self, key: str) -> list[Problem]:
        """The stage's own fields; what it names elsewhere (datasets, earlier stages) is checked in validate.py."""
        found: list[Problem] = [
            p
            for name in ("batch_size", "max_length", "accumulate_grad_batches")
            if getattr(self, name) is not None
            for p in positive(f"{key}.{name}", getattr(self, name))
        ]
        if self.max_epochs < 1 and self.max_steps < 1:
            found.append((f"{key}.max_epochs", "set max_epochs >= 1 or max_steps >= 1"))
        found += [p for group in self.train for p in choice(f"{key}.train", group, TRAINABLE_GROUPS)]
        if "lora" in self.train and self.lora is None:
            found.append((f"{key}.train", "'lora' is trainable but the stage has no lora section"))
        if is_router_stage(self):
            if self.router is None:
                found.append(
                    (f"{key}.router.modalities", "a router stage needs >= 2 modality names (class c = MoE expert c)")
                )
            if list(self.train) != ["modality_classifier"]:
                found.append(
                    (
                        f"{key}.train",
                        f"a router stage trains the modality classifier only: set train: "
                        f"[modality_classifier] (got {list(self.train)})",
                    )
                )
            if self.moe is not None or self.lora is not None:
                found.append(
                    (f"{key}.{'moe' if self.moe is not None else 'lora'}", "a router stage changes no LLM weights")
                )
        elif self.router is not None:
            found.append((f"{key}.router", "only kind: router stages take a router section"))
        elif "modality_classifier" in self.train:
            found.append((f"{key}.train", "modality_classifier trains in a kind: router stage"))
        if self.moe is not None and "moe_router" in self.train and not self.moe.router_trainable:
            found.append((f"{key}.train", "moe_router is listed but moe.router_trainable is false"))
        return found


@dataclass
class MixtureConfig:
    """How training draws from several datasets (weights: data.datasets.<name>.weight)."""

    one_task_per_batch: bool = False  # every batch from one (dataset, task) group, drawn by weight
    samples_per_epoch: int | None = None  # over all ranks; default: the train records' total

    def problems(self, key: str) -> list[Problem]:
        return [] if self.samples_per_epoch is None else positive(f"{key}.samples_per_epoch", self.samples_per_epoch)


@dataclass
class DataConfig:
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    batch_size: int = 8  # training; evaluation.batch_size sets the validation and generation batches
    num_workers: int = 0
    max_length: int = 512
    on_bad_record: OnBadRecord = "error"
    task_prefix: bool = False
    prompt_templates: bool = False  # per-task instruction templates (datamodules/prompts.py), random in training
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    verify_images: bool = False  # decode every image and mask when a split is read (as `data check` does)

    def problems(self, key: str) -> list[Problem]:
        return (
            positive(f"{key}.batch_size", self.batch_size)
            + positive(f"{key}.max_length", self.max_length)
            + positive(f"{key}.num_workers", self.num_workers, allow_zero=True)
        )


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0  # clip the gradient norm to this; null or 0: no clipping (never < 0)
    log_every_n_steps: int = 10
    val_check_interval: float | None = None
    limit_val_batches: float | None = None
    enable_progress_bar: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms (Lightning's Trainer(deterministic=...))
    # intra-op CPU threads for the run (torch.set_num_threads); None: torch's default (OMP_NUM_THREADS or the cores).
    # Results depend on it: a fixed count makes a seed reproduce the same numbers (pipeline/reproducibility.py)
    num_threads: int | None = None
    cpu_kernels: str = "native"  # native | portable: AVX2 kernels, the same numbers on every x86-64 CPU
    save_checkpoints: bool = True  # <output_dir>/stages/<stage>/checkpoints/last.ckpt, what resume=true continues from
    checkpoint_every_n_steps: int | None = None  # None: at the end of every epoch

    def problems(self, key: str) -> list[Problem]:
        """Strategy (DeepSpeed only when installed), devices, and precisions the accelerator can run."""
        found = choice(f"{key}.precision", self.precision, PRECISIONS)
        found += choice(f"{key}.cpu_kernels", self.cpu_kernels, CPU_KERNELS)
        for name in ("num_threads", "checkpoint_every_n_steps", "val_check_interval"):
            if getattr(self, name) is not None:
                found += positive(f"{key}.{name}", getattr(self, name))
        for name in ("gradient_clip_val", "limit_val_batches"):  # 0: no clipping / no validation
            if getattr(self, name) is not None:
                found += positive(f"{key}.{name}", getattr(self, name), allow_zero=True)
        found += positive(f"{key}.log_every_n_steps", self.log_every_n_steps)
        problem = strategy_problem(self.strategy, self.accelerator)
        if problem:
            found.append((f"{key}.strategy", problem))
        if not devices_ok(self.devices):
            found.append(
                (
                    f"{key}.devices",
                    f"'auto', a count >= 1 (-1: all), a list of device indices or '0,1'; got {self.devices!r}",
                )
            )
        if self.accelerator == "cpu" and self.precision in ("16-mixed", "16"):
            found.append((f"{key}.precision", "16-mixed needs a GPU; on CPU use bf16-mixed or 32-true"))
        if self.strategy == "fsdp2" and (self.devices in ("auto", -1, "-1") or self.devices is None):
            found.append(
                (f"{key}.devices", "fsdp2 shards over a known number of processes: set trainer.devices to a count")
            )
        return (
            found
            + positive(f"{key}.num_nodes", self.num_nodes)
            + positive(f"{key}.accumulate_grad_batches", self.accumulate_grad_batches)
        )


def devices_ok(devices: Any) -> bool:
    """Lightning's accepted ``devices`` forms: "auto", an int >= 1 or -1, a list of indices, "0,1" / "2"."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        return devices == "auto" or (bool(parts) and all(p.lstrip("-").isdigit() for p in parts))
    if isinstance(devices, (list, tuple)):
        return len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


@dataclass
class EvaluationConfig:
    enabled: bool = True
    after_each_stage: bool = False  # also evaluate every stage's model (shows the gain per stage)
    datasets: list[str] | None = None  # subset of data.datasets to evaluate on; default: all
    split: str = "test"
    max_new_tokens: int = 16
    batch_size: int = 32
    mask_threshold: float = 0.1  # grounding masks: sigmoid(logit) > threshold (MedPLIB's eval uses 0.1)
    # an answer without <SEG>: decode its mask from the hidden state that produced the answer's last token before
    # the stop token (MedPLIB 5ab54bc's evaluate), or no mask, IoU 0 (its first release 9c3efe9); metrics.json
    # and every such prediction row say which
    no_seg_mask: NoSegMask = "last_answer_token"
    # Decoding (MultimodalLM.generate). Only these keys apply: the checkpoint's generation_config.json (its
    # sampling, temperature, repetition_penalty ...) is never read; its eos list is (stop tokens). The defaults
    # are greedy decoding, the papers' evaluation.
    num_beams: int = 1  # > 1: beam search (HF's length_penalty 1, early_stopping false); deterministic
    # true: sample each token. Draws come from torch's generator, seeded with the run's `seed` (+ rank) when the
    # evaluation starts: the answers change with `seed`, and also with batch_size and the number of ranks (which
    # draw goes to which sample); same seed, batches and ranks -> same answers. With num_beams > 1: beam sampling
    do_sample: bool = False
    temperature: float | None = None  # do_sample only; > 0; null = 1.0 (the model's distribution)
    top_p: float | None = None  # do_sample only; in (0, 1]; null = no nucleus filter
    top_k: int | None = None  # do_sample only; >= 1; null = no top-k filter (not HF's default 50)
    # > 0, 1 = none; > 1 discourages tokens already in the prompt or the answer (CTRL; HF's logits processor);
    # with greedy, beam search or sampling; null = not used
    repetition_penalty: float | None = None

    def problems(self, key: str) -> list[Problem]:
        found = positive(f"{key}.batch_size", self.batch_size) + positive(f"{key}.max_new_tokens", self.max_new_tokens)
        found += positive(f"{key}.num_beams", self.num_beams)
        found += interval(f"{key}.mask_threshold", self.mask_threshold, 0, 1)
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None and not self.do_sample:
                found.append((f"{key}.{name}", f"applies to sampling only: set {key}.do_sample: true, or null"))
        if self.temperature is not None:
            found += positive(f"{key}.temperature", self.temperature)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            found.append((f"{key}.top_p", f"must be in (0, 1], got {self.top_p}"))
        if self.top_k is not None:
            found += positive(f"{key}.top_k", self.top_k)
        if self.repetition_penalty is not None:
            found += positive(f"{key}.repetition_penalty", self.repetition_penalty)
        return found


@dataclass
class GradConflictConfig:
    every_n_steps: int | None = None  # None: off; else per-task gradient cosine every N optimiser steps
    samples_per_task: int = 8  # fixed probe batch per task
    groups: list[str] = field(default_factory=lambda: ["connector", "experts"])  # or any parameter-name substring

    def problems(self, key: str) -> list[Problem]:
        if self.every_n_steps is None:
            return []
        return positive(f"{key}.every_n_steps", self.every_n_steps) + positive(
            f"{key}.samples_per_task", self.samples_per_task
        )


@dataclass
class AnalysisConfig:
    grad_conflict: GradConflictConfig = field(default_factory=GradConflictConfig)


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "medpipe"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics: bool = True  # MLflow's CPU / memory / GPU sampling (needs psutil)
    system_metrics_interval: float = 10.0  # seconds
    register_model: bool = True  # log the final hand-over + config and register a model version
    # what the registered version holds: `delta` every stage's small hand-over (the base checkpoints are needed
    # to load it, as for the run itself), `full` one hand-over with every weight of the final model
    register_weights: Literal["delta", "full"] = "delta"
    model_name: str | None = None  # registry name; default medpipe-<name>
    # HTTP tracking servers (pipeline/tracking.py `http_settings`): MLflow's own defaults retry for minutes
    http_retries: int = 3  # retries of a request on a connection error or a 429 / 5xx answer
    http_backoff_factor: int = 1  # seconds: waits 0, 2, 4, ... between retries (Retry-After is not honoured)
    http_timeout: int = 15  # seconds to connect, and to wait for each answer

    def problems(self, key: str) -> list[Problem]:
        found = positive(f"{key}.system_metrics_interval", self.system_metrics_interval)
        found += positive(f"{key}.http_retries", self.http_retries, allow_zero=True)
        found += positive(f"{key}.http_backoff_factor", self.http_backoff_factor, allow_zero=True)
        return found + positive(f"{key}.http_timeout", self.http_timeout)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "outputs/${name}"
    cache_dir: str | None = None  # tiny models; default $MEDPIPE_CACHE or ~/.cache/medpipe
    ckpt: str | None = None  # hand-over file to evaluate (medpipe evaluate)
    resume: bool = False  # continue the run in output_dir (same MLflow runs) from its last checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def problems(self, key: str) -> list[Problem]:
        """Trainable weights of a half-precision part train in float32 copies beside its frozen half weights,
        which needs autocast: 32-bit precisions cannot run the mix (docs/scaling.md, precision). First the seed:
        numpy and Lightning take [0, 2**32 - 1]."""
        if not 0 <= self.seed < 2**32:
            return [("seed", f"must be in [0, {2**32 - 1}], got {self.seed}")]
        half = [part for part in ("llm", "vision") if getattr(self.model, part).dtype != "float32"]
        if self.trainer.strategy == "fsdp" and half:
            reason = (
                f"fsdp flattens each layer's weights into one dtype and computes in 16 bits itself (MixedPrecision): "
                f"set model.{half[0]}.dtype: float32 (got {getattr(self.model, half[0]).dtype})"
            )
            return [("trainer.strategy", reason)]
        if self.trainer.precision not in NO_AUTOCAST:
            return []
        fix = f"which needs autocast: use bf16-mixed, got {self.trainer.precision}"
        if self.model.vision.dtype != "float32":
            reason = f"model.vision.dtype {self.model.vision.dtype}: the float32 connector reads its features, {fix}"
            return [("trainer.precision", reason)]
        dtype = self.model.llm.dtype
        for name, stage in self.stages.items():
            trained = sorted(set(stage.train) & LLM_FLOAT32_GROUPS)
            if dtype != "float32" and trained:
                reason = (
                    f"stage {name} trains {', '.join(trained)} of the {dtype} model.llm in float32 master copies, "
                    f"{fix} (or model.llm.dtype: float32)"
                )
                return [("trainer.precision", reason)]
        return []
