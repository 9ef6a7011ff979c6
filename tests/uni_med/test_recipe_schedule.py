"""Uni-Med's recipe against the released training config (tsinghua-msiip/Uni-Med@63b9dfb): the learning-rate
schedule step by step, the settings that keep every other config's schedule as it was, the warmup keys'
validation, and the frozen ln_vision LayerNorm (``model.vision.output_norm``) before concat4."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightningmodules.optimization import build_optimizer, configure_from_hparams
from pipeline.config import load_config
from pipeline.config.errors import ConfigError
from pipeline.stages.base import Stage

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
UNI_MED = EXPERIMENTS / "uni_med"
OVERLAYS = {"defaults.yaml", "uni_med/cpu_tiny.yaml"}  # listed in other files' defaults, not experiments
STEPS = (0, 1, 2499, 4999, 5000, 27500, 49999)


def released_lr(step: int) -> float:
    """The released rate at iteration ``step``, written from the released code's formulas: LAVIS's
    LinearWarmupCosineLRScheduler (uni_med/common/optims.py:56-112), stepped before every iteration
    (uni_med/tasks/base_task.py:226) with train_configs/uni_med.yaml's run section (lines 152-161)."""
    init_lr, min_lr, warmup_lr = 1e-5, 1e-7, 1e-6
    warmup_steps, max_epoch, iters_per_epoch = 5000, 1, 50000
    epoch, i = divmod(step, iters_per_epoch)
    total_cur_step = epoch * iters_per_epoch + i
    if total_cur_step < warmup_steps:  # warmup_lr_schedule: from warmup_lr at step 0, linear in the step
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / max(warmup_steps, 1))
    # cosine_lr_schedule over every iteration of the run, the warmup's included
    progress = total_cur_step / (max_epoch * iters_per_epoch)
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)) + min_lr


def schedule(settings: dict, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """build_optimizer with a stage's optim_settings over one dummy parameter."""
    built = build_optimizer([nn.Parameter(torch.zeros(2, 2))], total_steps=total_steps, **settings)
    return built["optimizer"], built["lr_scheduler"]["scheduler"]


def multipliers(settings: dict, total_steps: int, steps: tuple[int, ...]) -> list[float]:
    _, sched = schedule(settings, total_steps)
    return [sched.lr_lambdas[0](s) for s in steps]


def stage_settings(path: Path, *overrides: str, stage: str | None = None) -> tuple[object, dict]:
    cfg = load_config(path, list(overrides), check_paths=False)
    name = stage or next(iter(cfg.stages))
    return cfg, Stage(cfg, name).optim_settings()


# -- the schedule -------------------------------------------------------------------------------------------


def test_recipe_run_length_is_the_released_one() -> None:
    cfg = load_config(UNI_MED / "recipe.yaml", check_paths=False)
    stage = cfg.stages.uni_med
    per_epoch = cfg.data.mixture.samples_per_epoch // cfg.data.batch_size
    # Lightning's estimated_stepping_batches: min(max_epochs x batches per epoch, max_steps)
    assert per_epoch * stage.max_epochs == stage.max_steps == 50000  # T:158 max_epoch 1 x T:161 iters_per_epoch
    assert cfg.data.batch_size == 4 and cfg.trainer.accumulate_grad_batches == 1


def test_recipe_schedule_equals_the_released_scheduler() -> None:
    cfg, settings = stage_settings(UNI_MED / "recipe.yaml")
    assert settings["warmup_steps"] == 5000 and settings["decay_from"] == "start"
    optimizer, sched = schedule(settings, cfg.stages.uni_med.max_steps)
    ours = [settings["lr"] * m for m in (sched.lr_lambdas[0](s) for s in STEPS)]
    assert ours == pytest.approx([released_lr(s) for s in STEPS], rel=1e-12, abs=0)
    # LambdaLR applies step 0's rate at construction: the first optimiser step runs at warmup_lr 1e-6
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-12)
    # the released shape: 1e-6 at step 0, just under 1e-5 at step 4999, then the cosine already at 10 % progress
    assert released_lr(4999) == pytest.approx(9.9982e-6, rel=1e-12)
    assert released_lr(5000) == pytest.approx(9.757729755661e-6, rel=1e-10)
    assert released_lr(49999) == pytest.approx(1e-7, rel=1e-7)


def test_the_scheduler_steps_once_per_optimiser_step() -> None:
    _, settings = stage_settings(UNI_MED / "recipe.yaml")
    optimizer, sched = schedule(settings, 50000)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert seen == pytest.approx([released_lr(0), released_lr(1), released_lr(2)], rel=1e-12)


def test_existing_schedules_are_unchanged() -> None:
    # tiny.yaml: 40 epochs x 24 batches = 960 steps, warmup ceil(0.03 x 960) = 29, cosine to 0.1 after it
    _, tiny = stage_settings(UNI_MED / "tiny.yaml")
    assert (tiny["warmup_steps"], tiny["warmup_start_ratio"], tiny["decay_from"]) == (None, 0.0, "warmup_end")
    assert multipliers(tiny, 960, (0, 14, 28, 29, 262, 960)) == pytest.approx(
        [1 / 29, 15 / 29, 1.0, 1.0, 0.8679295042198166, 0.1], rel=1e-12
    )  # step 262: 0.1 + 0.9 x 0.5 x (1 + cos(pi x 233 / 931))
    # demo.yaml: warmup_ratio 0.03, cosine to 0; over 100 steps: warmup 3, (step + 1) / 3
    _, demo = stage_settings(EXPERIMENTS / "demo.yaml")
    assert multipliers(demo, 100, (0, 1, 2, 3, 50, 100)) == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 1.0, 0.5242811110572241, 0.0], rel=1e-12, abs=1e-15
    )  # step 50: 0.5 x (1 + cos(pi x 47 / 97))


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in EXPERIMENTS.rglob("*.yaml")
        if p.relative_to(EXPERIMENTS).as_posix() not in OVERLAYS
        and p.relative_to(EXPERIMENTS).as_posix() != "uni_med/recipe.yaml"
        and not p.relative_to(EXPERIMENTS).as_posix().startswith("uni_med/ablations/")
    ),
    ids=lambda p: p.relative_to(EXPERIMENTS).as_posix(),
)
def test_other_experiments_keep_the_old_schedule_and_no_vision_norm(path: Path) -> None:
    """Only the released Uni-Med recipe (and its ablations, one-key deltas over it) use the new keys."""
    cfg = load_config(path, check_paths=False)
    assert cfg.model.vision.output_norm is False
    for name in cfg.stages:
        settings = Stage(cfg, name).optim_settings()
        assert (settings["warmup_steps"], settings["warmup_start_ratio"], settings["decay_from"]) == (
            None,
            0.0,
            "warmup_end",
        ), name


def test_the_modules_save_the_new_keys() -> None:
    """Every LightningModule the stages build takes optim_settings' keys, and configure_from_hparams reads them."""
    from lightningmodules.router_module import RouterModule
    from lightningmodules.vlm_module import VLMModule

    _, settings = stage_settings(UNI_MED / "recipe.yaml")
    for module_class in (VLMModule, RouterModule):
        assert set(settings) <= set(inspect.signature(module_class.__init__).parameters), module_class
    hparams = {**settings, "betas": list(settings["betas"])}

    class Hparams(dict):
        __getattr__ = dict.__getitem__

    module = SimpleNamespace(hparams=Hparams(hparams), trainer=SimpleNamespace(estimated_stepping_batches=50000))
    built = configure_from_hparams(module, [nn.Parameter(torch.zeros(2, 2))])
    sched = built["lr_scheduler"]["scheduler"]
    assert [settings["lr"] * sched.lr_lambdas[0](s) for s in STEPS] == pytest.approx(
        [released_lr(s) for s in STEPS], rel=1e-12
    )


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        (["stages.uni_med.optim.warmup_steps=100"], "stages.uni_med.optim.warmup_steps", "set .*warmup_ratio: 0"),
        (
            ["stages.uni_med.optim.warmup_steps=-1", "stages.uni_med.optim.warmup_ratio=0"],
            "stages.uni_med.optim.warmup_steps",
            "must be >= 0",
        ),
        (["stages.uni_med.optim.warmup_start_ratio=1.0"], "stages.uni_med.optim.warmup_start_ratio", r"\[0, 1\)"),
        (["stages.uni_med.optim.warmup_start_ratio=-0.1"], "stages.uni_med.optim.warmup_start_ratio", r"\[0, 1\)"),
        (["stages.uni_med.optim.decay_from=middle"], "stages.uni_med.optim.decay_from", "warmup_end"),
    ],
)
def test_bad_warmup_settings_name_the_key(overrides: list[str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"key '{key}'.*{reason}"):
        load_config(UNI_MED / "tiny.yaml", overrides, check_paths=False)


def test_zero_warmup_steps_is_no_warmup() -> None:
    _, settings = stage_settings(
        UNI_MED / "tiny.yaml", "stages.uni_med.optim.warmup_steps=0", "stages.uni_med.optim.warmup_ratio=0"
    )
    assert multipliers(settings, 100, (0, 100)) == pytest.approx([1.0, 0.1])


# -- ln_vision: the vision tower's output norm ----------------------------------------------------------------


@pytest.fixture
def normed_model(tiny_llama, tiny_clip, tmp_path: Path):
    """The tiny Uni-Med model with the recipe's ln_vision on."""
    from pipeline.model_factory import build_model

    cfg = load_config(UNI_MED / "tiny.yaml", [f"output_dir={tmp_path}/out", "model.vision.output_norm=true"])
    return cfg, build_model(cfg.model, cache_dir=cfg.cache_dir).model


def test_output_norm_is_a_fresh_frozen_layernorm_in_the_vision_group(normed_model) -> None:
    from pipeline.trainable import parameter_groups, set_trainable

    _, model = normed_model
    norm = model.vision.output_norm
    assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (model.vision.hidden_size,)
    assert norm.eps == 1e-5  # torch's default, as the released nn.LayerNorm(num_features)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert not any(p.requires_grad for p in norm.parameters())
    assert {"vision.output_norm.weight", "vision.output_norm.bias"} <= set(parameter_groups(model)["vision"])
    set_trainable(model, ["connector"])  # the recipe's groups (LoRA aside)
    assert not any(p.requires_grad for p in norm.parameters())
    set_trainable(model, ["connector", "vision"])  # unfrozen only with the vision tower, as freeze_vit: false
    assert all(p.requires_grad for p in norm.parameters())


def test_output_norm_runs_before_concat4(normed_model) -> None:
    """A spy on the encoder, the aggregation and the connector: encoder layer -2 (CLS dropped) -> LayerNorm
    over each D-wide token -> 4 consecutive tokens concatenated -> connector."""
    _, model = normed_model
    model.eval()
    vision = model.vision
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-identity norm, so that the spy sees its weights used
        vision.output_norm.weight.copy_(1.0 + 0.5 * torch.randn(vision.hidden_size, generator=gen))
        vision.output_norm.bias.copy_(0.1 * torch.randn(vision.hidden_size, generator=gen))
    seen: dict[str, torch.Tensor] = {}

    def spy(name: str, pick):
        def hook(module: nn.Module, *args: object) -> None:  # returns None: the forward is left as it is
            seen[name] = pick(*args)

        return hook

    hooks = [
        vision.encoder.register_forward_hook(spy("encoder", lambda inputs, out: out.hidden_states[-2])),
        model.aggregation.register_forward_pre_hook(spy("aggregation_in", lambda inputs: inputs[0])),
        model.connector.register_forward_pre_hook(spy("connector_in", lambda inputs: inputs[0])),
    ]
    px = torch.randn(2, 3, vision.image_size, vision.image_size, generator=gen)
    with torch.no_grad():
        model.encode_images(px, torch.tensor([0, 1]))
    for hook in hooks:
        hook.remove()
    assert model.aggregation.mode == "concat4"
    patches = seen["encoder"][:, vision.num_prefix_tokens :]  # (N, P, D)
    normed = F.layer_norm(patches, (vision.hidden_size,), vision.output_norm.weight, vision.output_norm.bias, 1e-5)
    torch.testing.assert_close(seen["aggregation_in"], normed, rtol=0, atol=1e-6)
    n, p, d = normed.shape
    torch.testing.assert_close(seen["connector_in"], normed.reshape(n, p // 4, 4 * d), rtol=0, atol=1e-6)
    # normalised per D-wide token, not over the concatenated 4D (that would be a LayerNorm after concat4)
    chunks = ((seen["connector_in"] - vision.output_norm.bias.repeat(4)) / vision.output_norm.weight.repeat(4)).reshape(
        n, p // 4, 4, d
    )
    torch.testing.assert_close(chunks.mean(-1), torch.zeros(n, p // 4, 4), rtol=0, atol=1e-4)


def test_output_norm_off_leaves_the_features_alone(tiny_clip) -> None:
    from lightningmodules.models.vision import VisionTower, load_vision_model

    enc = load_vision_model(tiny_clip).eval()
    px = torch.randn(1, 3, enc.config.image_size, enc.config.image_size, generator=torch.Generator().manual_seed(1))
    plain = VisionTower(encoder=enc)
    normed = VisionTower(encoder=enc, output_norm=True)
    assert plain.output_norm is None and "output_norm.weight" not in plain.state_dict()
    with torch.no_grad():
        raw = plain(px)
        torch.testing.assert_close(normed(px), F.layer_norm(raw, (raw.shape[-1],), eps=1e-5), rtol=0, atol=1e-6)
        # half-precision features: normalised in float32, returned in their dtype (the released fp16 LayerNorm)
        half = normed.normalize(raw.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    expected = F.layer_norm(raw.to(torch.bfloat16).float(), (raw.shape[-1],))
    torch.testing.assert_close(half.float(), expected, atol=1e-2, rtol=0)


def test_output_norm_survives_a_handover_round_trip(normed_model, tmp_path: Path) -> None:
    from pipeline.handover import restore, save_handover
    from pipeline.model_factory import build_model

    cfg, model = normed_model
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.vision.output_norm.weight.copy_(torch.randn(model.vision.hidden_size, generator=gen))
        model.vision.output_norm.bias.copy_(torch.randn(model.vision.hidden_size, generator=gen))
    path = save_handover(model, tmp_path / "uni_med.pt", stage="uni_med")
    fresh = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    assert torch.equal(fresh.vision.output_norm.weight, torch.ones(model.vision.hidden_size))
    restore(fresh, path)
    assert torch.equal(fresh.vision.output_norm.weight, model.vision.output_norm.weight)
    assert torch.equal(fresh.vision.output_norm.bias, model.vision.output_norm.bias)
    assert not fresh.vision.output_norm.weight.requires_grad  # still frozen after the load
    # a model built without the norm does not silently drop it
    plain_cfg = load_config(UNI_MED / "tiny.yaml", [f"output_dir={tmp_path}/out"])
    plain = build_model(plain_cfg.model, cache_dir=plain_cfg.cache_dir).model
    with pytest.raises(ValueError, match="unexpected.*output_norm"):
        restore(plain, path)
