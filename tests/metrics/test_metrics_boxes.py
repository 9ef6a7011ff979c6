"""Uni-Med box strings, IoU and REC scores."""

import numpy as np
import pytest

from lightningmodules.metrics import box_iou
from lightningmodules.metrics.boxes import (
    MissingGeometryError,
    grid_rec_scores,
    uni_med_pixel_box,
    uni_med_rec_scores,
)
from medcore.boxes import format_box, parse_box


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{<10><20><30><40>}", (10, 20, 30, 40)),
        ("{ <10> <20> <30> <40> }", (10, 20, 30, 40)),  # spaces between parts
        ("{< 10 ><20 ><  30><40>}", (10, 20, 30, 40)),  # spaces inside the brackets
        ("the liver is at {<0><0><100><100>}.", (0, 0, 100, 100)),  # surrounding text
        ("{<007><20><30><40>}", (7, 20, 30, 40)),  # leading zeros
        ("{<10><20><10><40>}", (10, 20, 10, 40)),  # zero width is still a box
        # multiple boxes: the first one decides
        ("{<10><20><30><40>}{<50><50><60><60>}", (10, 20, 30, 40)),
        ("{<30><20><10><40>} {<1><2><3><4>}", None),  # first box invalid -> None
        # unparseable
        ("{<10><20><30><40>", None),  # missing closing brace
        ("<10><20><30><40>}", None),  # missing opening brace
        ("{<-5><20><30><40>}", None),  # negative
        ("{<10><20><101><40>}", None),  # beyond the 0-100 grid
        ("{<30><20><10><40>}", None),  # x2 < x1
        ("{<10><40><30><20>}", None),  # y2 < y1
        ("{<10.5><20><30><40>}", None),  # not an integer
        ("{<+5><20><30><40>}", None),  # sign
        ("{<10><20><30>}", None),  # three numbers
        ("{<><20><30><40>}", None),  # empty field
        ("", None),
        (None, None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


def test_format_box_round_trip_and_validation():
    assert format_box((1, 2, 30, 40)) == "{<1><2><30><40>}"
    assert parse_box(format_box((0, 5, 100, 100))) == (0, 5, 100, 100)
    for bad in [(30, 0, 10, 10), (0, 0, 101, 10), (-1, 0, 5, 5), (0, 0, 5), (0.5, 0, 5, 5)]:
        with pytest.raises(ValueError):
            format_box(bad)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    # half overlap: intersection 5*10 = 50, union 100 + 100 - 50 = 150
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # Uni-Med pixel convention (+1): intersection 6*11 = 66, areas 11*11 = 121 -> 66/176
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10), inclusive=True) == pytest.approx(66 / 176)
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty union


def test_rec_scores():
    preds = ["{<0><0><10><10>}", "{<0><0><10><5>}", "no box here", "{<0><0><10><10>}", None]
    gts = ["{<0><0><10><10>}", (0, 0, 10, 10), (0, 0, 10, 10), (5, 0, 15, 10), (0, 0, 1, 1)]
    # IoUs: 1, 0.5 (half the box), 0 (unparseable), 1/3, 0 (no prediction)
    out = grid_rec_scores(preds, gts)
    assert out["rec_miou"] == pytest.approx((1 + 0.5 + 0 + 1 / 3 + 0) / 5)
    assert out["rec_acc@0.5"] == pytest.approx(1 / 5)  # IoU exactly 0.5 is not > 0.5
    assert out["rec_unparseable"] == 2
    assert out["rec_count"] == 5


def test_rec_scores_errors_and_empty():
    with pytest.raises(ValueError, match="ground-truth box 0"):
        grid_rec_scores(["{<0><0><1><1>}"], ["{<5><0><1><1>}"])
    with pytest.raises(ValueError):
        grid_rec_scores(["{<0><0><1><1>}"], [])
    assert grid_rec_scores([], []) == {"rec_count": 0.0, "rec_unparseable": 0.0}


# ----------------------------------------------------------------------------- Uni-Med's REC rule
# Expected values come from a re-implementation, written here, of Uni-Med's eval_ref.py:54-84 and
# computeIoU (uni_med/common/eval_utils.py:62-74) at 63b9dfb, with torch doing the float32 conversion
# of the ground truth as the script's torch.Tensor does.


def _released_rec_iou(answer: str, bbox_xywh, image_size, res: float = 100.0) -> float:
    import re

    import torch

    x, y, w, h = torch.Tensor(bbox_xywh).tolist()
    truth = [x, y, x + w, y + h]
    text = answer.replace("<unk>", "").replace(" ", "").strip()
    if not re.match(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}", text):
        return 0
    width, height = torch.Tensor(image_size).tolist()
    g = [int(v) for v in re.findall(r"\d+", text)][:4]
    p = [g[0] / res * width, g[1] / res * height, g[2] / res * width, g[3] / res * height]
    inter = max(0, min(p[2], truth[2]) - max(p[0], truth[0]) + 1) * max(
        0, min(p[3], truth[3]) - max(p[1], truth[1]) + 1
    )
    area_p = (p[2] - p[0] + 1) * (p[3] - p[1] + 1)
    area_t = (truth[2] - truth[0] + 1) * (truth[3] - truth[1] + 1)
    return inter / (area_p + area_t - inter)


_IMAGE = (640, 480)  # non-square (W, H): x scales by 6.4, y by 4.8
_TRUTH = [64.0, 96.0, 256.0, 192.0]  # pixels, [x, y, w, h] -> [64, 96, 320, 288]
REC_CASES = [
    ("{<10><20><50><60>}", "exact grid box of the truth"),
    ("{<10><20><50><60>} is the liver", "text after the box is fine"),
    ("The liver is at {<10><20><50><60>}", "box not at the start: 0"),
    ("{ <10> <20> <50> <60> }", "spaces inside the box are removed"),
    ("{<1 0><2 0><5 0><6 0>}", "even inside numbers"),
    ("<unk>{<10><20><50><60>}<unk>", "<unk> removed"),
    ("\n{<10><20><50><60>}\n", "surrounding newlines stripped"),
    ("{<10>\t<20><50><60>}", "a tab inside fails (only spaces are removed)"),
    ("{<010><020><050><060>}", "3-digit fields, leading zeros"),
    ("{<40><50><110><120>}", "3-digit values beyond the grid are scaled, not rejected"),
    ("{<0010><20><50><60>}", "4-digit field rejected"),
    ("{<1000><20><50><60>}", "4-digit number rejected"),
    ("{<60><20><10><60>}", "swapped corners are not rejected"),
    ("{<12><18><48><61>}", "a near miss"),
    ("{<10.5><20><50><60>}", "decimals rejected"),
    ("{<10><20><50>}", "three numbers"),
    ("", "empty"),
]


@pytest.mark.parametrize(("answer", "why"), REC_CASES)
def test_uni_med_rec_iou_matches_the_released_rule(answer, why):
    out = uni_med_rec_scores([{"id": "r", "pred": answer, "box": _TRUTH, "image_size": _IMAGE}])
    assert out["miou"] == _released_rec_iou(answer, _TRUTH, _IMAGE), why


def test_uni_med_rec_cases_separate_the_rules():
    # the cases above are not all trivially 0 or 1, and the grid rule disagrees on several of them
    ious = {a: _released_rec_iou(a, _TRUTH, _IMAGE) for a, _ in REC_CASES}
    assert ious["{<10><20><50><60>}"] == 1.0  # the truth exactly, in pixels
    assert ious["The liver is at {<10><20><50><60>}"] == 0
    assert grid_rec_scores(["The liver is at {<10><20><50><60>}"], [(10, 20, 50, 60)])["rec_miou"] == 1.0
    assert ious["{<0010><20><50><60>}"] == 0 and parse_box("{<0010><20><50><60>}") == (10, 20, 50, 60)
    assert ious["{ <10> <20> <50> <60> }"] == 1.0 and ious["{<1 0><2 0><5 0><6 0>}"] == 1.0
    assert parse_box("{<1 0><2 0><5 0><6 0>}") is None
    assert ious["{<10>\t<20><50><60>}"] == 0
    assert 0 < ious["{<40><50><110><120>}"] < 0.5 and parse_box("{<40><50><110><120>}") is None
    assert 0.5 < ious["{<12><18><48><61>}"] < 1


def test_uni_med_rec_float32_ground_truth_and_non_square_scaling():
    # fractional detection boxes go through float32 as in the script; x scales by W, y by H
    truth = [10.1, 20.3, 30.7, 40.9]
    size = (333, 517)
    for answer in ("{<3><4><12><12>}", "{<2><3><13><12>}", "{<5><5><9><9>}"):
        got = uni_med_rec_scores([{"id": 1, "pred": answer, "box": truth, "image_size": size}])["miou"]
        assert got == _released_rec_iou(answer, truth, size)
    assert uni_med_pixel_box((10, 20, 50, 60), (640, 480)) == (64.0, 96.0, 320.0, 288.0)


def test_uni_med_rec_means_and_strict_threshold():
    square = (100, 100)
    items = [
        {"id": "a", "pred": "{<0><0><9><9>}", "box": [0, 0, 4, 9], "image_size": square},  # 50/100 = 0.5
        {"id": "b", "pred": "{<10><20><50><60>}", "box": _TRUTH, "image_size": _IMAGE},  # 1.0
        {"id": "c", "pred": "the box {<10><20><50><60>}", "box": _TRUTH, "image_size": _IMAGE},  # 0
        {"id": "d", "pred": None, "box": _TRUTH, "image_size": _IMAGE},  # 0
        {"id": "e", "pred": "{<12><18><48><61>}", "box": _TRUTH, "image_size": _IMAGE},
    ]
    expected = [_released_rec_iou(it["pred"] or "", it["box"], it["image_size"]) for it in items]
    assert expected[0] == 0.5
    out = uni_med_rec_scores(items)
    assert out["miou"] == float(np.array(expected).mean())
    assert out["acc"] == 2 / 5  # 0.5 is not > 0.5
    assert out["count"] == 5 and out["unparseable"] == 2
    assert uni_med_rec_scores([]) == {"count": 0.0, "unparseable": 0.0}


def test_uni_med_rec_needs_box_and_size_naming_the_record():
    with pytest.raises(MissingGeometryError, match=r"record slake/refer/7/0: .*original image size"):
        uni_med_rec_scores([{"id": "slake/refer/7/0", "pred": "{<1><1><2><2>}", "box": _TRUTH}])
    with pytest.raises(MissingGeometryError, match=r"record x: .*ground-truth box and original image size"):
        uni_med_rec_scores([{"id": "x", "pred": "{<1><1><2><2>}"}])
    with pytest.raises(ValueError, match="record y"):
        uni_med_rec_scores([{"id": "y", "pred": "", "box": [1, 2, 3], "image_size": _IMAGE}])


def test_computeiou_convention_and_zero_union():
    # +1 pixel convention: (0,0,0,0) is a 1-pixel box
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0), inclusive=True) == 1.0
    # swapped x corners giving area -441 against a 441 truth: the script divides by 0; here 0
    assert box_iou((22, 0, 0, 20), (0, 0, 20, 20), inclusive=True) == 0.0
