"""Pure scoring layer (no Lightning, no models): text, VQA protocols, boxes, segmentation."""

from .boxes import box_iou, grid_rec_scores
from .protocols import PROTOCOLS, answer_kind, closed_hit, open_scores, score_protocol
from .segmentation import binarize, dice_from_iou, mask_iou, segmentation_scores
from .text_scores import (
    corpus_bleu,
    cumulative_bleu,
    exact_match,
    rouge_l,
    sentence_bleu,
    token_f1,
    token_precision,
    token_prf,
    token_recall,
)

__all__ = [
    "PROTOCOLS",
    "answer_kind",
    "binarize",
    "box_iou",
    "closed_hit",
    "corpus_bleu",
    "cumulative_bleu",
    "dice_from_iou",
    "exact_match",
    "mask_iou",
    "open_scores",
    "grid_rec_scores",
    "rouge_l",
    "score_protocol",
    "segmentation_scores",
    "sentence_bleu",
    "token_f1",
    "token_precision",
    "token_prf",
    "token_recall",
]
