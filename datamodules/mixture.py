"""Weighted multi-dataset sampling: proportions by weight, one task per batch, a shard per rank.

Every rank computes the same global index stream for an epoch from ``(seed, epoch)`` and keeps
every ``world_size``-th element (or block), so the shards are disjoint and together are exactly
the single-process stream. Per epoch:

- group ``g`` (a dataset, or a (dataset, task) pair for one task per batch) gets
  ``round(total * w_g / sum(w))`` samples (largest remainder, so the counts add up exactly);
- a group's samples come from its own stream of reshuffled permutations, continued from epoch to
  epoch: a group sampled below its size sees new samples next epoch, one sampled above repeats
  (each sample at most once more than any other);
- the samples are shuffled together; with ``block_size`` B > 1 whole blocks of B samples of one
  group are shuffled instead, so a loader with ``batch_size=B`` serves one task per batch.

The class subclasses ``DistributedSampler`` so Lightning leaves it in place (it would otherwise
wrap it in another distributed sampler, or refuse a custom batch sampler) and calls ``set_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DistributedSampler

from datamodules.records import Record


@dataclass
class Group:
    """Records (as indices into the concatenated dataset) drawn with one weight."""

    name: str
    indices: np.ndarray  # (N_g,) int64
    weight: float


def mixture_groups(records: Sequence[Record], weights: dict[str, float], *, by_task: bool) -> list[Group]:
    """Groups per dataset, or per (dataset, task) with the dataset's weight split by task size."""
    members: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        members.setdefault((r.dataset, r.task if by_task else ""), []).append(i)
    sizes: dict[str, int] = {}
    for (dataset, _), idx in members.items():
        sizes[dataset] = sizes.get(dataset, 0) + len(idx)
    groups = []
    for (dataset, task), idx in members.items():
        if dataset not in weights:
            raise ValueError(f"records of dataset {dataset!r} have no mixture weight")
        share = len(idx) / sizes[dataset]  # a dataset's tasks split its weight by their sizes
        groups.append(
            Group(
                name=f"{dataset}/{task}" if by_task else dataset,
                indices=np.asarray(idx, dtype=np.int64),
                weight=weights[dataset] * share,
            )
        )
    return groups


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts proportional to ``weights`` that add up to ``total`` exactly."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")  # biggest remainders first; ties by group order
    counts[order[: total - int(counts.sum())]] += 1
    return counts.tolist()


class SampleIndex(int):
    """A dataset index that also carries the sampler's epoch (per-sample randomness, e.g. the prompt
    template, is drawn from (epoch, index): reproducible across worker layouts and resumes)."""

    epoch: int

    def __new__(cls, index: int, epoch: int) -> SampleIndex:
        value = super().__new__(cls, index)
        value.epoch = epoch
        return value

    def __reduce__(self):  # through DataLoader worker queues with the epoch attached
        return (SampleIndex, (int(self), self.epoch))


class MixtureSampler(DistributedSampler):
    """Index sampler over weighted groups; see the module docstring for the stream it yields."""

    def __init__(
        self,
        groups: list[Group],
        *,
        samples_per_epoch: int | None = None,
        block_size: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        # DistributedSampler.__init__ wants a dataset and, without explicit ranks, a process group;
        # everything it would set is set here.
        groups = [g for g in groups if g.weight > 0]
        if not groups:
            raise ValueError("a mixture needs at least one group with records and weight > 0")
        empty = [g.name for g in groups if len(g.indices) == 0]
        if empty:
            raise ValueError(f"mixture groups without records: {empty}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.groups = groups
        self.block_size = max(1, int(block_size))
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.skip_samples = 0  # set on a mid-epoch resume: the next epoch's first samples were consumed
        self.shuffle = True
        self.drop_last = False
        self.dataset = None
        total = samples_per_epoch if samples_per_epoch is not None else sum(len(g.indices) for g in groups)
        # blocks per epoch, rounded up so every rank gets the same number of batches
        blocks = math.ceil(math.ceil(total / self.block_size) / self.num_replicas) * self.num_replicas
        self.blocks = blocks
        self.total_size = blocks * self.block_size
        self.num_samples = self.total_size // self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def global_stream(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's indices over all ranks: (blocks, block_size) flattened to (total_size,)."""
        epoch = self.epoch if epoch is None else epoch
        counts = largest_remainder(self.blocks, [g.weight for g in self.groups])  # blocks per group
        parts = []
        for gi, (group, n_blocks) in enumerate(zip(self.groups, counts, strict=True)):
            n = n_blocks * self.block_size
            taken = _group_stream(len(group.indices), start=epoch * n, count=n, seed=(self.seed, gi))
            parts.append(group.indices[taken].reshape(n_blocks, self.block_size))  # (n_blocks_g, B)
        blocks = np.concatenate(parts, axis=0)  # (blocks, B)
        order = np.random.default_rng([self.seed, epoch, 7919]).permutation(len(blocks))
        return blocks[order].reshape(-1)  # (blocks * B,)

    def __iter__(self) -> Iterator[int]:
        blocks = self.global_stream().reshape(self.blocks, self.block_size)  # (blocks, B)
        mine = blocks[self.rank :: self.num_replicas]  # (blocks / world, B): every world-th block
        skip, self.skip_samples = self.skip_samples, 0  # one-shot: only the resumed epoch starts late
        return (SampleIndex(i, self.epoch) for i in mine.reshape(-1)[skip:].tolist())


def _group_stream(size: int, *, start: int, count: int, seed: tuple[int, int]) -> np.ndarray:
    """Items ``[start, start + count)`` of perm_0 ++ perm_1 ++ ... (perm_k: permutation of ``size``)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // size, (start + count - 1) // size
    perms = [np.random.default_rng([seed[0], seed[1], k]).permutation(size) for k in range(first, last + 1)]
    joined = np.concatenate(perms)  # ((last - first + 1) * size,)
    offset = start - first * size
    return joined[offset : offset + count]
