"""Issue 16, class 4 (config side): a NaN, an infinity or an out-of-range value is a ConfigError naming the key,
for every float field of the schema (one generic check, ``medcore.checks.finite``, plus each section's ranges),
``seed`` and ``trainer.gradient_clip_val`` included. Nothing here builds a model."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"
TINY_RECIPES = [
    REPO / "experiments" / "demo.yaml",
    REPO / "experiments" / "med_moe" / "tiny.yaml",
    REPO / "experiments" / "medplib" / "tiny.yaml",
    REPO / "experiments" / "uni_med" / "tiny.yaml",
]
# datamodules/specs.py keeps its own ranges; NaN and inf are refused there by the generic check like everywhere


def config_error(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, check_paths=False)
    message = str(info.value)
    assert "\n" not in message, message
    return message


OPTIM = "stages.instruct.optim"
SAMPLING = ["evaluation.do_sample=true"]
KEYS = [
    (f"{OPTIM}.lr", []),
    (f"{OPTIM}.weight_decay", []),
    (f"{OPTIM}.warmup_ratio", []),
    (f"{OPTIM}.min_lr_ratio", []),
    (f"{OPTIM}.warmup_start_ratio", []),
    ("stages.instruct.lora.dropout", []),
    ("evaluation.mask_threshold", []),
    ("evaluation.temperature", SAMPLING),
    ("evaluation.top_p", SAMPLING),
    ("evaluation.repetition_penalty", []),
    ("trainer.gradient_clip_val", []),
    ("trainer.val_check_interval", []),
    ("trainer.limit_val_batches", []),
    ("mlflow.system_metrics_interval", []),
    ("model.connector.router_hidden_ratio", []),
    ("data.datasets.phantom_slake.weight", []),
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
@pytest.mark.parametrize(("key", "extra"), KEYS, ids=[k for k, _ in KEYS])
def test_a_bad_float_names_its_key(key: str, extra: list[str], value: str) -> None:
    message = config_error(DEMO, [*extra, f"{key}={value}"])
    assert message.startswith(f"command line: key '{key}': "), message
    assert value.lstrip("-") in message, message


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1.0", "1.5"])
def test_betas_are_finite_and_in_zero_one(value: str) -> None:
    message = config_error(DEMO, [f"{OPTIM}.betas=[0.9,{value}]"])
    assert message.startswith(f"command line: key '{OPTIM}.betas': "), message


def test_betas_are_two_values() -> None:
    assert "two values" in config_error(DEMO, [f"{OPTIM}.betas=[0.9]"])


@pytest.mark.parametrize("term", ["ce", "bce", "dice", "focal", "focal_gamma"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_grounding_loss_weights(term: str, value: str) -> None:
    key = f"model.grounding.loss.{term}"
    message = config_error(REPO / "experiments" / "medplib" / "tiny.yaml", [f"{key}={value}"])
    assert message.startswith(f"command line: key '{key}': "), message


@pytest.mark.parametrize("key", ["aux_loss_coef", "z_loss_coef", "jitter", "capacity_factor"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_moe_coefficients(key: str, value: str) -> None:
    full = f"stages.stage3.moe.{key}"
    message = config_error(REPO / "experiments" / "med_moe" / "tiny.yaml", [f"{full}={value}"])
    assert message.startswith(f"command line: key '{full}': "), message


@pytest.mark.parametrize("value", ["-1", str(2**32)])
def test_seed_range(value: str) -> None:
    assert config_error(DEMO, [f"seed={value}"]) == (
        f"command line: key 'seed': must be in [0, {2**32 - 1}], got {value}"
    )


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_seed_is_an_integer(value: str) -> None:
    assert config_error(DEMO, [f"seed={value}"]).startswith("command line: key 'seed': ")


def test_gradient_clipping_off_is_null_or_zero_never_negative() -> None:
    """Lightning skips clipping for a value <= 0: null and 0 say "off", -1 would have said it silently."""
    for value in ("null", "0", "0.5"):
        load_config(DEMO, [f"trainer.gradient_clip_val={value}"], check_paths=False)
    assert config_error(DEMO, ["trainer.gradient_clip_val=-1"]) == (
        "command line: key 'trainer.gradient_clip_val': must be >= 0, got -1.0"
    )


def test_a_yaml_nan_names_the_file(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"defaults: [{DEMO}]\nstages:\n  instruct:\n    optim: {{lr: .inf}}\n")
    assert config_error(exp, []) == f"{exp}: key '{OPTIM}.lr': must be a finite number, got inf"


def float_keys(node, key: str = ""):
    """Dotted keys of every float field (``float``, ``float | None``) of a typed config; of the sections in a
    dict (datasets, stages) the first one only: they share one dataclass."""
    for f in fields(node):
        value = getattr(node, f.name)
        dotted = f"{key}.{f.name}" if key else f.name
        if is_dataclass(value):
            yield from float_keys(value, dotted)
        elif isinstance(value, dict) and any(is_dataclass(v) for v in value.values()):
            name, child = next(iter(value.items()))
            yield from float_keys(child, f"{dotted}.{name}")
        elif "float" in str(f.type) and "list" not in str(f.type):
            yield dotted


@pytest.mark.parametrize("recipe", TINY_RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_float_field_of_every_tiny_recipe_refuses_nan_inf_and_minus_one(recipe: Path) -> None:
    """Generic over the schema: a float field added later is covered by the finite check, and fails here
    until it has a range (a value of -1 is wrong for every float key we have)."""
    typed = OmegaConf.to_object(load_config(recipe, [], check_paths=False))
    keys = list(float_keys(typed))
    assert len(keys) > 15, keys
    for key in keys:
        for value in ("nan", "inf", "-1"):
            extra = SAMPLING if key.startswith("evaluation.") and key.endswith(("temperature", "top_p")) else []
            message = config_error(recipe, [*extra, f"{key}={value}"])
            assert f"key '{key}'" in message, (key, value, message)


def test_the_cli_says_one_line_without_a_traceback(capsys) -> None:
    from pipeline.cli import main

    assert main(["train", str(DEMO), f"{OPTIM}.lr=inf"]) == 2
    out, err = capsys.readouterr()
    assert err == f"medpipe: error: command line: key '{OPTIM}.lr': must be a finite number, got inf\n"
    assert "Traceback" not in out + err
