"""Small synthetic datasets in every release layout (32 px phantoms: the tests read, not learn)."""

from __future__ import annotations

from pathlib import Path

import pytest

SIZE = 32


@pytest.fixture(scope="session")
def vqa_rad_original(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.vqa_rad import write_vqa_rad

    root = tmp_path_factory.mktemp("vqa_rad")
    return root, write_vqa_rad(root, n_train=8, n_test=4, seed=1, size=SIZE)


@pytest.fixture(scope="session")
def vqa_rad_parquet(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.vqa_rad import write_vqa_rad

    root = tmp_path_factory.mktemp("vqa_rad_hub")
    return root, write_vqa_rad(root, layout="parquet", n_train=8, n_test=4, seed=1, size=SIZE)


@pytest.fixture(scope="session")
def slake_small(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.slake import write_slake

    root = tmp_path_factory.mktemp("slake_small")
    return root, write_slake(
        root, n_train=6, n_val=3, n_test=3, seed=2, size=SIZE, zh_fraction=0.6, validation_name="validation.json"
    )


@pytest.fixture(scope="session")
def pathvqa_parquet(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.pathvqa import write_pathvqa

    root = tmp_path_factory.mktemp("pathvqa_hub")
    return root, write_pathvqa(root, n_train=5, n_val=2, n_test=3, seed=3, size=SIZE)


@pytest.fixture(scope="session")
def pathvqa_pickle(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.pathvqa import write_pathvqa

    root = tmp_path_factory.mktemp("pathvqa_release") / "pvqa"
    return root, write_pathvqa(root, layout="pickle", n_train=5, n_val=2, n_test=3, seed=3, size=SIZE)


@pytest.fixture(scope="session")
def mecovqa_small(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.mecovqa import write_mecovqa

    root = tmp_path_factory.mktemp("mecovqa")
    return root, write_mecovqa(root, n_train=6, n_test=3, seed=4, size=SIZE)


@pytest.fixture(scope="session")
def conversation_small(tmp_path_factory) -> tuple[Path, dict]:
    from datamodules.writers.conversation import write_conversation

    root = tmp_path_factory.mktemp("conversation")
    return root, write_conversation(
        root, kind="vqa", n_train=5, n_val=2, n_test=2, seed=5, size=SIZE, questions_per_image=4
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    from lightningmodules.models.language import load_tokenizer

    return load_tokenizer(tiny_llama, extra_special_tokens=["<image>"])


@pytest.fixture(scope="session")
def transform(tiny_clip):
    from datamodules.images import ImageTransform

    return ImageTransform.from_pretrained(tiny_clip)
