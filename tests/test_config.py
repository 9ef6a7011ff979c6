"""pipeline.config.load_config and the `medpipe` CLI's config handling.

Every error must be a ConfigError whose one-line message names the layer (file path or
"command line") and the dotted key. None of these tests builds a model: tiny:<name> paths are only
checked against the list of builders.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"
CLI = "command line"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path, overrides=(), **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base (in a sub-folder) <- mid <- exp, each overriding some of the previous layer's keys."""
    write(
        tmp_path / "shared" / "base.yaml",
        """\
        name: base
        seed: 1
        data:
          batch_size: 4
          num_workers: 5
          max_length: 100
        model:
          connector: {type: linear}
        """,
    )
    write(
        tmp_path / "mid.yaml",
        """\
        defaults: [shared/base.yaml]
        seed: 2
        data: {batch_size: 6}
        """,
    )
    (tmp_path / "toy_data").mkdir()
    return write(
        tmp_path / "exp.yaml",
        f"""\
        defaults: [mid.yaml]
        name: exp
        data:
          max_length: 200
          datasets:
            toy: {{format: slake, path: {tmp_path / "toy_data"}}}
        stages:
          s1: {{train: [connector], optim: {{lr: 0.01, scheduler: linear}}}}
        """,
    )


# -- resolved values -------------------------------------------------------------------------------


def test_demo_resolves() -> None:
    cfg = load_config(DEMO)
    assert cfg.name == "demo"
    assert cfg.output_dir == "outputs/demo"  # ${name} interpolation from defaults.yaml
    ds = cfg.data.datasets.phantom_slake
    assert ds.path == "outputs/demo/data/phantom_slake"  # ${output_dir} resolved
    assert ds.format == "slake"
    assert ds.synthetic.train_images == 240 and ds.synthetic.test_images == 60
    assert ds.synthetic.questions_per_image == 6  # schema default under a file-given section
    assert cfg.data.batch_size == 16  # demo.yaml beats defaults.yaml (8)
    assert cfg.data.num_workers == 0  # from defaults.yaml
    assert list(cfg.stages) == ["align", "instruct"]  # stage order kept
    assert list(cfg.stages.align.train) == ["connector"]
    assert cfg.stages.align.lora is None
    assert cfg.stages.align.optim.lr == pytest.approx(2e-3)
    assert list(cfg.stages.align.datasets) == ["phantom_captions"]
    assert cfg.data.datasets.phantom_captions.synthetic.kind == "caption"
    assert list(cfg.stages.instruct.train) == ["connector", "lora"]
    assert cfg.stages.instruct.lora.r == 16 and cfg.stages.instruct.lora.alpha == 32
    assert cfg.stages.instruct.max_epochs == 14
    assert cfg.model.vision.path == "tiny:clip" and cfg.model.llm.path == "tiny:llama"
    assert cfg.model.vision.select_layer == -2
    assert cfg.evaluation.after_each_stage is True and cfg.evaluation.batch_size == 32
    assert cfg.mlflow.experiment_name == "medpipe-demo"


def test_demo_result_is_read_only() -> None:
    from omegaconf.errors import ReadonlyConfigError

    cfg = load_config(DEMO)
    with pytest.raises(ReadonlyConfigError):
        cfg.data.batch_size = 3


def test_demo_overrides_and_interpolation_follow_cli() -> None:
    cfg = load_config(DEMO, ["name=other", "data.batch_size=3", "stages.instruct.lora.r=4", "trainer.devices=2"])
    assert cfg.output_dir == "outputs/other"  # interpolation sees the command-line name
    assert cfg.data.datasets.phantom_slake.path == "outputs/other/data/phantom_slake"
    assert cfg.data.batch_size == 3
    assert cfg.stages.instruct.lora.r == 4
    assert cfg.trainer.devices == 2


def test_precedence_defaults_file_cli(chain: Path) -> None:
    cfg = load_config(chain)
    assert cfg.name == "exp"  # file beats base
    assert cfg.seed == 2  # mid beats base
    assert cfg.data.batch_size == 6  # mid beats base
    assert cfg.data.num_workers == 5  # only in base
    assert cfg.data.max_length == 200  # file beats base
    assert cfg.model.connector.type == "linear"  # only in base
    assert cfg.model.connector.aggregation == "none"  # schema default
    assert cfg.output_dir == "outputs/exp"
    assert cfg.stages.s1.optim.lr == pytest.approx(0.01)
    assert cfg.stages.s1.optim.scheduler == "linear"
    assert cfg.stages.s1.optim.warmup_ratio == pytest.approx(0.03)  # schema default inside a stage

    cfg = load_config(chain, ["seed=9", "data.num_workers=7", "name=cli"])
    assert cfg.seed == 9 and cfg.data.num_workers == 7 and cfg.name == "cli"
    assert cfg.output_dir == "outputs/cli"
    assert cfg.data.batch_size == 6  # untouched by the overrides


def test_defaults_as_single_string(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "seed: 5\n")
    cfg = load_config(write(tmp_path / "b.yaml", "defaults: a.yaml\nname: b\n"))
    assert cfg.seed == 5 and cfg.name == "b"


def test_defaults_are_relative_to_the_including_file(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "x" / "y" / "leaf.yaml", "seed: 11\n")
    write(tmp_path / "x" / "mid.yaml", "defaults: [y/leaf.yaml]\n")
    top = write(tmp_path / "top.yaml", "defaults: [x/mid.yaml]\n")
    monkeypatch.chdir(tmp_path / "x" / "y")  # the working directory must not matter
    assert load_config(top).seed == 11


# -- unknown keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, key",
    [
        ("colour: red\n", "colour"),
        ("model:\n  vision:\n    patch: 3\n", "model.vision.patch"),
        ("model:\n  nonsense: 1\n", "model.nonsense"),
        ("stages:\n  s1:\n    epochs: 3\n", "stages.s1.epochs"),
        ("stages:\n  s1:\n    optim: {learning_rate: 0.1}\n", "stages.s1.optim.learning_rate"),
        ("data:\n  datasets:\n    toy: {path: /tmp, colour: red}\n", "data.datasets.toy.colour"),
    ],
)
def test_unknown_key_in_file(tmp_path: Path, body: str, key: str) -> None:
    path = write(tmp_path / "exp.yaml", body)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert f"unknown key '{key}'" in message


def test_unknown_key_in_defaults_file_names_that_file(chain: Path) -> None:
    base = chain.parent / "shared" / "base.yaml"
    base.write_text(base.read_text() + "trainer: {gpus: 2}\n")
    message = config_error(chain)
    assert message.startswith(f"{base}: ")
    assert "'trainer.gpus'" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("colour=red", "colour"),
        ("model.llm.size=7b", "model.llm.size"),
        ("stages.align.epochs=2", "stages.align.epochs"),
        ("data.datasets.phantom_slake.colour=red", "data.datasets.phantom_slake.colour"),
    ],
)
def test_unknown_key_on_command_line(override: str, key: str) -> None:
    message = config_error(DEMO, [override])
    assert message.startswith(f"{CLI}: ")
    assert f"unknown key '{key}'" in message


# -- wrong types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("stages.align.optim.lr=x", "stages.align.optim.lr"),
        ("data.task_prefix=maybe", "data.task_prefix"),
        ("stages.instruct.lora.r=big", "stages.instruct.lora.r"),
    ],
)
def test_wrong_type_on_command_line(override: str, key: str) -> None:
    message = config_error(DEMO, [override])
    assert message.startswith(f"{CLI}: key '{key}': ")


def test_wrong_type_in_file(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "data: {batch_size: 4}\n")
    path = write(tmp_path / "exp.yaml", "defaults: [base.yaml]\nstages:\n  s1:\n    optim: {lr: fast}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'stages.s1.optim.lr': ")
    assert "fast" in message


def test_section_given_a_scalar_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "model: 3\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ")


def test_section_given_a_scalar_message_is_useful(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "model: 3\n")
    message = config_error(path)
    assert "None" not in message.removeprefix(f"{path}: ")
    assert "model" in message.removeprefix(f"{path}: ")


# -- semantic checks: choices -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, bad",
    [
        ("model.connector.type=conv", "model.connector.type", "conv"),
        ("model.connector.aggregation=sum", "model.connector.aggregation", "sum"),
        ("stages.align.optim.scheduler=step", "stages.align.optim.scheduler", "step"),
        ("stages.align.train=[connector,head]", "stages.align.train", "head"),
        ("data.on_bad_record=ignore", "data.on_bad_record", "ignore"),
        ("trainer.precision=8-bit", "trainer.precision", "8-bit"),
    ],
)
def test_bad_choice_on_command_line(override: str, key: str, bad: str) -> None:
    message = config_error(DEMO, [override])
    assert message.startswith(f"{CLI}: key '{key}': ")
    assert repr(bad) in message


def test_bad_choice_names_the_defaults_file_that_set_it(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "model: {connector: {type: conv}}\n")
    path = write(tmp_path / "exp.yaml", "defaults: [base.yaml]\nname: x\n")
    message = config_error(path)
    assert message.startswith(f"{base}: key 'model.connector.type': ")


def test_bad_stage_train_group_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "stages:\n  s1: {train: [connector, decoder]}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'stages.s1.train': ")
    assert "'decoder'" in message


def test_lora_trainable_without_lora_section(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "stages:\n  s1: {train: [connector, lora]}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'stages.s1.train': ")
    assert "lora" in message
    # the demo's align stage has no lora section either
    message = config_error(DEMO, ["stages.align.train=[lora]"])
    assert message.startswith(f"{CLI}: key 'stages.align.train': ")


def test_lora_trainable_with_lora_section_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "stages:\n  s1: {train: [connector, lora], lora: {r: 2}}\n")
    cfg = load_config(path)
    assert cfg.stages.s1.lora.r == 2 and cfg.stages.s1.lora.alpha == 16


def test_non_positive_values(tmp_path: Path) -> None:
    message = config_error(DEMO, ["data.batch_size=0"])
    assert message.startswith(f"{CLI}: key 'data.batch_size': ")
    message = config_error(DEMO, ["stages.align.optim.lr=-1"])
    assert message.startswith(f"{CLI}: key 'stages.align.optim.lr': ")
    message = config_error(DEMO, ["stages.align.optim.warmup_ratio=1.0"])
    assert message.startswith(f"{CLI}: key 'stages.align.optim.warmup_ratio': ")


# -- semantic checks: paths ---------------------------------------------------------------------------


def test_missing_dataset_folder_without_synthetic(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    path = write(tmp_path / "exp.yaml", f"data:\n  datasets:\n    toy: {{path: {missing}}}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'data.datasets.toy.path': ")
    assert str(missing) in message
    # fine with check_paths=False, or with a synthetic section (written on first use)
    assert load_config(path, check_paths=False).data.datasets.toy.path == str(missing)
    assert (
        load_config(path, ["data.datasets.toy.synthetic.train_images=3"]).data.datasets.toy.synthetic.train_images == 3
    )


def test_missing_dataset_folder_from_command_line(tmp_path: Path) -> None:
    message = config_error(
        DEMO, ["data.datasets.phantom_slake.synthetic=null", f"data.datasets.phantom_slake.path={tmp_path / 'gone'}"]
    )
    assert message.startswith(f"{CLI}: key 'data.datasets.phantom_slake.path': ")


def test_dataset_without_path_raises_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "data:\n  datasets:\n    toy: {format: slake}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'data.datasets.toy.path': ")


def test_missing_model_checkpoint_dir(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "llama-7b"
    message = config_error(DEMO, [f"model.llm.path={missing}"])
    assert message.startswith(f"{CLI}: key 'model.llm.path': ")
    assert str(missing) in message
    path = write(tmp_path / "exp.yaml", f"model:\n  vision: {{path: {missing}}}\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'model.vision.path': ")
    # an existing directory passes the check (loading is a later step)
    missing.mkdir(parents=True)
    assert load_config(DEMO, [f"model.llm.path={missing}"]).model.llm.path == str(missing)


def test_unknown_tiny_model() -> None:
    message = config_error(DEMO, ["model.vision.path=tiny:resnet"])
    assert message.startswith(f"{CLI}: key 'model.vision.path': ")
    assert "'resnet'" in message and "clip" in message


def test_tiny_tokenizer_is_not_a_model() -> None:
    config_error(DEMO, ["model.llm.path=tiny:tokenizer"])


def test_missing_ckpt_file(tmp_path: Path) -> None:
    missing = tmp_path / "handover.pt"
    message = config_error(DEMO, [f"ckpt={missing}"])
    assert message.startswith(f"{CLI}: key 'ckpt': ")
    assert str(missing) in message
    missing.write_bytes(b"x")
    assert load_config(DEMO, [f"ckpt={missing}"]).ckpt == str(missing)


def test_missing_init_from(tmp_path: Path) -> None:
    message = config_error(DEMO, [f"stages.instruct.init_from={tmp_path / 'x.pt'}"])
    assert message.startswith(f"{CLI}: key 'stages.instruct.init_from': ")
    assert load_config(DEMO, ["stages.instruct.init_from=align"]).stages.instruct.init_from == "align"


# -- file-level errors ----------------------------------------------------------------------------------


def test_missing_defaults_file(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "defaults: [nope.yaml]\n")
    message = config_error(path)
    assert message.startswith(f"{tmp_path / 'nope.yaml'}: ")
    assert "not found" in message and str(path) in message


def test_missing_config_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "absent.yaml")
    assert message.startswith(f"{tmp_path / 'absent.yaml'}: ") and "not found" in message


def test_circular_defaults(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    b = write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    message = config_error(a)
    assert "circular" in message
    assert message.startswith(f"{a}: ")
    assert f"{a} -> {b} -> {a}" in message


def test_self_including_defaults(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "defaults: [./a.yaml]\n")
    assert "circular" in config_error(a)


def test_diamond_defaults_are_not_circular(tmp_path: Path) -> None:
    write(tmp_path / "common.yaml", "seed: 3\n")
    write(tmp_path / "left.yaml", "defaults: [common.yaml]\nname: left\n")
    write(tmp_path / "right.yaml", "defaults: [common.yaml]\ndata: {batch_size: 2}\n")
    cfg = load_config(write(tmp_path / "top.yaml", "defaults: [left.yaml, right.yaml]\n"))
    assert (cfg.seed, cfg.name, cfg.data.batch_size) == (3, "left", 2)


def test_malformed_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "name: [unclosed\nseed: : :\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ") and "YAML" in message


def test_malformed_yaml_in_defaults(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "data: {batch_size: 3\n")
    path = write(tmp_path / "exp.yaml", "defaults: [bad.yaml]\n")
    assert config_error(path).startswith(f"{bad}: ")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert config_error(path).startswith(f"{path}: ")


def test_override_without_equals() -> None:
    message = config_error(DEMO, ["data.batch_size"])
    assert message.startswith(f"{CLI}: ") and "'data.batch_size'" in message and "key=value" in message


def test_unresolvable_interpolation(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "output_dir: ${nowhere}/x\n")
    message = config_error(path)
    assert message.startswith(f"{path}: key 'output_dir': ")


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_config_show(capsys) -> None:
    from pipeline.cli import main

    assert main(["config", "show", str(DEMO), "name=shown"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["output_dir"] == "outputs/shown"
    assert shown["data"]["datasets"]["phantom_slake"]["path"] == "outputs/shown/data/phantom_slake"
    assert shown["stages"]["instruct"]["lora"]["r"] == 16


def test_cli_config_show_no_path_check(capsys, tmp_path: Path) -> None:
    from pipeline.cli import main

    assert main(["config", "show", str(DEMO), f"model.llm.path={tmp_path / 'absent'}"]) == 2
    capsys.readouterr()
    assert main(["config", "show", "--no-path-check", str(DEMO), f"model.llm.path={tmp_path / 'absent'}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["llm"]["path"] == str(tmp_path / "absent")


def test_cli_config_error_exit_code_and_one_line(capsys) -> None:
    from pipeline.cli import main

    assert main(["config", "show", str(DEMO), "data.batch_size=abc"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("medpipe: error: command line: key 'data.batch_size':")


def test_cli_missing_config_file(capsys, tmp_path: Path) -> None:
    from pipeline.cli import main

    assert main(["config", "show", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medpipe: error: ") and "nope.yaml" in err[0]


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["config", "show", "--help"], ["demo", "--help"]]
)
def test_cli_help_exits_zero(argv, capsys) -> None:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: medpipe" in capsys.readouterr().out


def test_cli_without_command_exits_two(capsys) -> None:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
