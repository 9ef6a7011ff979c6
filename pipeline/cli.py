"""The ``medpipe`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "experiments" / "demo.yaml"

log = logging.getLogger("medpipe")


def _quiet_libraries() -> None:
    """Keep the console to progress bars and our own lines: no warning walls from the stack."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches .* is smaller than the logging.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*(torch.tensor results are registered|sync_dist=True).*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "mlflow",
        "alembic",
        "transformers",
        "httpx",
        "urllib3",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _setup_logging(verbose: bool) -> None:
    from pipeline.tracking import is_rank_zero

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("medpipe: %(message)s"))
    for name in ("medpipe", "pipeline", "datamodules", "lightningmodules"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        # ranks other than 0 keep warnings and errors only: one copy of every progress line
        logger.setLevel((logging.DEBUG if verbose else logging.INFO) if is_rank_zero() else logging.WARNING)
        logger.propagate = False


def cmd_config_show(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides, check_paths=not args.no_path_check)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    return 0


def _print_results(result, tracking_uri: str) -> None:
    from pipeline.runner import format_table, results_rows
    from pipeline.tracking import is_rank_zero

    if not is_rank_zero():
        return  # the other ranks hold no evaluation (rank 0 gathers it)
    print()
    print(format_table(results_rows(result)))
    print(f"\ntotal time {result.seconds:.0f}s; runs are in MLflow ({tracking_uri}). Browse them with:")
    print(f"  mlflow ui --backend-store-uri {tracking_uri}")


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    result = run_experiment(cfg)
    _print_results(result, cfg.mlflow.tracking_uri)
    return 0


def evaluation_folder(cfg: DictConfig, ckpt: str | Path | None) -> Path:
    """``<output_dir>/evaluations/<UTC time>-<what>``: a ``medpipe evaluate``'s own folder, never the ``eval/`` a
    training run writes; ``<what>`` is the hand-over's stage folder (or file stem), or the imported format."""
    import time

    if ckpt is None:
        what = f"init-{cfg.model.init.format}"
    else:
        path = Path(ckpt)
        what = path.parent.name if path.name in ("handover.json", "handover.pt") else path.stem
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = Path(cfg.output_dir) / "evaluations" / f"{stamp}-{what}"
    suffix = 1
    while folder.exists():  # two evaluations in one second
        suffix += 1
        folder = folder.with_name(f"{stamp}-{what}-{suffix}")
    return folder


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.handover import handover_structure
    from pipeline.registry import download_model, is_registry_uri, registered_handover
    from pipeline.run_lock import output_dir_lock
    from pipeline.runner import evaluate_handover
    from pipeline.tracking import Tracker, check_tracking_uri

    cfg = load_config(args.config, args.overrides)
    if cfg.ckpt is None and cfg.model.get("init") is None:
        raise ConfigError(
            f"{args.config}: key 'ckpt': set the hand-over file to evaluate, e.g. ckpt=outputs/"
            f"{cfg.name}/stages/<stage>/handover.json, a registered model: ckpt=models:/NAME/VERSION, or a "
            "released checkpoint as it is: model.init={format: ..., path: ...}"
        )
    _quiet_libraries()
    check_tracking_uri(cfg.mlflow.tracking_uri, settings=cfg.mlflow)
    ckpt = cfg.ckpt  # None: the model model.init imports, as released
    if ckpt is not None and is_registry_uri(ckpt):
        ckpt = registered_handover(download_model(ckpt, tracking_uri=cfg.mlflow.tracking_uri))
    if ckpt is not None:
        handover_structure(ckpt)  # a file that is no hand-over fails here, before a model is built or a run opened
    with output_dir_lock(cfg.output_dir):  # its eval/ folder: not while a run works there
        tracker = Tracker(tracking_uri=cfg.mlflow.tracking_uri, experiment_name=cfg.mlflow.experiment_name)
        parent = tracker.start_parent(run_name=f"{cfg.name}-evaluate", cfg=cfg, tags={"recipe": cfg.name})
        try:
            out_dir = evaluation_folder(cfg, ckpt)  # never training's eval/: one folder per evaluation
            result = evaluate_handover(cfg, ckpt, tracker=tracker, out_dir=out_dir)
        except BaseException:
            tracker.finish(parent, "FAILED")
            raise
        tracker.finish(parent)
    print(
        f"{result.count} questions on {result.split}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
        + f"\npredictions: {result.predictions_file}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.export import export_model
    from pipeline.handover import base_of, restore
    from pipeline.model_factory import build_model
    from pipeline.run_state import load_run_state

    source = Path(args.source)
    if source.is_file():  # <output_dir>/stages/<stage>/handover.json
        handover, run_dir = source, source.parent.parent.parent
    else:
        run_dir = source
        state = load_run_state(run_dir)
        done = [s.handover for s in (state.stages.values() if state else []) if s.status == "done" and s.handover]
        if not done:
            raise ConfigError(f"{run_dir}: no finished stage in its run_state.json (not a medpipe run folder?)")
        handover = Path(done[-1])  # the last stage the run finished
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{config}: missing (export reads the run's resolved config beside its stages/)")
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out}: exists; export writes a new folder")
    cfg = load_config(config, args.overrides, check_paths=False)
    _quiet_libraries()
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    restore(built.model, handover, base=base_of(cfg.model))
    written, notes = export_model(args.format, built, cfg.model, out, vision_path=Path(cfg.model.vision.path))
    print(f"exported {handover} as {args.format} to {written}")
    for note in notes:
        print(f"  note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    overrides = list(args.overrides)
    if args.out:
        out = Path(args.out).resolve()
        overrides = [f"output_dir={out}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}", *overrides]
    cfg = load_config(args.config or DEMO_CONFIG, overrides)
    _quiet_libraries()
    log.info(
        "demo: synthetic phantom VQA in SLAKE layout, tiny CLIP + tiny Llama, stages %s", " -> ".join(cfg.stages.keys())
    )
    result = run_experiment(cfg)
    _print_results(result, cfg.mlflow.tracking_uri)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.score import render, score_files

    report = score_files(
        args.predictions,
        args.references,
        protocol=args.protocol,
        languages=tuple(args.languages.split(",")),
        on_bad_record=args.on_bad_record,
    )
    print(render(report, args.json), end="" if not args.json else "\n")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    import json

    from pipeline.config import load_config
    from pipeline.memory import PAPER_RECIPES, experiment_memory, format_memory, load_recipe

    _quiet_libraries()
    if args.config:
        cfg = load_config(args.config, args.overrides, check_paths=False)
        configs = {cfg.name: cfg}
    else:
        names = sorted(PAPER_RECIPES) if args.recipe == "all" else [args.recipe]
        configs = {name: load_recipe(name, args.overrides) for name in names}
    tables = {
        name: experiment_memory(
            cfg,
            devices=args.devices,
            strategy=args.strategy,
            precision=args.precision,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        for name, cfg in configs.items()
    }
    if args.json:
        print(json.dumps(tables))
    else:
        print(
            f"per-GPU memory estimate: {args.devices} GPUs, {args.strategy}, {args.precision}, micro-batch "
            f"{args.micro_batch}, sequence {args.seq_len}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}\n"
        )
        print("\n\n".join(format_memory(name, table) for name, table in tables.items()))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.params import experiment_params, format_handover_sizes, format_params, handover_sizes, to_json

    cfg = load_config(args.config, args.overrides, check_paths=False)
    _quiet_libraries()
    if args.handover:
        rows = handover_sizes(cfg)
        print(json.dumps(rows) if args.json else format_handover_sizes(rows))
        return 0
    result = experiment_params(cfg, stage=args.stage)
    print(to_json(result) if args.json else format_params(result))
    return 0


_SCORE_PROTOCOLS_EPILOG = "<protocol sources>"


class _ScoreHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``medpipe score --help``: the epilog is the protocol table of
    ``lightningmodules.metrics.protocols``, read only when the help is shown (it imports torch)."""

    def add_text(self, text: str | None) -> None:
        if text == _SCORE_PROTOCOLS_EPILOG:
            from lightningmodules.metrics.protocols import protocol_sources_text

            text = protocol_sources_text()
        super().add_text(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe", description="Medical multimodal-LLM experiment pipeline (Uni-Med, Med-MoE, MedPLIB recipes)."
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("config", help="experiment YAML (e.g. experiments/demo.yaml)")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.set_defaults(func=func)
        return p

    add("train", cmd_train, "Run every stage of an experiment, then evaluate.")
    add("evaluate", cmd_evaluate, "Evaluate a hand-over checkpoint (ckpt=...) on the configured split.")
    params = add("params", cmd_params, "Total parameters and parameters active per token (MoE), on the meta device.")
    params.add_argument("--stage", help="count the model as it is after this stage (default: the last)")
    params.add_argument(
        "--json", action="store_true", help='print one JSON object: {"total": N, "active_per_token": N, ...}'
    )
    params.add_argument(
        "--handover",
        action="store_true",
        help="instead: the size of each stage's hand-over (its delta) beside the full model's",
    )
    demo = add("demo", cmd_demo, "Train and evaluate the tiny demo on synthetic data (no downloads).", config=False)
    demo.add_argument("--out", help="put outputs and the MLflow database in this directory")
    demo.add_argument("--config", help=argparse.SUPPRESS)
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    score = sub.add_parser(
        "score",
        help="Rescore a prediction file under every paper's protocol.",
        description="Rescore a prediction file (LLaVA-Med JSONL: question_id, text) against\n"
        "references (conversation JSON, a SLAKE or VQA-RAD file, or our predictions.jsonl), pairing by id,\n"
        "under each protocol: the rules of one paper's released evaluation script (listed below).",
        epilog=_SCORE_PROTOCOLS_EPILOG,
        formatter_class=_ScoreHelpFormatter,
    )
    score.add_argument(
        "--protocol",
        default="all",
        metavar="PROTOCOL",
        help="all (default), or one of the protocols listed below",
    )
    score.add_argument("--predictions", required=True, help="JSONL (or JSON list) with question_id and text")
    score.add_argument("--references", required=True, help="reference file")
    score.add_argument("--languages", default="en", help="SLAKE q_lang values to keep (comma-separated)")
    score.add_argument("--json", action="store_true", help="print one JSON object: protocol -> metric -> value")
    score.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        default="error",
        help="a record with a missing or mistyped field: error (default) names file, record and field; skip "
        "leaves it and its pair out of every metric and prints the count and the reasons",
    )
    score.set_defaults(func=cmd_score)

    from pipeline.export import EXPORT_FORMATS, EXPORT_HELP

    export = sub.add_parser(
        "export",
        help="Write a trained model as a folder other tools load without medpipe.",
        description="Write a run's model (its folder: config.yaml and the last stage's hand-over) or one "
        "hand-over file (<output_dir>/stages/<stage>/handover.pt) in a released format; what a format cannot "
        "express is refused with the setting that says it. Formats: "
        + "; ".join(f"{name}: {text}" for name, text in EXPORT_HELP.items())
        + ". See docs/export.md.",
    )
    export.add_argument("source", help="a run's output_dir, or a hand-over file inside one")
    export.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="the folder's format: " + ", ".join(EXPORT_FORMATS),
    )
    export.add_argument("--out", required=True, help="the folder to write (must not exist)")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the run's config.yaml")
    export.set_defaults(func=cmd_export)

    from pipeline.data_check import add_data_command

    add_data_command(sub)  # medpipe data check

    from pipeline.memory import PAPER_RECIPES  # imports no torch

    memory = sub.add_parser(
        "memory",
        help="Per-GPU memory of each stage of an experiment (default: the papers' recipes) at full size.",
        description="Per-GPU memory (weights, gradients, optimizer state, activations) of each "
        "stage of an experiment YAML, or of the papers' shipped recipes (--recipe), computed from the "
        "models' configs on the meta device (no GPU, no download, no checkpoint needed). See docs/scaling.md.",
    )
    memory.add_argument("config", nargs="?", help="experiment YAML (default: the --recipe files in experiments/)")
    memory.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    memory.add_argument("--recipe", default="all", choices=["all", *sorted(PAPER_RECIPES)])
    memory.add_argument("--devices", type=int, default=8)
    memory.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"],
    )
    memory.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed", "32-true", "bf16-true"])
    memory.add_argument("--micro-batch", type=int, default=4)
    memory.add_argument("--seq-len", type=int, default=2048)
    memory.add_argument("--gradient-checkpointing", action="store_true")
    memory.add_argument("--json", action="store_true", help="print one JSON object: recipe -> stage -> figure")
    memory.set_defaults(func=cmd_memory)

    config = sub.add_parser("config", help="Inspect experiment configs.", description="Inspect experiment configs.")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_sub.required = True
    show = config_sub.add_parser(
        "show", help="Print the resolved, validated config.", description="Print the resolved, validated config."
    )
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument("--no-path-check", action="store_true", help="do not require paths to exist")
    show.set_defaults(func=cmd_config_show)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix (config, data, checkpoint folders, pre-flight checks, processor files, chat
    templates, optional extras): one ``medpipe: error:`` line each; anything else is a bug and keeps its traceback."""
    from datamodules.problems import DataError
    from pipeline.config import ConfigError

    errors: tuple[type[BaseException], ...] = (
        ConfigError,
        DataError,
        OSError,  # FileNotFoundError, NotACheckpointError, HF's missing-file errors
        ValueError,  # our checks, PreflightError
        RuntimeError,
        TypeError,  # e.g. an image processor file whose fields have other types than expected
        ImportError,  # optional extras (timm)
    )
    try:
        from jinja2.exceptions import TemplateError  # chat templates

        errors += (TemplateError,)
    except ImportError:
        pass
    return errors


def error_line(error: BaseException) -> str:
    """The one line a user sees: the first line of the message, with the type for library errors whose
    message alone does not say what failed (a TypeError, a jinja TemplateError)."""
    message = str(error).strip()
    reason = message.splitlines()[0] if message else type(error).__name__
    from pipeline.config import ConfigError

    ours_or_self_explaining = isinstance(error, (ConfigError, OSError, ValueError, RuntimeError, ImportError))
    if message and not ours_or_self_explaining:
        reason = f"{type(error).__name__}: {reason}"
    return f"medpipe: error: {reason}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures exit 1 (2: usage and config errors, as argparse) with one
    ``medpipe: error:`` line, the traceback only with ``--traceback`` (or ``MEDPIPE_TRACEBACK=1``)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        status = args.func(args)
        if status == 0:
            from pipeline.strategies import shutdown_distributed

            shutdown_distributed()  # torchrun / srun ranks exit cleanly
        return status
    except KeyboardInterrupt:
        print("medpipe: interrupted", file=sys.stderr)
        return 130
    except expected_errors() as e:
        if args.traceback or os.environ.get("MEDPIPE_TRACEBACK"):
            raise
        print(error_line(e), file=sys.stderr)
        return exit_code(e)


def exit_code(error: BaseException) -> int:
    """2 for usage and config errors (a wrong tracking URI included: ``TrackingURIError.exit_code``), else 1."""
    from pipeline.config import ConfigError

    return getattr(error, "exit_code", 2 if isinstance(error, ConfigError) else 1)


if __name__ == "__main__":
    sys.exit(main())
