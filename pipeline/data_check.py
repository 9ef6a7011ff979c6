"""``medpipe data check --format F PATH [--json]``: read a dataset folder as training would, decode
every image and mask, and report counts per split and every problem found.

Records are read under the ``skip`` policy so that every problem is collected, not just the first;
file-level problems (malformed JSON, a refused pickle) are listed too, and so are ids found in two splits
(leakage). Records a setting leaves out (SLAKE's other languages) are counted per split under ``filtered``.
With ``--config CONFIG`` every prompt is also encoded with that experiment's tokenizer and chat template
(the model built on the meta device: no weights read) and one longer than ``data.max_length`` (or a stage's
``max_length``) is listed. Exit code 0 when the folder is clean, 1 when anything was found.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.specs import DEFAULT_MAX_IMAGE_PIXELS  # no torch: the CLI's parser is built without it

FORMATS = ("vqa_rad", "slake", "pathvqa", "conversation", "mecovqa")


def add_data_command(sub: argparse._SubParsersAction) -> None:
    """Register ``medpipe data check`` on the CLI's sub-parsers."""
    data = sub.add_parser("data", help="Inspect datasets.", description="Inspect datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    check = data_sub.add_parser(
        "check",
        help="Count records and list every problem in a dataset folder.",
        description="Read a dataset folder as training would, decode every image and "
        "mask, and report counts per split and every problem found "
        "(exit code 1 when there is any).",
    )
    check.add_argument("--format", required=True, choices=FORMATS)
    check.add_argument("path", help="the dataset folder, as released")
    check.add_argument("--json", action="store_true", help="print one JSON object: splits and problems")
    check.add_argument("--languages", default="en", help="SLAKE q_lang values to keep (comma-separated)")
    check.add_argument("--image-root", help="conversation / MeCoVQA: folder image paths are relative to")
    check.add_argument(
        "--allow-pickle",
        action="store_true",
        help="PathVQA original release: read its pickles (unpickling runs code from the file)",
    )
    check.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="the most pixels an image or mask may claim (a dataset's max_image_pixels; "
        f"default {DEFAULT_MAX_IMAGE_PIXELS})",
    )
    check.add_argument(
        "--config",
        help="an experiment config: encode every prompt with its tokenizer, chat template and image tokens "
        "and list those longer than data.max_length (or a stage's max_length)",
    )
    check.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a --config key"
    )
    check.set_defaults(func=cmd_data_check)


def split_summary(records: list, filtered: Counter) -> dict[str, Any]:
    return {
        "records": len(records),
        "closed": sum(r.answer_type == "closed" for r in records),
        "open": sum(r.answer_type == "open" for r in records),
        "modalities": dict(sorted(Counter(str(r.modality) for r in records).items())),
        "tasks": dict(sorted(Counter(r.task for r in records).items())),
        "filtered": dict(sorted(filtered.items())),  # records left out by a setting, with why
    }


def check_dataset(
    fmt: str,
    path: str | Path,
    *,
    languages: tuple[str, ...] = ("en",),
    image_root: str | None = None,
    allow_pickle: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    prompt_checks: Sequence[PromptCheck] = (),
) -> dict[str, Any]:
    """``{"splits": {split: counts}, "problems": [{file, record, field, reason}, ...], "checks": {...}}``.

    ``prompt_checks``: encoders (with their prompt templates) every record's prompt must fit
    (:func:`config_prompt_checks`); none: prompt lengths are not checked (``checks.prompt_length`` null).
    """
    from datamodules.encoding import fitting_records
    from datamodules.problems import DataError, Problem, ProblemLog
    from datamodules.readers import available_splits, cross_split_ids, read_split
    from datamodules.specs import DatasetSpec
    from datamodules.verify import verify_records

    spec = DatasetSpec(
        format=fmt,
        path=str(path),
        languages=list(languages),
        image_root=image_root,
        allow_pickle=allow_pickle,
        max_image_pixels=max_image_pixels,
    )
    problems = ProblemLog("skip")
    splits: dict[str, Any] = {}
    read: dict[str, list] = {}

    def file_problem(error: DataError) -> None:
        problems.problems.append(error.problem or Problem(str(path), "-", "<file>", str(error), "unreadable"))

    if not Path(path).is_dir():
        problems.problems.append(Problem(str(path), "-", "<folder>", "dataset folder not found", "missing_file"))
        names: list[str] = []
    else:
        try:
            names = available_splits(spec)
        except DataError as e:
            file_problem(e)
            names = []
        if not names and not problems.problems:
            problems.problems.append(Problem(str(path), "-", "<folder>", f"no {fmt} split files found", "missing_file"))
    for split in names:
        filtered = Counter(problems.filtered)
        try:
            read[split] = read_split(spec, fmt, split, problems)
        except DataError as e:
            file_problem(e)
            continue
        records = verify_records(read[split], problems, max_pixels={fmt: max_image_pixels})
        for check in prompt_checks:
            records = fitting_records(
                records, check.encoder, problems, prompts=check.prompts, every_template=split == "train"
            )
        splits[split] = split_summary(records, problems.filtered - filtered)
    cross_split_ids(read, problems)
    return {
        "splits": splits,
        "problems": [p.as_dict() for p in problems.problems],
        "checks": {
            "max_image_pixels": max_image_pixels,
            "prompt_length": [check.description for check in prompt_checks] or None,
        },
    }


@dataclass
class PromptCheck:
    """One encoding the prompts must fit: a stage's tokenizer, template and max length (``description`` says which)."""

    encoder: Any  # datamodules.encoding.ConversationEncoder
    prompts: Any  # datamodules.prompts.PromptTemplates | None
    description: str


def config_prompt_checks(config: str, overrides: list[str]) -> list[PromptCheck]:
    """The encodings an experiment's stages train with: per distinct (conversation preset, max length), the model
    built on the meta device (tokenizer, chat template, image tokens; no weights read), ``data.system_prompt`` /
    ``enable_thinking`` / ``task_prefix`` / ``prompt_templates`` as the DataModule uses them."""
    from datamodules.encoding import ConversationEncoder
    from datamodules.prompts import PromptTemplates
    from pipeline.config import load_config
    from pipeline.model_factory import build_model

    cfg = load_config(config, overrides, check_paths=False)
    stages = [(name, cfg.stages[name].get("conversation"), cfg.stages[name].get("max_length")) for name in cfg.stages]
    wanted: dict[tuple[Any, int], str] = {}
    for name, conversation, max_length in stages or [("data", None, None)]:
        wanted.setdefault((conversation, int(max_length or cfg.data.max_length)), name)
    built: dict[Any, Any] = {}
    checks = []
    for (conversation, max_length), name in wanted.items():
        if conversation not in built:
            built[conversation] = build_model(
                cfg.model, cache_dir=cfg.cache_dir, weights="none", device="meta", conversation=conversation
            )
        model = built[conversation]
        if model.tokenizer is None:
            raise ValueError(f"{config}: model.llm.path has no tokenizer files: prompt lengths cannot be checked")
        encoder = ConversationEncoder(
            model.tokenizer,
            num_image_tokens=model.model.num_image_tokens,
            max_length=max_length,
            system_prompt=cfg.model.llm.system_prompt,
            enable_thinking=cfg.model.llm.enable_thinking,
            task_prefix=cfg.data.task_prefix,
        )
        prompts = PromptTemplates() if cfg.data.prompt_templates else None
        checks.append(
            PromptCheck(
                encoder, prompts, f"{name}: max_length {max_length}, {model.model.num_image_tokens} image tokens"
            )
        )
    return checks


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for split, s in report["splits"].items():
        lines.append(f"{split}: {s['records']} records ({s['closed']} closed, {s['open']} open)")
        lines.append("  modalities: " + ", ".join(f"{k} {v}" for k, v in s["modalities"].items()))
        lines.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in s["tasks"].items()))
        for reason, count in s["filtered"].items():
            lines.append(f"  left out {count} (by configuration): {reason}")
    checks = report["checks"]["prompt_length"]
    lines.append(
        "prompt lengths: " + ("; ".join(checks) if checks else "not checked (give --config to encode the prompts)")
    )
    problems = report["problems"]
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else ""))
    lines += [f"  {p['file']}: record {p['record']}: field '{p['field']}': {p['reason']}" for p in problems]
    return "\n".join(lines)


def cmd_data_check(args: argparse.Namespace) -> int:
    if args.overrides and not args.config:
        raise ValueError(f"--set {' '.join(args.overrides)} needs --config")
    report = check_dataset(
        args.format,
        args.path,
        languages=tuple(args.languages.split(",")),
        image_root=args.image_root,
        allow_pickle=args.allow_pickle,
        max_image_pixels=args.max_image_pixels,
        prompt_checks=config_prompt_checks(args.config, args.overrides) if args.config else [],
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 1 if report["problems"] else 0
