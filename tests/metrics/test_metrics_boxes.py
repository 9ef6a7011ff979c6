"""Uni-Med box strings, IoU and REC scores."""

import pytest

from lightningmodules.metrics import box_iou, rec_scores
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
    out = rec_scores(preds, gts)
    assert out["rec_miou"] == pytest.approx((1 + 0.5 + 0 + 1 / 3 + 0) / 5)
    assert out["rec_acc@0.5"] == pytest.approx(1 / 5)  # IoU exactly 0.5 is not > 0.5
    assert out["rec_unparseable"] == 2
    assert out["rec_count"] == 5


def test_rec_scores_errors_and_empty():
    with pytest.raises(ValueError, match="ground-truth box 0"):
        rec_scores(["{<0><0><1><1>}"], ["{<5><0><1><1>}"])
    with pytest.raises(ValueError):
        rec_scores(["{<0><0><1><1>}"], [])
    assert rec_scores([], []) == {"rec_count": 0.0, "rec_unparseable": 0.0}
