"""MeCoVQA (MedPLIB): conversation JSON with region prompts and pixel-grounding targets.

    train: MeCoVQA-Complex.json  MeCoVQA-Region.json  MeCoVQA-Grounding.json
    test:  MeCoVQA_Complex_VQA_test.json  MeCoVQA_Region_VQA_test.json  MeCoVQA_Grounding_test.json
    images/ct_00--CT_ORG--volume-1--x_0083.png   masks/...png   masks_merged/..._merged.png

- task by subset: Complex -> ``vqa``, Region -> ``region``, Grounding -> ``grounding``;
- modality from the image file name's prefix before the first ``_`` (``ct`` -> CT, ``x`` of
  ``x_ray--...`` -> X-ray, ...); an unknown prefix is kept as written rather than guessed;
- ``<region>masks/a.png</region>`` in a human turn: the path becomes ``record.region`` and the
  question keeps ``<region></region>`` for the model to fill with region tokens (as MedPLIB does);
- ``<SEG>`` + ``<mask>masks_merged/b.png</mask>`` in a gpt turn: the path becomes
  ``record.mask_path`` and the answer keeps ``<SEG>`` without the ``<mask>`` tag. A ``<mask>``
  without ``<SEG>``, or two masks in one turn, is a bad record.
Image and mask paths are relative to ``image_root`` (default: the dataset folder).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import PathResolver, answer_type_of, load_json_list, record_label
from datamodules.readers.conversation import conversation_messages, parse_turns
from datamodules.records import Record, Turn

log = logging.getLogger(__name__)

FILES = {
    "train": {
        "complex": "MeCoVQA-Complex.json",
        "region": "MeCoVQA-Region.json",
        "grounding": "MeCoVQA-Grounding.json",
    },
    "test": {
        "complex": "MeCoVQA_Complex_VQA_test.json",
        "region": "MeCoVQA_Region_VQA_test.json",
        "grounding": "MeCoVQA_Grounding_test.json",
    },
}
SUBSETS = ("complex", "region", "grounding")
SUBSET_TASKS = {"complex": "vqa", "region": "region", "grounding": "grounding"}
MODALITY_PREFIXES = {
    "ct": "CT",
    "mr": "MRI",
    "mri": "MRI",
    "x": "X-ray",
    "xray": "X-ray",
    "x-ray": "X-ray",
    "ultrasound": "ultrasound",
    "us": "ultrasound",
    "pet": "PET",
    "fundus": "fundus",
    "dermoscopy": "dermoscopy",
    "endoscopy": "endoscopy",
}
REGION_TAG = re.compile(r"<region>(.*?)</region>", re.DOTALL)
MASK_TAG = re.compile(r"\s*<mask>(.*?)</mask>", re.DOTALL)
SEG = "<SEG>"


def modality_of(image: str) -> str:
    """SA-Med2D file-name prefix -> one of the 8 modality names (unknown prefixes kept as written)."""
    prefix = Path(image).name.split("_", 1)[0]
    return MODALITY_PREFIXES.get(prefix.lower(), prefix)


def available_splits(root: Path) -> list[str]:
    return [s for s, files in FILES.items() if any((Path(root) / f).is_file() for f in files.values())]


def subset_files(root: Path, split: str, subsets: list[str] | tuple[str, ...] | None) -> list[tuple[str, Path]]:
    """(subset, file) pairs to read. Explicit subsets must exist; by default every one present."""
    if split not in FILES:
        raise DataError(
            f"{root}: MeCoVQA has no split {split!r}: it has {', '.join(FILES)} (set the dataset's val_split: null)"
        )
    for name in subsets or ():
        if name not in SUBSETS:
            raise DataError(f"{root}: unknown MeCoVQA subset {name!r}; expected some of {', '.join(SUBSETS)}")
    wanted = list(subsets) if subsets else list(SUBSETS)
    pairs = [(name, root / FILES[split][name]) for name in wanted]
    present = [(name, path) for name, path in pairs if path.is_file()]
    if subsets:
        for name, path in pairs:
            if not path.is_file():
                raise file_error(path, "<file>", f"MeCoVQA {name} file for split {split!r} not found", "missing_file")
    elif not present:
        raise file_error(
            root, "<file>", f"no MeCoVQA {split} files ({', '.join(FILES[split].values())})", "missing_file"
        )
    elif len(present) < len(pairs):
        log.info(
            "%s: MeCoVQA %s: reading %s (the other subsets are not in the folder)",
            root,
            split,
            ", ".join(name for name, _ in present),
        )
    return present


def read_mecovqa(
    root: str | Path,
    split: str,
    *,
    dataset: str = "mecovqa",
    subsets: list[str] | None = None,
    image_root: str | Path | None = None,
    problems: ProblemLog | None = None,
    check_images: bool = True,
) -> list[Record]:
    root = Path(root)
    problems = problems or ProblemLog()
    files = PathResolver(Path(image_root) if image_root else root, check_exists=check_images)
    records: list[Record] = []
    for subset, path in subset_files(root, split, subsets):
        for index, item in enumerate(load_json_list(path)):
            record = _record(
                item,
                index=index,
                subset=subset,
                path=path,
                split=split,
                dataset=dataset,
                files=files,
                problems=problems,
            )
            if record is not None:
                records.append(record)
    return records


def _record(
    item: object,
    *,
    index: int,
    subset: str,
    path: Path,
    split: str,
    dataset: str,
    files: PathResolver,
    problems: ProblemLog,
) -> Record | None:
    if not isinstance(item, dict):
        problems.report(path, index, "<record>", f"expected an object, got {type(item).__name__}", "not_an_object")
        return None
    label = record_label(index, item.get("id"))
    convs = conversation_messages(item)
    if not isinstance(convs, list) or not convs:
        problems.report(path, label, "conversations", "missing or empty conversation", "missing_field")
        return None
    turns = parse_turns(convs, path, label, problems)
    if turns is None:
        return None
    image = item.get("image")
    if isinstance(image, list):
        image = image[0] if image else None
    if not image:
        problems.report(path, label, "image", "missing field", "missing_field")
        return None
    image_path = files.resolve(str(image), file=path, record=label, field_name="image", problems=problems)
    if image_path is None:
        return None
    regions: list[str] = []
    masks: list[str] = []
    clean: list[Turn] = []
    for t, turn in enumerate(turns):
        question = _take_regions(
            turn.question,
            f"conversations[{2 * t}].value",
            regions,
            path=path,
            label=label,
            files=files,
            problems=problems,
        )
        answer = _take_mask(
            turn.answer,
            f"conversations[{2 * t + 1}].value",
            masks,
            path=path,
            label=label,
            files=files,
            problems=problems,
        )
        if question is None or answer is None:
            return None
        clean.append(Turn(question=question, answer=answer))
    answer_type = answer_type_of(item.get("answer_type"), clean[0].answer, path, label, problems)
    if answer_type is None:
        return None
    extra: dict = {"subset": subset, "source_id": item.get("id", index)}
    if len(regions) > 1:
        extra["regions"] = regions
    if len(masks) > 1:
        extra["mask_paths"] = masks
    return Record(
        id=f"{dataset}/{subset}/{item.get('id', index)}",
        dataset=dataset,
        split=split,
        question=clean[0].question,
        answer=clean[0].answer,
        answer_type=answer_type,
        task=SUBSET_TASKS[subset],
        modality=modality_of(str(image)),
        image_path=image_path,
        turns=clean,
        mask_path=masks[0] if masks else None,
        region=regions[0] if regions else None,
        extra=extra,
    )


def _take_regions(
    text: str, field_name: str, regions: list[str], *, path: Path, label: str, files: PathResolver, problems: ProblemLog
) -> str | None:
    """Collect ``<region>path</region>`` paths; the text keeps ``<region></region>``."""
    for relative in REGION_TAG.findall(text):
        resolved = files.resolve(
            relative.strip(),
            file=path,
            record=label,
            field_name=field_name,
            problems=problems,
            missing_kind="missing_mask",
        )
        if resolved is None:
            return None
        regions.append(resolved)
    return REGION_TAG.sub("<region></region>", text)


def _take_mask(
    text: str, field_name: str, masks: list[str], *, path: Path, label: str, files: PathResolver, problems: ProblemLog
) -> str | None:
    """Collect the ``<mask>path</mask>`` target of a ``<SEG>`` answer; the text keeps ``<SEG>``."""
    found = MASK_TAG.findall(text)
    if not found:
        return text
    if SEG not in text:
        problems.report(
            path,
            label,
            field_name,
            "<mask> without <SEG> (a grounding target needs the <SEG> token)",
            "mask_without_seg",
        )
        return None
    if len(found) > 1:
        problems.report(
            path, label, field_name, f"{len(found)} <mask> targets in one turn (one is supported)", "bad_mask_tag"
        )
        return None
    resolved = files.resolve(
        found[0].strip(), file=path, record=label, field_name=field_name, problems=problems, missing_kind="missing_mask"
    )
    if resolved is None:
        return None
    masks.append(resolved)
    return MASK_TAG.sub("", text).strip()
