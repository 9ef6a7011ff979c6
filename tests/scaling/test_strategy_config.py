"""trainer.strategy / devices / precision checks and the strategy objects handed to Lightning."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"


def load(*overrides: str):
    return load_config(DEMO, list(overrides), check_paths=False)


@pytest.mark.parametrize("strategy", ["auto", "ddp", "ddp_find_unused_parameters_true"])
def test_plain_strategies_load(strategy: str) -> None:
    assert load(f"trainer.strategy={strategy}", "trainer.devices=2", "trainer.num_nodes=2").trainer.strategy == strategy


def test_unknown_and_spawn_strategies_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"command line: key 'trainer.strategy': 'dp' is not one of auto, ddp"):
        load("trainer.strategy=dp")
    with pytest.raises(ConfigError, match=r"'ddp_spawn' is not supported.*torchrun"):
        load("trainer.strategy=ddp_spawn")


def test_deepspeed_without_deepspeed_installed_names_key_file_and_fix(tmp_path: Path, monkeypatch) -> None:
    from pipeline import strategies

    monkeypatch.setattr(strategies, "deepspeed_available", lambda: False)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"defaults: [{DEMO}]\ntrainer: {{strategy: deepspeed_stage_2}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp, [], check_paths=False)
    assert str(err.value) == (
        f"{exp}: key 'trainer.strategy': 'deepspeed_stage_2' needs DeepSpeed, which is not "
        "installed: pip install deepspeed (or choose one of auto, ddp, "
        "ddp_find_unused_parameters_true, fsdp, fsdp2)"
    )
    monkeypatch.setattr(strategies, "deepspeed_available", lambda: True)
    assert load_config(exp, [], check_paths=False).trainer.strategy == "deepspeed_stage_2"


@pytest.mark.parametrize("devices", ["0", "-2", "[]", "x", "true"])
def test_bad_devices_are_config_errors(devices: str) -> None:
    with pytest.raises(ConfigError, match="key 'trainer.devices'"):
        load(f"trainer.devices={devices}")


@pytest.mark.parametrize(
    "devices,expected", [("auto", "auto"), ("2", 2), ("-1", -1), ("[0,1]", [0, 1]), ("'0,1'", "0,1")]
)
def test_good_devices_load(devices: str, expected) -> None:
    value = load(f"trainer.devices={devices}").trainer.devices
    assert (list(value) if not isinstance(value, (str, int)) else value) == expected


def test_precision_choices() -> None:
    for precision in ("bf16-mixed", "16-mixed", "32-true", "32", "bf16-true"):
        assert load(f"trainer.precision={precision}").trainer.precision == precision
    with pytest.raises(ConfigError, match=r"key 'trainer.precision': 'fp8' is not one of"):
        load("trainer.precision=fp8")
    with pytest.raises(ConfigError, match=r"key 'trainer.precision': 16-mixed needs a GPU"):
        load("trainer.accelerator=cpu", "trainer.precision=16-mixed")
    with pytest.raises(ConfigError, match=r"key 'trainer.accumulate_grad_batches': must be > 0"):
        load("trainer.accumulate_grad_batches=0")


def test_fsdp_on_cpu_is_a_clear_error_at_load_and_at_trainer_build(monkeypatch) -> None:
    with pytest.raises(
        ConfigError,
        match=r"key 'trainer.strategy': 'fsdp' needs CUDA GPUs: Lightning .* refuses "
        r"FSDPStrategy with accelerator='cpu'.*use trainer.strategy=ddp on CPU",
    ):
        load("trainer.strategy=fsdp", "trainer.accelerator=cpu")
    import torch

    from pipeline.trainer_factory import build_trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load("trainer.strategy=fsdp")  # accelerator auto: decided when the trainer is built
    with pytest.raises(ConfigError, match=r"'fsdp' needs CUDA GPUs.*no CUDA GPU here"):
        build_trainer(cfg.trainer)


def test_lightning_itself_refuses_fsdp_on_cpu() -> None:
    """What docs/scaling.md states: not our choice, Lightning 2.6's accelerator connector."""
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=1, strategy="fsdp", logger=False)


def test_fsdp_strategy_wraps_each_decoder_and_encoder_layer(tiny_llama: Path, tiny_clip: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from pipeline.model_factory import build_model
    from pipeline.strategies import build_strategy

    strategy = build_strategy("fsdp", "cuda")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trainable parameters in one unit
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    model = build_model(load().model).model
    classes = tuple(policy._module_classes)
    wrapped = sorted({type(m).__name__ for m in model.modules() if isinstance(m, classes)})
    assert wrapped == ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    n_llm_layers = model.llm.config.num_hidden_layers
    assert sum(isinstance(m, classes) for m in model.llm.modules()) == n_llm_layers
    assert build_strategy("ddp", "cpu") == "ddp"


def test_shutdown_distributed_destroys_the_group_a_ddp_wrapper_still_holds(monkeypatch) -> None:
    """What `medpipe train` does after a successful run: the group goes even while a (finished) DDP wrapper
    still references it, and a second call, or a process without a group, is a no-op."""
    import torch
    import torch.distributed as dist
    from launch import free_port

    from pipeline.strategies import shutdown_distributed

    shutdown_distributed()  # no group: nothing to do
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    ddp(torch.randn(2, 3)).sum().backward()
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()
    assert ddp.module.weight.grad is not None


def test_fsdp2_needs_a_device_count(tmp_path: Path) -> None:
    """fsdp2 shards over a known number of processes: ``auto`` is refused naming the key."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"defaults: [{DEMO}]\ntrainer: {{strategy: fsdp2, devices: auto}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp, [], check_paths=False)
    assert str(err.value) == (
        f"{exp}: key 'trainer.devices': fsdp2 shards over a known number of processes: set trainer.devices to a count"
    )
    assert load_config(exp, ["trainer.devices=2"], check_paths=False).trainer.strategy == "fsdp2"


def test_fsdp2_is_lightnings_model_parallel_strategy_over_every_process() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pipeline.strategies import build_strategy

    strategy = build_strategy("fsdp2", "cpu", world_size=4)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
