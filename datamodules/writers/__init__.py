"""Writers of small synthetic datasets in each format's exact release layout."""

from __future__ import annotations

from pathlib import Path

from datamodules.specs import LAYOUTS, DatasetSpec

COMPLETE_MARKER = ".medpipe-synthetic"


def ensure_synthetic(spec: DatasetSpec) -> bool:
    """Write the synthetic dataset ``spec`` describes unless it is already there; True if written."""
    root = Path(spec.path)
    if spec.synthetic is None or (root / COMPLETE_MARKER).is_file():
        return False
    syn = spec.synthetic
    layout = syn.layout or LAYOUTS.get(spec.format, ("default",))[0]
    common = dict(seed=syn.seed, size=syn.image_size)
    if spec.format == "slake":
        from datamodules.writers.slake import write_slake

        counts = write_slake(
            root,
            n_train=syn.train_images,
            n_val=syn.val_images,
            n_test=syn.test_images,
            questions_per_image=syn.questions_per_image,
            zh_fraction=syn.zh_fraction,
            validation_name=f"{layout}.json",
            **common,
        )
    elif spec.format == "conversation":
        from datamodules.writers.conversation import write_conversation

        counts = write_conversation(
            root,
            kind=syn.kind,
            n_train=syn.train_images,
            n_val=syn.val_images,
            n_test=syn.test_images,
            questions_per_image=syn.questions_per_image,
            **common,
        )
    elif spec.format == "vqa_rad":
        from datamodules.writers.vqa_rad import write_vqa_rad

        counts = write_vqa_rad(
            root,
            layout=layout,
            n_train=syn.train_images,
            n_test=syn.test_images,
            questions_per_image=syn.questions_per_image,
            **common,
        )
    elif spec.format == "pathvqa":
        from datamodules.writers.pathvqa import write_pathvqa

        counts = write_pathvqa(
            root,
            layout=layout,
            n_train=syn.train_images,
            n_val=syn.val_images,
            n_test=syn.test_images,
            questions_per_image=syn.questions_per_image,
            **common,
        )
    elif spec.format == "mecovqa":
        from datamodules.writers.mecovqa import write_mecovqa

        counts = write_mecovqa(root, n_train=syn.train_images, n_test=syn.test_images, **common)
    else:
        raise ValueError(f"no synthetic writer for format {spec.format!r}")
    (root / COMPLETE_MARKER).write_text(str(counts) + "\n")
    return True
