"""LightningDataModule over one or more datasets in their released formats (the mixture DataModule).

Training batches come from :class:`datamodules.mixture.MixtureSampler`: datasets drawn by their
``weight``, optionally one task per batch, deterministic by ``seed`` and sharded per rank (the
trainer's world size and global rank when attached). Evaluation loaders are sequential; under
DDP Lightning shards them with padding, so de-duplicate predictions with
:func:`medcore.ids.dedupe_by_id`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.dataset import Collator, VQADataset
from datamodules.encoding import ConversationEncoder, fitting_records
from datamodules.images import ImageTransform
from datamodules.mixture import MixtureSampler, mixture_groups
from datamodules.problems import Problem, ProblemLog
from datamodules.prompts import PromptTemplates
from datamodules.readers import read_split
from datamodules.records import Record
from datamodules.sharding import world_of
from datamodules.specs import TASK_IDS, DatasetSpec
from datamodules.writers import ensure_synthetic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class VQADataModule(L.LightningDataModule):
    """Reads the configured datasets, and after :meth:`connect` serves tokenised batches.

    The tokenizer, image transform and number of visual tokens belong to the model, so they are
    handed in through ``connect`` rather than built here. ``verify_images`` decodes every image
    and mask when a split is first read (what ``medpipe data check`` does), so that under
    ``on_bad_record: skip`` corrupt files are skipped and counted instead of failing a batch.
    """

    def __init__(
        self,
        *,
        datasets: dict[str, DatasetSpec],
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        max_length: int = 512,
        on_bad_record: str = "error",
        system_prompt: str | None = None,
        enable_thinking: bool = False,
        task_prefix: bool = False,
        pad_square: bool = False,
        seed: int = 0,
        one_task_per_batch: bool = False,
        samples_per_epoch: int | None = None,
        verify_images: bool = False,
        prompt_templates: bool = False,
    ) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("no datasets configured (data.datasets is empty)")
        self.datasets = datasets
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.task_prefix = task_prefix
        self.pad_square = pad_square
        self.seed = seed
        self.one_task_per_batch = one_task_per_batch
        self.samples_per_epoch = samples_per_epoch
        self.verify_images = verify_images
        # per-task prompt templates (datamodules/prompts.py): random in training, the first otherwise
        self.prompts = PromptTemplates() if prompt_templates else None
        self.problems = ProblemLog(on_bad_record)
        self.max_image_pixels = {name: spec.max_image_pixels for name, spec in datasets.items()}
        self._read: dict[str, list[Record]] = {}  # split -> records as read (and verified)
        self.records: dict[str, list[Record]] = {}  # split -> records served: read, and prompts that fit once connected
        self.split_problems: dict[str, list[Problem]] = {}  # split -> the problems found while reading or checking it
        self.split_filtered: dict[str, Counter] = {}  # split -> records left out by configuration ("file: why" -> n)
        self.tokenizer: Any = None
        self.transform: ImageTransform | None = None
        self.encoder: ConversationEncoder | None = None
        self.task_ids: dict[str, int] = {}

    def connect(
        self,
        tokenizer: Any,
        transform: ImageTransform,
        *,
        num_image_tokens: int,
        task_ids: dict[str, int] | None = None,
        sam_transform: Any = None,
        region_grid_size: int | None = None,
    ) -> VQADataModule:
        self.tokenizer = tokenizer
        self.records = {}  # served records depend on the encoder: prompts are checked again against this one
        self.sam_transform = sam_transform  # grounding models: items also carry SAM's input
        # region encoders: items carry the region mask at the vision input resolution and its patch-grid weights
        self.region_grid_size = region_grid_size
        self.transform = transform
        self.task_ids = dict(TASK_IDS if task_ids is None else task_ids)  # task tag -> id in the batch
        self.encoder = ConversationEncoder(
            tokenizer,
            num_image_tokens=num_image_tokens,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
            enable_thinking=self.enable_thinking,
            task_prefix=self.task_prefix,
        )
        return self

    # -- data ------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for name, spec in self.datasets.items():
            if ensure_synthetic(spec):
                log.info("wrote synthetic %s dataset %r to %s", spec.format, name, spec.path)

    def release_split(self, spec: DatasetSpec, split: str) -> str | None:
        return {"train": spec.train_split, "val": spec.val_split, "test": spec.test_split}[split]

    def split_records(self, split: str) -> list[Record]:
        """All records of one pipeline split (train / val / test) over the configured datasets.

        Read once (every problem reported to :attr:`problems`; with ``verify_images`` every image decoded).
        Once connected, a record whose prompt leaves no room for an answer within ``max_length`` is a bad record
        too (:func:`datamodules.encoding.fitting_records`), found here rather than in a loader worker. Each
        split's problems are kept in :attr:`split_problems`, the records its settings left out (SLAKE's other
        languages, ``max_samples``) counted in :attr:`split_filtered`.
        """
        if split not in self._read:
            before, filtered = len(self.problems.problems), Counter(self.problems.filtered)
            records: list[Record] = []
            for name, spec in self.datasets.items():
                release_split = self.release_split(spec, split)
                if release_split:
                    records += read_split(spec, name, release_split, self.problems)
            if self.verify_images:
                from datamodules.verify import verify_records

                records = verify_records(records, self.problems, max_pixels=self.max_image_pixels)
            self._read[split] = records
            self.split_filtered[split] = self.problems.filtered - filtered
            for reason, count in sorted(self.split_filtered[split].items()):
                log.info("%s split: left out %d records by configuration (%s)", split, count, reason)
            self._file_problems(split, before)
        if split not in self.records:
            records = self._read[split]
            if self.encoder is not None:
                before = len(self.problems.problems)
                records = fitting_records(
                    records,
                    self.encoder,
                    self.problems,
                    prompts=self.prompts,
                    every_template=split == "train",
                )
                self._file_problems(split, before)
            self.records[split] = records
        return self.records[split]

    def _file_problems(self, split: str, start: int) -> None:
        """File the problems reported since ``start`` under ``split`` and warn about them."""
        new = self.problems.problems[start:]
        if new:
            self.split_problems.setdefault(split, []).extend(new)
            self.problems.warn(f"{split} split")

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "fit", SPLITS):
            self.split_records(split)

    # -- loaders ---------------------------------------------------------------------------------
    def _require_connected(self) -> None:
        if self.encoder is None or self.transform is None:
            raise RuntimeError("call datamodule.connect(tokenizer, transform, num_image_tokens=...) first")

    def dataset(self, split: str, *, with_answers: bool) -> VQADataset:
        self._require_connected()
        return VQADataset(
            self.split_records(split),
            encoder=self.encoder,
            transform=self.transform,
            with_answers=with_answers,
            task_ids=self.task_ids,
            prompts=self.prompts,
            random_prompts=split == "train" and with_answers,
            sam_transform=getattr(self, "sam_transform", None),
            region_grid_size=getattr(self, "region_grid_size", None),
            max_image_pixels=self.max_image_pixels,
        )

    def train_sampler(self, *, world_size: int | None = None, rank: int | None = None) -> MixtureSampler:
        """The training sampler for one rank (default: this process's rank in the attached trainer)."""
        if world_size is None or rank is None:
            world_size, rank = world_of(self.trainer)
        groups = mixture_groups(
            self.split_records("train"),
            {n: s.weight for n, s in self.datasets.items()},
            by_task=self.one_task_per_batch,
        )
        return MixtureSampler(
            groups,
            samples_per_epoch=self.samples_per_epoch,
            block_size=self.batch_size if self.one_task_per_batch else 1,
            seed=self.seed,
            num_replicas=world_size,
            rank=rank,
        )

    def collator(self, generation: bool = False) -> Collator:
        """The collate function of the loaders: right padding with answers as labels for training and
        scoring, left padding for generation."""
        self._require_connected()
        return Collator(pad_token_id=self.tokenizer.pad_token_id, padding_side="left" if generation else "right")

    def _loader(self, split: str, *, train: bool, generation: bool = False) -> DataLoader:
        dataset = self.dataset(split, with_answers=not generation)
        if len(dataset) == 0:
            raise ValueError(f"split {split!r} has no records in datasets {sorted(self.datasets)}")
        sampler = self.train_sampler() if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collator(generation),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not any(self.release_split(spec, "val") for spec in self.datasets.values()):
            return []  # no dataset has a validation split (VQA-RAD, MeCoVQA): no validation loop
        return self._loader("val", train=False)

    def generation_dataloader(self, split: str) -> DataLoader:
        """Left-padded prompts without answers, for batched generation on any split."""
        return self._loader(split, train=False, generation=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False, generation=True)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
