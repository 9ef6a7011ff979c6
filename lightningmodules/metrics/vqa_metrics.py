"""torchmetrics wrappers around the per-sample scores, reduced correctly across processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torchmetrics import Metric

from lightningmodules.metrics.protocols import answer_kind, closed_outcome
from lightningmodules.metrics.text_scores import sentence_bleu, token_recall


class MeanScore(Metric):
    """Mean of ``score_fn(pred, gt)`` over the samples whose answer type is ``answer_type``.

    A sample whose score is ``None`` is left out of the mean (LLaVA-Med's first-release closed rule).
    Sums and counts are the states (``dist_reduce_fx="sum"``), so the value is the exact mean over
    all processes, not a mean of per-process means. Returns 0 when no sample qualified.
    """

    full_state_update = False

    def __init__(
        self, score_fn: Callable[[str, str], float | None], answer_type: str | None = None, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        self.score_fn = score_fn
        self.answer_type = answer_type
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str], answer_types: Sequence[str]) -> None:
        if not len(preds) == len(targets) == len(answer_types):
            raise ValueError("preds, targets and answer_types must have the same length")
        total, count = 0.0, 0
        for pred, gt, kind in zip(preds, targets, answer_types, strict=True):
            if self.answer_type is None or answer_kind(kind) == self.answer_type:
                score = self.score_fn(pred, gt)
                if score is not None:
                    total += float(score)
                    count += 1
        self.total += total
        self.count += count

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.total / self.count


def _closed_score(protocol: str, pred: str, gt: str) -> float | None:
    outcome = closed_outcome(protocol, pred, gt)
    return None if outcome is None else float(outcome)


def closed_accuracy(protocol: str = "default") -> MeanScore:
    """Closed-question accuracy under a paper's rule (default: normalised exact match); under
    ``llava_med_ad758b6`` the misses that rule leaves out are not counted."""
    return MeanScore(partial(_closed_score, protocol), answer_type="closed")


def open_recall(counting: str = "script") -> MeanScore:
    """Token recall of the normalised ground truth in the prediction, over open questions, counted as
    the scripts' ``calculate_f1score`` (``counting="clipped"``: the clipped-multiset recall)."""
    return MeanScore(partial(token_recall, counting=counting), answer_type="open")


def bleu1() -> MeanScore:
    """Sentence BLEU-1 per sample, averaged (as the papers report it), over all questions."""
    return MeanScore(partial(sentence_bleu, max_n=1), answer_type=None)
