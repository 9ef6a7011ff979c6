"""The one typed schema every experiment YAML is validated against.

OmegaConf merges each YAML layer into these dataclasses, so an unknown key or a value of the wrong
type fails at load time; :func:`pipeline.config.validate.check_semantics` then checks choices and
paths. Defaults here are the shared defaults; experiments/defaults.yaml only documents and overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from datamodules.specs import DatasetSpec
from lightningmodules.schedules import SCHEDULERS

CONNECTOR_TYPES = ("linear", "mlp", "cmoe")
STAGE_KINDS = ("vlm",)
TRAINABLE_GROUPS = ("connector", "lora", "llm", "vision")


@dataclass
class VisionConfig:
    path: str = "tiny:clip"  # HF checkpoint dir, or tiny:<name> for the built-in tiny models
    select_layer: int = -2
    select_feature: str = "patch"
    pad_square: bool = False  # LLaVA's expand2square with the mean colour before resizing


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
    task_embed_dim: Optional[int] = None  # None: min(768, connector input width); 768 as in Uni-Med


@dataclass
class LLMConfig:
    path: str = "tiny:llama"
    dtype: str = "float32"
    chat_template: Optional[str] = None  # jinja; used when given or when the tokenizer has none
    system_prompt: Optional[str] = None
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False  # never on unless set: remote code runs from the checkpoint
    gradient_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "all-linear" = every Linear of the LLM except lm_head (peft's convention)
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class StageConfig:
    kind: str = "vlm"
    train: List[str] = field(default_factory=lambda: ["connector"])  # parameter groups that learn
    lora: Optional[LoraConfig] = None  # LoRA adapters for this stage, merged into the weights after it
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_epochs: int = 1
    max_steps: int = -1
    init_from: Optional[str] = None  # a stage name or a hand-over file; default: the previous stage
    datasets: Optional[List[str]] = None  # subset of data.datasets; default: all


@dataclass
class MixtureConfig:
    """How training draws from several datasets (weights: data.datasets.<name>.weight)."""

    one_task_per_batch: bool = False  # every batch from one (dataset, task) group, drawn by weight
    samples_per_epoch: Optional[int] = None  # over all ranks; default: the train records' total


@dataclass
class DataConfig:
    datasets: Dict[str, DatasetSpec] = field(default_factory=dict)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    max_length: int = 512
    on_bad_record: str = "error"
    task_prefix: bool = False
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
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 10
    val_check_interval: Optional[float] = None
    limit_val_batches: Optional[float] = None
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class EvaluationConfig:
    enabled: bool = True
    after_each_stage: bool = False  # also evaluate every stage's model (shows the gain per stage)
    datasets: Optional[List[str]] = None  # subset of data.datasets to evaluate on; default: all
    split: str = "test"
    max_new_tokens: int = 16
    batch_size: int = 32
    mask_threshold: float = 0.1  # grounding masks: sigmoid(logit) > threshold (MedPLIB's eval uses 0.1)


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "medpipe"
    run_name: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)
    system_metrics: bool = True  # MLflow's CPU / memory / GPU sampling (needs psutil)
    system_metrics_interval: float = 10.0  # seconds
    register_model: bool = True  # log the final hand-over + config and register a model version
    model_name: Optional[str] = None  # registry name; default medpipe-<name>


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "outputs/${name}"
    cache_dir: Optional[str] = None  # tiny models; default $MEDPIPE_CACHE or ~/.cache/medpipe
    ckpt: Optional[str] = None  # hand-over file to evaluate (medpipe evaluate)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: Dict[str, StageConfig] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
