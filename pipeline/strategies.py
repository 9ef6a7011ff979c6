"""Lightning's distributed strategies by name: the choices ``trainer.strategy`` accepts, and the
strategy object handed to ``L.Trainer`` (an ``FSDPStrategy`` that shards per decoder layer for
``fsdp``; Lightning's registered names for the rest). Nothing here is home-made: DDP, FSDP and
DeepSpeed are Lightning's.
"""

from __future__ import annotations

import importlib.util
from typing import Any

# ddp_spawn is deliberately absent: spawned ranks train copies of the model, and the runner (hand-over,
# predictions collected in test_step) works on the module in the launching process. `ddp` with
# trainer.devices=N launches the other ranks itself (re-running the same command), and torchrun / srun
# start them from outside; both keep `medpipe train` unchanged.
PLAIN_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "fsdp", "fsdp2")
DEEPSPEED_STRATEGIES = (
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
)
STRATEGIES = PLAIN_STRATEGIES + DEEPSPEED_STRATEGIES


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


FSDP_NEEDS_GPU = (
    "'fsdp' needs CUDA GPUs: Lightning (2.6) refuses FSDPStrategy with accelerator={accelerator!r} "
    "(lightning.pytorch.trainer.connectors.accelerator_connector, _check_strategy_and_fallback); "
    "use trainer.strategy=ddp on CPU (see docs/scaling.md)"
)


def strategy_problem(name: str, accelerator: str = "auto") -> str | None:
    """Why ``trainer.strategy: name`` cannot run with ``trainer.accelerator``, or None (``auto`` is
    checked again when the Trainer is built, once it is known whether there is a GPU)."""
    if name == "ddp_spawn":
        return (
            "'ddp_spawn' is not supported: spawned ranks train copies of the model that the runner never "
            "sees; use 'ddp' (with trainer.devices=N Lightning starts the ranks itself) or launch with "
            "torchrun / srun"
        )
    if name not in STRATEGIES:
        return f"{name!r} is not one of {', '.join(STRATEGIES)}"
    if name == "fsdp" and accelerator in ("cpu", "mps"):
        return FSDP_NEEDS_GPU.format(accelerator=accelerator)
    if name in DEEPSPEED_STRATEGIES and not deepspeed_available():
        return (
            f"{name!r} needs DeepSpeed, which is not installed: pip install deepspeed (or choose one of "
            f"{', '.join(PLAIN_STRATEGIES)})"
        )
    return None


def decoder_layer_classes() -> set[type]:
    """Module classes FSDP wraps as one unit each: every transformers decoder / encoder layer
    (``GradientCheckpointingLayer`` is their common base: LlamaDecoderLayer, Qwen2DecoderLayer,
    PhiDecoderLayer, StableLmDecoderLayer, CLIPEncoderLayer, ...)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {GradientCheckpointingLayer}


def build_strategy(name: str, accelerator: str = "auto", *, world_size: int = 1) -> Any:
    """The ``strategy`` argument for ``L.Trainer``: a strategy object for ``fsdp`` and ``fsdp2``, else the name.

    ``fsdp2``: Lightning's ``ModelParallelStrategy`` with every process in one data-parallel (sharding)
    dimension of ``world_size``; the LightningModule shards its network in ``configure_model``
    (``lightningmodules/sharding.py``). It runs on CPUs too (gloo), which ``fsdp`` does not."""
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1)
    if name != "fsdp":
        return name
    import torch

    if accelerator == "auto" and not torch.cuda.is_available():
        from pipeline.config import ConfigError

        raise ConfigError(f"key 'trainer.strategy': {FSDP_NEEDS_GPU.format(accelerator='auto')} (no CUDA GPU here)")
    from lightning.pytorch.strategies import FSDPStrategy

    # One FSDP unit per transformer layer: its parameters are gathered just before the layer runs and
    # freed after, so only one layer is ever unsharded. use_orig_params (Lightning's default) lets frozen
    # and trainable parameters share a unit (vision tower frozen, LoRA next to frozen weights). The full
    # state dict is gathered to rank 0 on save.
    return FSDPStrategy(
        auto_wrap_policy=decoder_layer_classes(), state_dict_type="full", sharding_strategy="FULL_SHARD"
    )


def shutdown_distributed() -> None:
    """Destroy this process's default process group, if it has one, before the process exits.

    Lightning leaves the group alive after ``fit``; exiting with a live gloo group (still referenced by a
    DDP reducer) can abort the process during interpreter shutdown ("terminate called without an active
    exception", tests/scaling/moe_ddp_worker.py reproduced it in ~1 run of 8). Collect the finished stages'
    trainers and DDP wrappers first, so destroying the group drops its last reference. Call it only after
    every rank succeeded: a rank that failed may leave the others inside a collective.
    """
    import gc
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
