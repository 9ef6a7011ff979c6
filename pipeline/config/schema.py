"""The one typed schema every experiment YAML is validated against.

OmegaConf merges each YAML layer into these dataclasses, so an unknown key or a value of the wrong
type fails at load time; :func:`pipeline.config.validate.check_semantics` then checks choices and
paths. Defaults here are the shared defaults; experiments/defaults.yaml only documents and overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datamodules.specs import DatasetSpec

CONNECTOR_TYPES = ("linear", "mlp", "cmoe")
STAGE_KINDS = ("vlm", "router")  # router: Med-MoE's modality classifier on pooled LLM hidden states
# ffn: every decoder FFN (MoE experts + meta expert where converted), experts: MoE experts + meta experts,
# moe_router: the MoE token routers, modality_classifier: the router stage's classifier
TRAINABLE_GROUPS = ("connector", "lora", "llm", "vision", "ffn", "experts", "moe_router", "modality_classifier")
# MedPLIB (model.grounding): grounding = SEG projection + SAM mask decoder, region = the region-prompt adapter
# embeddings = the LLM's input embeddings and LM head (LISA / MedPLIB train them: the added tokens' rows learn)
TRAINABLE_GROUPS += ("grounding", "region", "embeddings")
SAM_FORMATS = ("hf", "sam_med2d")
MOE_LAYER_CHOICES = ("every_other", "all")
ROUTER_INITS = ("random", "modality_classifier")


@dataclass
class VisionConfig:
    path: str = "tiny:clip"  # HF checkpoint dir, or tiny:<name> for the built-in tiny models
    select_layer: int = -2
    select_feature: str = "patch"
    pad_square: bool = False  # LLaVA's expand2square with the mean colour before resizing
    # path "timm:<model name>" (e.g. timm:eva_giant_patch14_clip_224, Uni-Med's EVA-CLIP ViT-g/14; needs the
    # optional extra medpipe[timm]) loads its weights from this local file; never downloaded
    checkpoint: str | None = None


@dataclass
class ConnectorConfig:
    type: str = "mlp"
    aggregation: str = "none"  # none | concat4 | avgpool | maxpool (visual tokens before the connector)
    pool: int = 2  # pooling window for avgpool / maxpool
    # cmoe only (Uni-Med connector mixture-of-experts, lightningmodules/models/cmoe.py)
    num_experts: int = 5
    router_input: str = "task_token"  # task_token | token | task
    weighting: str = "soft"  # soft | sparse | hard (task t -> expert t mod E) | constant (1/E)
    top_k: int = 2  # experts per token for sparse
    router_hidden_ratio: float = 4.0  # router hidden width / router input width (paper: 4)
    num_tasks: int = 6  # learned task embeddings (task ids 0..num_tasks-1)
    task_embed_dim: int | None = None  # None: min(768, connector input width); 768 as in Uni-Med


@dataclass
class LLMConfig:
    path: str = "tiny:llama"
    dtype: str = "float32"
    chat_template: str | None = None  # jinja; used when given or when the tokenizer has none
    system_prompt: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False  # never on unless set: remote code runs from the checkpoint
    gradient_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    grounding: GroundingConfig | None = None  # MedPLIB: <SEG> -> SAM mask decoder, region prompts


@dataclass
class GroundingLossConfig:
    """Loss weights of a grounded model: CE + BCE + Dice (+ focal) (lightningmodules/grounding_module.py)."""

    ce: float = 1.0
    bce: float = 1.0
    dice: float = 5.0  # MedPLIB stage III (stage IV: bce 2, dice 0.5)
    focal: float = 0.0  # optional sigmoid focal loss (alpha 0.25)
    focal_gamma: float = 2.0


@dataclass
class GroundingConfig:
    """MedPLIB's grounding head and region adapter (lightningmodules/models/grounded.py)."""

    sam_path: str = "tiny:medsam"  # HF SamModel dir or tiny:<name>; sam_med2d: the sam-med2d_b.pth file
    sam_format: str = "hf"  # hf | sam_med2d (key-mapping converter, lightningmodules/models/sam_convert.py)
    sam_allow_missing_adapters: bool = False  # sam_med2d: load without the image-encoder adapters (see docs)
    train_mask_decoder: bool = True
    region: bool = True  # the <region> adapter: Linear(d_vision, d_llm) over pooled patch features
    loss: GroundingLossConfig = field(default_factory=GroundingLossConfig)  # a stage's grounding_loss overrides
    overlays: int = 8  # evaluation: predicted / true mask overlays logged to MLflow


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "all-linear" = every Linear of the LLM except lm_head (peft's convention)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class MoEConfig:
    """Stage-level LLM mixture of experts (Med-MoE stage 3; MedPLIB stage IV with ``sources``)."""

    layers: Any = "every_other"  # every_other (0, 2, 4, ...) | all | list of decoder layer indices
    num_experts: int | None = None  # default 4; with sources: len(sources)
    top_k: int = 1
    meta_expert: bool = True  # the dense FFN stays always on: out = moe(x) + ffn(x)
    renormalize: bool = False  # Med-MoE: combine weight = softmax prob of the chosen expert, not renormalised
    router_init: str = "random"  # random | modality_classifier (Med-MoE)
    router_stage: str | None = None  # the router stage for modality_classifier; default: the last earlier one
    router_trainable: bool = False  # Med-MoE: frozen
    capacity_factor: float | None = None  # null = dropless
    aux_loss_coef: float = 0.0  # Switch load balancing (padding masked out); 0 as Med-MoE released
    z_loss_coef: float = 0.0  # router z-loss
    jitter: float = 0.0  # multiplicative router input noise while training
    sources: list[str] | None = None  # earlier stages whose FFNs become the experts (MedPLIB stage IV)


@dataclass
class RouterStageConfig:
    """Labels of a ``kind: router`` stage: each sample's modality, as a class index of ``modalities``."""

    modalities: list[str] = field(default_factory=list)  # class c = modalities[c] = MoE expert c
    # records without a modality (PathVQA has none): the dataset's modality, e.g. {pathvqa: Pathology}
    dataset_modality: dict[str, str] = field(default_factory=dict)


@dataclass
class StageConfig:
    kind: str = "vlm"
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


@dataclass
class MixtureConfig:
    """How training draws from several datasets (weights: data.datasets.<name>.weight)."""

    one_task_per_batch: bool = False  # every batch from one (dataset, task) group, drawn by weight
    samples_per_epoch: int | None = None  # over all ranks; default: the train records' total


@dataclass
class DataConfig:
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    max_length: int = 512
    on_bad_record: str = "error"
    task_prefix: bool = False
    prompt_templates: bool = False  # per-task instruction templates (datamodules/prompts.py), random in training
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    verify_images: bool = False  # decode every image and mask when a split is read (as `data check` does)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
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


@dataclass
class EvaluationConfig:
    enabled: bool = True
    after_each_stage: bool = False  # also evaluate every stage's model (shows the gain per stage)
    datasets: list[str] | None = None  # subset of data.datasets to evaluate on; default: all
    split: str = "test"
    max_new_tokens: int = 16
    batch_size: int = 32
    mask_threshold: float = 0.1  # grounding masks: sigmoid(logit) > threshold (MedPLIB's eval uses 0.1)


@dataclass
class GradConflictConfig:
    every_n_steps: int | None = None  # None: off; else per-task gradient cosine every N optimiser steps
    samples_per_task: int = 8  # fixed probe batch per task
    groups: list[str] = field(default_factory=lambda: ["connector", "experts"])  # or any parameter-name substring


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
    model_name: str | None = None  # registry name; default medpipe-<name>


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
