"""``medpipe data check --format F PATH [--json]``: read a dataset folder as training would, decode
every image and mask, and report counts per split and every problem found.

Records are read under the ``skip`` policy so that every problem is collected, not just the first;
file-level problems (malformed JSON, a refused pickle) are listed too. Exit code 0 when the folder
is clean, 1 when anything was found.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

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
    check.set_defaults(func=cmd_data_check)


def split_summary(records: list) -> dict[str, Any]:
    return {
        "records": len(records),
        "closed": sum(r.answer_type == "closed" for r in records),
        "open": sum(r.answer_type == "open" for r in records),
        "modalities": dict(sorted(Counter(str(r.modality) for r in records).items())),
        "tasks": dict(sorted(Counter(r.task for r in records).items())),
    }


def check_dataset(
    fmt: str,
    path: str | Path,
    *,
    languages: tuple[str, ...] = ("en",),
    image_root: str | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """``{"splits": {split: counts}, "problems": [{file, record, field, reason}, ...]}``."""
    from datamodules.problems import DataError, Problem, ProblemLog
    from datamodules.readers import available_splits, read_split
    from datamodules.specs import DatasetSpec
    from datamodules.verify import verify_records

    spec = DatasetSpec(
        format=fmt, path=str(path), languages=list(languages), image_root=image_root, allow_pickle=allow_pickle
    )
    problems = ProblemLog("skip")
    splits: dict[str, Any] = {}

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
        try:
            records = read_split(spec, fmt, split, problems)
        except DataError as e:
            file_problem(e)
            continue
        splits[split] = split_summary(verify_records(records, problems))
    return {"splits": splits, "problems": [p.as_dict() for p in problems.problems]}


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for split, s in report["splits"].items():
        lines.append(f"{split}: {s['records']} records ({s['closed']} closed, {s['open']} open)")
        lines.append("  modalities: " + ", ".join(f"{k} {v}" for k, v in s["modalities"].items()))
        lines.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in s["tasks"].items()))
    problems = report["problems"]
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else ""))
    lines += [f"  {p['file']}: record {p['record']}: field '{p['field']}': {p['reason']}" for p in problems]
    return "\n".join(lines)


def cmd_data_check(args: argparse.Namespace) -> int:
    report = check_dataset(
        args.format,
        args.path,
        languages=tuple(args.languages.split(",")),
        image_root=args.image_root,
        allow_pickle=args.allow_pickle,
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 1 if report["problems"] else 0
