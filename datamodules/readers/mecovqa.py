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
  without ``<SEG>``, a ``<SEG>`` without ``<mask>``, two of either in one turn, or an unclosed
  ``<mask>`` / ``<region>`` tag is a bad record.
Image and mask paths are relative to ``image_root`` (default: the dataset folder).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import Fields, PathResolver, answer_type_of, load_json_list, record_label
from datamodules.readers.conversation import parse_turns, record_image
from datamodules.records import Record, Source, Turn

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
        source = Source(str(path), "id", "conversations[0].value")
        for index, item in enumerate(load_json_list(path)):
            record = _record(
                item,
                index=index,
                subset=subset,
                path=path,
                source=source,
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
    source: Source,
    split: str,
    dataset: str,
    files: PathResolver,
    problems: ProblemLog,
) -> Record | None:
    label = record_label(index, item.get("id") if isinstance(item, dict) else None)
    fields = Fields(item, file=path, record=label, problems=problems)
    rid = fields.ident("id", optional=True)
    image = record_image(fields, required=True)
    turns = parse_turns(fields, has_image=True)
    if not fields.ok:
        return None
    image_path = files.resolve(image, file=path, record=label, field_name="image", problems=problems)
    if image_path is None:
        return None
    regions: list[str] = []
    masks: list[str] = []
    clean: list[Turn] = []
    for t, turn in enumerate(turns):
        question = _take_regions(turn.question, f"conversations[{2 * t}].value", regions, fields=fields, files=files)
        answer = _take_mask(turn.answer, f"conversations[{2 * t + 1}].value", masks, fields=fields, files=files)
        if question is None or answer is None:
            return None
        clean.append(Turn(question=question, answer=answer))
    answer_type = answer_type_of(fields, clean[0].answer)
    if answer_type is None:
        return None
    extra: dict = {"subset": subset, "source_id": item.get("id", index)}
    if len(regions) > 1:
        extra["regions"] = regions
    if len(masks) > 1:
        extra["mask_paths"] = masks
    return Record(
        id=f"{dataset}/{subset}/{rid if rid is not None else index}",
        dataset=dataset,
        split=split,
        question=clean[0].question,
        answer=clean[0].answer,
        answer_type=answer_type,
        task=SUBSET_TASKS[subset],
        modality=modality_of(image),
        image_path=image_path,
        turns=clean,
        mask_path=masks[0] if masks else None,
        region=regions[0] if regions else None,
        extra=extra,
        source=source,
    )


def _unpaired_tag(text: str, tag: str, pairs: int) -> str | None:
    """Why ``<tag>...</tag>`` pairs do not account for every ``<tag>`` / ``</tag>`` in ``text`` (None: they do)."""
    opened, closed = text.count(f"<{tag}>"), text.count(f"</{tag}>")
    if opened == closed == pairs:
        return None
    return (
        f"unclosed or stray <{tag}> tag ({opened} <{tag}>, {closed} </{tag}>): a {tag} path must be <{tag}>path</{tag}>"
    )


def _take_regions(text: str, field_name: str, regions: list[str], *, fields: Fields, files: PathResolver) -> str | None:
    """Collect ``<region>path</region>`` paths; the text keeps ``<region></region>``. An unclosed tag is a bad
    record (it would stay in the question as text)."""
    found = REGION_TAG.findall(text)
    unpaired = _unpaired_tag(text, "region", len(found))
    if unpaired:
        fields.report(field_name, unpaired, "bad_region_tag")
        return None
    if "<mask>" in text or "</mask>" in text or SEG in text:
        fields.report(field_name, f"<mask> or {SEG} in a question (grounding targets are answers)", "bad_mask_tag")
        return None
    for relative in found:
        resolved = _tag_path(relative, field_name, fields=fields, files=files)
        if resolved is None:
            return None
        regions.append(resolved)
    return REGION_TAG.sub("<region></region>", text)


def _take_mask(text: str, field_name: str, masks: list[str], *, fields: Fields, files: PathResolver) -> str | None:
    """Collect the ``<mask>path</mask>`` target of a ``<SEG>`` answer; the text keeps ``<SEG>``. A ``<SEG>``
    needs exactly one ``<mask>`` and a ``<mask>`` one ``<SEG>`` (a target without its token, or a token
    without its target, would train nothing); an unclosed tag would be answer text: all bad records."""
    found = MASK_TAG.findall(text)
    unpaired = _unpaired_tag(text, "mask", len(found))
    segs = text.count(SEG)
    if unpaired:
        fields.report(field_name, unpaired, "bad_mask_tag")
        return None
    if "<region>" in text or "</region>" in text:
        fields.report(field_name, "<region> in an answer (region prompts are questions)", "bad_region_tag")
        return None
    if not found and not segs:
        return text
    if found and not segs:
        fields.report(field_name, "<mask> without <SEG> (a grounding target needs the <SEG> token)", "mask_without_seg")
        return None
    if segs and not found:
        fields.report(
            field_name,
            "<SEG> without a <mask>path</mask> target (the grounding loss has nothing to learn)",
            "seg_without_mask",
        )
        return None
    if len(found) > 1 or segs > 1:
        fields.report(
            field_name,
            f"{len(found)} <mask> targets and {segs} <SEG> tokens in one turn (one of each is supported)",
            "bad_mask_tag",
        )
        return None
    resolved = _tag_path(found[0], field_name, fields=fields, files=files)
    if resolved is None:
        return None
    masks.append(resolved)
    return MASK_TAG.sub("", text).strip()


def _tag_path(relative: str, field_name: str, *, fields: Fields, files: PathResolver) -> str | None:
    """The resolved path inside a tag; an empty one is a bad record."""
    if not relative.strip():
        fields.report(field_name, "empty path in a tag", "missing_mask")
        return None
    return files.resolve(
        relative.strip(),
        file=fields.file,
        record=fields.record,
        field_name=field_name,
        problems=fields.problems,
        missing_kind="missing_mask",
    )
