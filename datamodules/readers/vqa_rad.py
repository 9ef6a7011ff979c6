"""VQA-RAD: the original release or the hub parquet export (detected from the folder).

Original: ``VQA_RAD Dataset Public.json`` (a JSON list) beside ``VQA_RAD Image Folder/``. The split
comes from ``phrase_type``: ``freeform`` and ``para`` are train, ``test_freeform`` and ``test_para``
test. ``answer`` is a string or, as the release writes counts, an integer (its decimal text); ``answer_type``
is OPEN or CLOSED in any case and spacing. Any other type, null or an empty string is a bad record.
Hub export: ``data/{train,test}-*.parquet``; closed when the normalised answer is yes or no.

Split conventions (``convention``; papers disagree, and a reported number depends on it):

- ``freeform_para`` (default): one pair per record, split by ``phrase_type`` as above: 2,248 pairs,
  1,797 train / 451 test. LLaVA-Med's split.
- ``mevf``: MEVF's ``data_RAD/trainset.json`` / ``testset.json`` (aioz-ai/MICCAI19-MedVQA; the conversion the
  MEVF authors posted in that repository's issue 6), 3,515 pairs = the VQA-RAD paper's count: the same test
  split, and train adds the framed question (``question_frame``, when not "NULL") of *every* record as a pair
  with that record's image and answer, test records' frames included. Counted in the MEVF files (a copy is
  in longle0702/med-v2qa ``data_RAD/``): 3,064 train = 1,206 freeform + 591 para + 1,267 frames, 284 of the
  frames from test questions (same image and answer as a test pair: the split leaks them); 451 test. Med-MoE
  used this version (jiangsongtao/Med-MoE issue 12: "downloaded ... vqa-rad-with-bert/data_rad/trainset.json",
  a copy of MEVF's; "the sum of train.json and test.json is indeed 3515").
  Not reproduced exactly: MEVF renumbers ``qid`` 1..3515 in file order (here a frame's id is its record's
  qid + ``_frame``), keeps ``answer_type`` "CLOSED " unstripped, and Med-MoE's own converted files
  (``3vqa/train_all.json``, ``test_rad.json``: Google Drive links in its README, not in the repository) cannot
  be checked for prompt wording or filtering. The pairs themselves (question, image, answer, split) follow
  from the public JSON by MEVF's rule. The hub parquet export has no ``question_frame``: ``mevf`` needs the
  original release.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import Fields, PathResolver, load_json_list, record_label
from datamodules.readers.hub_parquet import has_parquet, parquet_splits, read_hub_parquet
from datamodules.records import Record, Source

ANNOTATIONS = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
PHRASE_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}
SPLITS = ("train", "test")
CONVENTIONS = ("freeform_para", "mevf")  # datamodules.specs.SplitConvention
NO_FRAME = "NULL"  # question_frame of a record without a framed question
FRAME_SUFFIX = "_frame"  # id of a framed-question pair: its record's id + this


def vqa_rad_layout(root: Path) -> str:
    """``original`` or ``parquet``; an error naming what was expected when neither is there."""
    if (root / ANNOTATIONS).is_file():
        return "original"
    if has_parquet(root):
        return "parquet"
    raise file_error(
        root,
        "<layout>",
        f"not a VQA-RAD folder: expected '{ANNOTATIONS}' (original release) or data/train-*.parquet (hub export)",
        "missing_file",
    )


def available_splits(root: Path) -> list[str]:
    root = Path(root)
    return list(SPLITS) if vqa_rad_layout(root) == "original" else parquet_splits(root, SPLITS)


def read_vqa_rad(
    root: str | Path,
    split: str,
    *,
    dataset: str = "vqa_rad",
    problems: ProblemLog | None = None,
    check_images: bool = True,
    convention: str = "freeform_para",
) -> list[Record]:
    """Records of ``split`` under ``convention`` (module docstring). A bad record is reported once and dropped
    with its framed question; an empty ``question_frame`` is reported and drops the frame only; ``NULL`` is no
    frame (not a problem)."""
    root = Path(root)
    problems = problems or ProblemLog()
    if split not in SPLITS:
        raise DataError(
            f"{root}: VQA-RAD has no split {split!r}: it has {', '.join(SPLITS)} (set the dataset's val_split: null)"
        )
    if convention not in CONVENTIONS:
        raise DataError(f"{root}: unknown VQA-RAD split convention {convention!r} (one of {', '.join(CONVENTIONS)})")
    if vqa_rad_layout(root) == "parquet":
        if convention != "freeform_para":
            raise DataError(
                f"{root}: split convention {convention!r} adds the framed questions (question_frame), which the hub "
                f"parquet export does not have: point the dataset at the original release ('{ANNOTATIONS}') or "
                "set its convention: freeform_para"
            )
        return read_hub_parquet(root, split, dataset=dataset, problems=problems, check_images=check_images)
    path = root / ANNOTATIONS
    images = PathResolver(root / IMAGE_FOLDER, check_exists=check_images)
    # mevf: every record's framed question is a train pair, whatever the record's own split
    frames = convention == "mevf" and split == "train"
    own_source = Source(str(path), "qid", "question")
    frame_source = Source(str(path), "qid", "question_frame")
    records: list[Record] = []
    for index, item in enumerate(load_json_list(path)):
        fields = Fields(
            item,
            file=path,
            record=record_label(index, item.get("qid") if isinstance(item, dict) else None),
            problems=problems,
        )
        qid = fields.ident("qid")
        phrase = fields.text("phrase_type")
        if not fields.ok:
            continue
        if phrase not in PHRASE_SPLITS:
            fields.report(
                "phrase_type",
                f"unknown phrase_type {phrase!r} (expected one of {', '.join(PHRASE_SPLITS)})",
                "unknown_phrase_type",
            )
            continue
        own = PHRASE_SPLITS[phrase] == split
        frame = NO_FRAME
        if frames:  # a missing or null frame drops the record; an empty or mistyped one only the frame
            frame_fields = (
                fields
                if item.get("question_frame") is None
                else Fields(item, file=path, record=fields.record, problems=problems)
            )
            frame = frame_fields.text("question_frame", what="question", empty="empty framed question (no frame: NULL)")
        framed = frame is not None and frame != NO_FRAME  # MEVF's test: question_frame != 'NULL'
        if not fields.ok or not (own or framed):
            continue
        question = fields.text("question", what="question")
        answer = fields.text("answer", what="answer", numbers=True)  # the release writes counts as numbers
        kind = fields.text("answer_type", what="answer_type")
        if kind is not None and kind.upper() not in ("OPEN", "CLOSED"):
            fields.report(
                "answer_type", f"unknown answer_type {kind!r} (expected OPEN or CLOSED)", "unknown_answer_type"
            )
        image_name = fields.text("image_name", what="path")
        if not fields.ok:
            continue
        image = images.resolve(image_name, file=path, record=fields.record, field_name="image_name", problems=problems)
        if image is None:
            continue
        extra = {
            "phrase_type": phrase,
            "question_type": item.get("question_type"),
            "image_organ": item.get("image_organ"),
        }
        pairs = [(f"{dataset}/{qid}", question, extra, own_source)] if own else []
        if framed:  # MEVF's phrase_type "frame"; source_phrase_type says whether a test question was framed
            frame_extra = {**extra, "phrase_type": "frame", "source_phrase_type": phrase}
            pairs.append((f"{dataset}/{qid}{FRAME_SUFFIX}", frame, frame_extra, frame_source))
        records += [
            Record(
                id=rid,
                dataset=dataset,
                split=split,
                question=pair_question,
                answer=answer,
                answer_type=kind.lower(),
                image_path=image,
                extra=pair_extra,
                source=source,
            )
            for rid, pair_question, pair_extra, source in pairs
        ]
    return records
