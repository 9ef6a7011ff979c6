"""Writers of small synthetic datasets in each format's exact release layout."""

from __future__ import annotations

from pathlib import Path

from datamodules.specs import DatasetSpec

COMPLETE_MARKER = ".medpipe-synthetic"


def ensure_synthetic(spec: DatasetSpec) -> bool:
    """Write the synthetic dataset ``spec`` describes unless it is already there; True if written."""
    root = Path(spec.path)
    if spec.synthetic is None or (root / COMPLETE_MARKER).is_file():
        return False
    syn = spec.synthetic
    if spec.format == "slake":
        from datamodules.writers.slake import write_slake

        counts = write_slake(root, n_train=syn.train_images, n_val=syn.val_images, n_test=syn.test_images,
                             seed=syn.seed, size=syn.image_size, questions_per_image=syn.questions_per_image)
    elif spec.format == "conversation":
        from datamodules.writers.conversation import write_conversation

        counts = write_conversation(root, kind=syn.kind, n_train=syn.train_images, n_val=syn.val_images,
                                    n_test=syn.test_images, seed=syn.seed, size=syn.image_size,
                                    questions_per_image=syn.questions_per_image)
    else:
        raise ValueError(f"no synthetic writer for format {spec.format!r}")
    (root / COMPLETE_MARKER).write_text(str(counts) + "\n")
    return True
