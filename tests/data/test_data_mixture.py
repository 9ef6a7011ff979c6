"""Mixture sampling: proportions, one task per batch, determinism, rank shards, de-duplication."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datamodules.mixture import Group, MixtureSampler, largest_remainder, mixture_groups
from datamodules.records import Record
from datamodules.sharding import world_of
from medcore.ids import dedupe_by_id


def records(spec: dict[tuple[str, str], int]) -> list[Record]:
    """``{(dataset, task): count}`` -> records, in that order."""
    out = []
    for (dataset, task), n in spec.items():
        out += [
            Record(
                id=f"{dataset}/{task}/{i}",
                dataset=dataset,
                split="train",
                question="q",
                answer="a",
                answer_type="open",
                task=task,
            )
            for i in range(n)
        ]
    return out


MIX = records({("slake", "vqa"): 120, ("pathvqa", "vqa"): 40, ("mecovqa", "grounding"): 30, ("mecovqa", "region"): 10})
WEIGHTS = {"slake": 1.0, "pathvqa": 2.0, "mecovqa": 1.0}


def dataset_of(indices) -> Counter:
    return Counter(MIX[i].dataset for i in indices)


def test_largest_remainder_adds_up() -> None:
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: biggest remainders win
    assert sum(largest_remainder(1001, [0.3, 0.3, 0.4])) == 1001


def test_proportions_follow_weights() -> None:
    groups = mixture_groups(MIX, WEIGHTS, by_task=False)
    sampler = MixtureSampler(groups, samples_per_epoch=4000, seed=0)
    counts = dataset_of(sampler.global_stream())
    assert counts == {"slake": 1000, "pathvqa": 2000, "mecovqa": 1000}  # exactly w / sum(w)
    # each rank's shard of the shuffled stream is close to the same proportions
    for rank in range(2):
        shard = list(MixtureSampler(groups, samples_per_epoch=4000, seed=0, num_replicas=2, rank=rank))
        share = dataset_of(shard)["pathvqa"] / len(shard)
        assert abs(share - 0.5) < 0.04, share


def test_group_sampled_below_its_size_sees_new_samples_next_epoch() -> None:
    groups = mixture_groups(MIX, {"slake": 1.0, "pathvqa": 0.0, "mecovqa": 0.0}, by_task=False)
    sampler = MixtureSampler(groups, samples_per_epoch=60, seed=3)
    first = set(sampler.global_stream(epoch=0).tolist())
    second = set(sampler.global_stream(epoch=1).tolist())
    assert len(first) == len(second) == 60 and not first & second  # 120 slake records, half per epoch
    # an oversampled group repeats each record at most once more than any other
    over = MixtureSampler(mixture_groups(MIX, WEIGHTS, by_task=False), samples_per_epoch=1000, seed=3)
    per_record = Counter(i for i in over.global_stream().tolist() if MIX[i].dataset == "mecovqa")
    assert len(per_record) == 40 and max(per_record.values()) - min(per_record.values()) <= 1


def test_one_task_per_batch() -> None:
    groups = mixture_groups(MIX, WEIGHTS, by_task=True)
    assert sorted(g.name for g in groups) == ["mecovqa/grounding", "mecovqa/region", "pathvqa/vqa", "slake/vqa"]
    # mecovqa's weight is split between its tasks by size (30 : 10)
    weight = {g.name: g.weight for g in groups}
    assert weight["mecovqa/grounding"] == pytest.approx(0.75) and weight["mecovqa/region"] == pytest.approx(0.25)
    for rank in range(2):
        sampler = MixtureSampler(groups, samples_per_epoch=800, block_size=8, seed=1, num_replicas=2, rank=rank)
        stream = list(sampler)
        assert len(stream) == len(sampler) == 400
        batches = [stream[k : k + 8] for k in range(0, len(stream), 8)]
        kinds = [{(MIX[i].dataset, MIX[i].task) for i in batch} for batch in batches]
        assert all(len(k) == 1 for k in kinds)  # every batch is one dataset and one task
    whole = MixtureSampler(groups, samples_per_epoch=800, block_size=8, seed=1).global_stream().reshape(-1, 8)
    per_group = Counter((MIX[b[0]].dataset, MIX[b[0]].task) for b in whole)  # (100 blocks of 8)
    assert per_group == {
        ("pathvqa", "vqa"): 50,
        ("slake", "vqa"): 25,
        ("mecovqa", "grounding"): 19,
        ("mecovqa", "region"): 6,
    }


def test_deterministic_by_seed_and_epoch() -> None:
    groups = mixture_groups(MIX, WEIGHTS, by_task=False)
    a, b, c = (MixtureSampler(groups, seed=s) for s in (5, 5, 6))
    assert list(a) == list(b)
    assert list(a) != list(c)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != list(MixtureSampler(groups, seed=5))


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_cover_every_sample_exactly_once(world: int) -> None:
    one = [Group(name="d", indices=np.arange(90), weight=1.0)]  # 90 = 2 * 45 = 3 * 30
    shards = [list(MixtureSampler(one, seed=9, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of samples (and batches) on every rank
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(90))  # every sample exactly once over the ranks


def test_rank_shards_partition_the_global_stream() -> None:
    groups = mixture_groups(MIX, WEIGHTS, by_task=True)
    full = MixtureSampler(groups, samples_per_epoch=333, block_size=4, seed=2, num_replicas=1).global_stream()
    shards = [
        list(MixtureSampler(groups, samples_per_epoch=333, block_size=4, seed=2, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1])
    blocks = full.reshape(-1, 4)  # 84 blocks: 333 samples round up to whole blocks, even per rank
    assert blocks.shape == (84, 4)
    assert shards[0] == blocks[0::2].reshape(-1).tolist() and shards[1] == blocks[1::2].reshape(-1).tolist()


def test_world_without_trainer_or_process_group() -> None:
    assert world_of(None) == (1, 0)

    class Trainer:
        world_size, global_rank = 4, 3

    assert world_of(Trainer()) == (4, 3)


def test_dedupe_by_id_keeps_first_prediction() -> None:
    # DistributedSampler padding: rank 1 repeats sample "a" to even out the ranks
    gathered = [
        {"question_id": "a", "text": "yes"},
        {"question_id": "b", "text": "no"},
        {"question_id": "c", "text": "2"},
        {"question_id": "a", "text": "yes"},
    ]
    kept = dedupe_by_id(gathered)
    assert [p["question_id"] for p in kept] == ["a", "b", "c"] and kept[0] is gathered[0]
    assert [r.id for r in dedupe_by_id(MIX[:3] + MIX[:2])] == [r.id for r in MIX[:3]]
    assert dedupe_by_id([{"id": 1}, {"id": "1"}]) == [{"id": 1}]  # ids compare as strings


def test_eval_shards_with_padding_dedupe_to_the_split() -> None:
    """Two ranks under Lightning's DistributedSampler: 5 records padded to 6, de-duplicated back to 5."""
    from torch.utils.data import DistributedSampler

    split = MIX[:5]
    gathered = []
    for rank in range(2):
        indices = list(DistributedSampler(split, num_replicas=2, rank=rank, shuffle=False))
        assert len(indices) == 3
        gathered += [{"question_id": split[i].id, "text": f"rank{rank}"} for i in indices]
    assert len(gathered) == 6 and len({p["question_id"] for p in gathered}) == 5  # one padded repeat
    kept = dedupe_by_id(gathered)
    assert sorted(p["question_id"] for p in kept) == sorted(r.id for r in split)


def test_one_dedupe_implementation() -> None:
    from datamodules import sharding
    from lightningmodules.metrics import pairing
    from pipeline import evaluation

    assert evaluation.dedupe_by_id is dedupe_by_id  # evaluation and DataModule users share medcore's
    for module in (pairing, sharding):
        assert not hasattr(module, "dedupe_by_id") and not hasattr(module, "drop_padding_duplicates")


def test_bad_mixtures_are_errors() -> None:
    with pytest.raises(ValueError, match="no mixture weight"):
        mixture_groups(MIX, {"slake": 1.0}, by_task=False)
    with pytest.raises(ValueError, match="rank 2"):
        MixtureSampler(mixture_groups(MIX, WEIGHTS, by_task=False), num_replicas=2, rank=2)
