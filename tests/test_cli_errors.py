"""Errors reach the ``medpipe`` user as one ``medpipe: error:`` line (issue 14, point 9): exit 2 for usage and
config errors (as argparse), 1 for the rest; the traceback only with ``--traceback``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"
MEDPIPE = Path(sys.executable).parent / "medpipe"


def medpipe(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MEDPIPE_TRACEBACK"}
    run_overrides = [f"output_dir={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    command = [str(MEDPIPE), *argv, *(run_overrides if "train" in argv else [])]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("medpipe: error: "), done.stderr
    return lines[0]


def test_a_config_error_is_one_line_exit_two(tmp_path: Path) -> None:
    done = medpipe("train", str(DEMO), "data.batch_size=abc", tmp_path=tmp_path)
    assert done.returncode == 2
    assert one_error_line(done).startswith("medpipe: error: command line: key 'data.batch_size':")


def test_a_folder_that_is_not_a_checkpoint_is_one_line_exit_one(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    done = medpipe("train", str(DEMO), f"model.llm.path={folder}", tmp_path=tmp_path)
    assert done.returncode == 1
    line = one_error_line(done)
    assert line.startswith(f"medpipe: error: model.llm.path: {folder} is not a checkpoint folder: no tokenizer files")
    assert "Couldn't instantiate" not in done.stderr


@pytest.mark.parametrize("traceback", [False, True])
def test_a_lora_target_error_is_one_line_and_a_traceback_on_request(
    traceback: bool, tmp_path: Path, cache_dir: Path
) -> None:
    from pipeline.zoo import ensure_tiny

    ensure_tiny("phi", cache_dir)  # built here, so the command's stderr holds its error alone
    wrong = ["model.llm.path=tiny:phi", "stages.instruct.lora.target_modules=[q_proj,gate_proj,up_proj]"]
    done = medpipe(*(["--traceback"] if traceback else []), "train", str(DEMO), *wrong, tmp_path=tmp_path)
    assert done.returncode == 1
    message = "stages.instruct.lora.target_modules: gate_proj, up_proj not in the LLM (its Linear layers: q_proj, "
    if traceback:
        assert "Traceback (most recent call last)" in done.stderr
        assert f"PreflightError: {message}" in done.stderr
    else:
        assert one_error_line(done).startswith(f"medpipe: error: {message}")
    assert not (tmp_path / "out" / "stages").exists()


def test_library_errors_say_their_kind() -> None:
    """A TypeError (e.g. from a processor file) or a jinja TemplateError (a chat template) is expected, and its
    one line says what kind of error it is; our own errors are their message alone."""
    from jinja2.exceptions import TemplateError

    from pipeline.cli import error_line, expected_errors
    from pipeline.config import ConfigError

    for kind in (TypeError, TemplateError, ImportError, ConfigError, FileNotFoundError, ValueError):
        assert issubclass(kind, expected_errors())
    assert error_line(TemplateError("System role not supported\nmore")) == (
        "medpipe: error: TemplateError: System role not supported"
    )
    assert error_line(TypeError("'int' object is not subscriptable")) == (
        "medpipe: error: TypeError: 'int' object is not subscriptable"
    )
    assert error_line(ValueError("stages.s.train: lora has no parameters")) == (
        "medpipe: error: stages.s.train: lora has no parameters"
    )
    assert error_line(ImportError("timm vision towers need medpipe[timm]")) == (
        "medpipe: error: timm vision towers need medpipe[timm]"
    )
