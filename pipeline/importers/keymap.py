"""Strict key mapping from a released checkpoint's state dict into medpipe's model.

A layout is a list of :class:`Rule` s: a regular expression over the source key and either the target key
(``re.sub`` replacement, ``\\1`` groups allowed) or ``None`` with the reason the key is left out. Every
source key must match exactly one rule, every target key of the parts being imported must be filled, and
every shape must agree; otherwise :class:`CheckpointLayoutError` lists what is left over, so a checkpoint of
another layout (or a renamed key) fails before a single weight is copied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch


class CheckpointLayoutError(ValueError):
    """A checkpoint does not fit the layout: unused source keys, unfilled target keys or shape mismatches."""


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a full match over the source key) -> ``target`` (a ``re.sub`` replacement), or ``None``
    with ``reason``: the key is known and deliberately not imported."""

    pattern: str
    target: str | None
    reason: str = ""

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


@dataclass
class ImportReport:
    """What an import did: target keys filled, source keys left out (by reason), rows handled specially."""

    source: str
    layout: str
    filled: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> source keys
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ignored = sum(len(keys) for keys in self.ignored.values())
        return f"{self.source} ({self.layout}): {len(self.filled)} tensors imported, {ignored} source keys left out"


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def map_state_dict(
    source: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    *,
    targets: Mapping[str, torch.Tensor],
    required: Iterable[str],
    report: ImportReport,
) -> dict[str, torch.Tensor]:
    """``source`` renamed by ``rules`` into keys of ``targets`` (the model's state dict); every key of
    ``required`` must be filled. Raises :class:`CheckpointLayoutError` naming every leftover."""
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    ambiguous: list[str] = []
    for key, tensor in source.items():
        hits = [rule for rule in rules if rule.match(key)]
        if not hits:
            unused.append(key)
            continue
        if len(hits) > 1:
            ambiguous.append(key)
            continue
        rule = hits[0]
        if rule.target is None:
            report.ignored.setdefault(rule.reason, []).append(key)
            continue
        name = re.sub(rule.pattern, rule.target, key)
        if name in mapped:
            ambiguous.append(key)
            continue
        mapped[name] = tensor
    problems = []
    if unused:
        problems.append(f"{len(unused)} source key(s) no rule of the layout knows: {_listing(unused)}")
    if ambiguous:
        problems.append(f"key(s) matched twice: {_listing(ambiguous)}")
    unknown = sorted(name for name in mapped if name not in targets)
    if unknown:
        problems.append(f"mapped onto key(s) the model does not have: {_listing(unknown)}")
    missing = sorted(name for name in required if name not in mapped)
    if missing:
        problems.append(f"{len(missing)} model key(s) the checkpoint does not fill: {_listing(missing)}")
    shapes = [
        f"{name} {tuple(mapped[name].shape)} vs the model's {tuple(targets[name].shape)}"
        for name in sorted(mapped)
        if name in targets and not name.endswith(VOCAB_SUFFIXES) and mapped[name].shape != targets[name].shape
    ]
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    if problems:
        raise CheckpointLayoutError(f"{report.source}: not a {report.layout} checkpoint: " + "; ".join(problems))
    report.filled = sorted(mapped)
    return mapped


# embedding tables: the checkpoint's vocabulary and the model's may differ by added or padding rows
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


def copy_vocab_rows(target: torch.Tensor, source: torch.Tensor, *, name: str, report: ImportReport) -> torch.Tensor:
    """An embedding table (V, D) from the checkpoint's (V_src, D): the shared rows copied; the model's own
    added tokens beyond V_src get the mean of the copied rows (as medpipe initialises added tokens); the
    checkpoint's rows beyond V (padding to a multiple, tokens the tokenizer lacks) are left out, noted."""
    rows, width = target.shape
    src_rows, src_width = source.shape
    if width != src_width:
        raise CheckpointLayoutError(f"{report.source}: {name} has width {src_width}, the model {width}")
    shared = min(rows, src_rows)
    out = source[:shared].to(target.dtype)  # (shared, D)
    if rows > src_rows:
        mean = out.float().mean(dim=0, keepdim=True).to(target.dtype)  # (1, D)
        out = torch.cat([out, mean.expand(rows - src_rows, -1)], dim=0)  # (V, D)
        report.notes.append(f"{name}: rows {src_rows}..{rows - 1} (tokens medpipe adds) set to the mean row")
    elif src_rows > rows:
        report.notes.append(f"{name}: checkpoint rows {rows}..{src_rows - 1} left out (beyond the tokenizer)")
    return out
