"""Seeded index subsets and the uint8 cast (:mod:`atop.data`)."""

from __future__ import annotations

import pytest
import torch

from atop.data import random_split, random_subset, take, to_unit


def test_random_subset_is_deterministic_sorted_and_seeded():
    first = random_subset(10_000, 512, seed=0)
    assert first.dtype == torch.int64 and first.shape == (512,)
    assert torch.equal(first, random_subset(10_000, 512, seed=0))  # same seed, same subset
    assert torch.equal(first, first.sort().values) and len(set(first.tolist())) == 512
    assert 0 <= first.min() and first.max() < 10_000
    assert not torch.equal(first, random_subset(10_000, 512, seed=1))
    # a private generator: the global RNG neither matters nor moves
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(random_subset(10_000, 512, seed=0), first)
    assert torch.equal(torch.get_rng_state(), state)
    # draw order on request: the same indices
    unsorted = random_subset(10_000, 512, seed=0, sort=False)
    assert torch.equal(unsorted.sort().values, first) and not torch.equal(unsorted, first)


def test_random_subset_all_or_too_many_is_every_candidate():
    assert torch.equal(random_subset(6, None, seed=0), torch.arange(6))
    assert torch.equal(random_subset(6, 6, seed=3), torch.arange(6))
    assert torch.equal(random_subset(6, 100, seed=3), torch.arange(6))
    assert torch.equal(random_subset(6, None, seed=0, exclude=[1, 4]), torch.tensor([0, 2, 3, 5]))
    with pytest.raises(ValueError, match="at least one item"):
        random_subset(6, 0, seed=0)


def test_exclude_is_respected():
    eval_indices = random_subset(1000, 100, seed=0)
    held_out = random_subset(1000, 800, seed=0, exclude=eval_indices)
    assert not set(held_out.tolist()) & set(eval_indices.tolist())
    # exactly the 900 others when asking for all of them
    rest = random_subset(1000, None, seed=0, exclude=eval_indices.tolist())
    assert set(rest.tolist()) == set(range(1000)) - set(eval_indices.tolist())
    assert random_subset(5, 1, seed=0, exclude=[0, 1, 2, 3]).tolist() == [4]
    assert torch.equal(random_subset(5, 2, seed=0, exclude=[]), random_subset(5, 2, seed=0))
    for bad in ([5], [-1]):
        with pytest.raises(ValueError, match=r"Excluded indices must lie in \[0, 5\)"):
            random_subset(5, 2, seed=0, exclude=bad)


def test_random_split_gives_disjoint_deterministic_chunks():
    chunks = random_split(1000, [100, 250, 1], seed=7)
    assert [len(c) for c in chunks] == [100, 250, 1]
    assert all(c.dtype == torch.int64 for c in chunks)
    sets = [set(c.tolist()) for c in chunks]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 351  # pairwise disjoint
    again = random_split(1000, [100, 250, 1], seed=7)
    assert all(torch.equal(a, b) for a, b in zip(chunks, again, strict=True))
    # one permutation: the chunks are its consecutive slices, whatever the sizes
    whole = random_split(1000, [351], seed=7)[0]
    assert torch.equal(torch.cat(chunks), whole)
    # random_subset is the first chunk, sorted
    assert torch.equal(random_subset(1000, 100, seed=7), chunks[0].sort().values)
    excluded = random_split(1000, [100, 100], seed=7, exclude=chunks[0])
    assert not (set(excluded[0].tolist()) | set(excluded[1].tolist())) & sets[0]


def test_random_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match=r"sizes \[3, 3\] from 5 items \(6 minus 1 excluded\)"):
        random_split(6, [3, 3], seed=0, exclude=[2])
    with pytest.raises(ValueError, match="lower the sizes"):
        random_split(6, [0, 2], seed=0)
    assert [len(c) for c in random_split(6, [3, 2], seed=0, exclude=[2])] == [3, 2]


def test_to_unit_and_take_follow_the_split_layout(cifar10_test_batch):
    images, labels = cifar10_test_batch
    split = {"images": (images * 255).round().to(torch.uint8), "labels": labels}
    unit = to_unit(split["images"])
    assert unit.dtype == torch.float32 and torch.allclose(unit, images, atol=1e-6)
    assert split["images"].dtype == torch.uint8  # a new tensor, the split is untouched
    assert to_unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]
    index = random_subset(len(labels), 16, seed=0)
    subset = take(split, index)
    assert set(subset) == {"images", "labels"}
    assert torch.equal(subset["images"], split["images"][index])
    assert torch.equal(subset["labels"], labels[index])
    assert torch.equal(take(split, [3, 1])["labels"], labels[[3, 1]])
