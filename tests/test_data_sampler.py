"""ResumableSampler: sharding, exact resume, and re-sharding to another number of ranks."""

from __future__ import annotations

from itertools import islice

import pytest

from launcher.data import ResumableSampler


def samplers(n: int, world: int, seed: int = 5, **kwargs) -> list[ResumableSampler]:
    return [
        ResumableSampler(n, num_replicas=world, rank=r, seed=seed, **kwargs) for r in range(world)
    ]


def take(iterators, k: int) -> list[list[int]]:
    """k indices from each rank's iterator, ranks in lockstep as in data-parallel training."""
    return [list(islice(it, k)) for it in iterators]


def test_epoch_is_a_permutation_split_across_ranks():
    ranks = samplers(103, 4)
    per_rank = [list(s) for s in ranks]
    assert [len(p) for p in per_rank] == [25] * 4  # 103 // 4, the 3-sample tail dropped
    union = [i for p in per_rank for i in p]
    assert len(set(union)) == 100 and set(union) <= set(range(103))
    # Rank r takes global positions r, r+W, ... of one seeded order.
    order = ranks[0].order()
    assert per_rank[1] == order[1:100:4]
    assert sorted(order) == list(range(103)) and order != list(range(103))


def test_no_shuffle_and_no_drop_last():
    ranks = samplers(10, 3, shuffle=False, drop_last=False)
    per_rank = [list(s) for s in ranks]
    assert per_rank == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # wraps to even out


def test_consumed_counts_what_the_ranks_took():
    ranks = samplers(50, 2)
    its = [iter(s) for s in ranks]
    take(its, 7)
    assert [s.state_dict() for s in ranks] == [{"seed": 5, "epoch": 0, "consumed": 14}] * 2
    assert [len(s) for s in ranks] == [18, 18]


def test_state_round_trip_continues_identically():
    full = [list(s) for s in samplers(64, 2)]
    ranks = samplers(64, 2)
    first = take([iter(s) for s in ranks], 9)
    state = ranks[0].state_dict()
    resumed = samplers(64, 2, seed=999)  # the seed comes from the state
    for s in resumed:
        s.load_state_dict(state)
    rest = [list(s) for s in resumed]
    assert [a + b for a, b in zip(first, rest)] == full
    union = [i for p in first + rest for i in p]
    assert sorted(union) == list(range(64))


def test_reshard_2_to_1_to_2_skips_and_repeats_nothing():
    n = 90
    order = samplers(n, 1)[0].order()
    seen: list[int] = []

    two = samplers(n, 2)
    steps = take([iter(s) for s in two], 6)
    seen += [i for pair in zip(*steps) for i in pair]  # global order: rank 0, rank 1, rank 0, ...
    state = two[1].state_dict()
    assert state["consumed"] == 12

    one = samplers(n, 1)[0]
    one.load_state_dict(state)
    seen += take([iter(one)], 11)[0]
    state = one.state_dict()
    assert state["consumed"] == 23

    two = samplers(n, 2)
    for s in two:
        s.load_state_dict(state)
    steps = [list(s) for s in two]
    assert len(steps[0]) == len(steps[1]) == (n - 23) // 2
    seen += [i for pair in zip(*steps) for i in pair]
    # Exactly the epoch's order, minus the one-sample tail that cannot be split over 2 ranks.
    assert seen == order[: n - 1]


def test_epochs_reshuffle_deterministically():
    a, b = samplers(40, 1)[0], samplers(40, 1)[0]
    first = list(a)
    assert list(a) == []  # the epoch is used up until set_epoch
    a.set_epoch(1)
    b.set_epoch(1)
    assert a.state_dict() == {"seed": 5, "epoch": 1, "consumed": 0}
    second = list(a)
    assert second == list(b) and second != first and sorted(second) == sorted(first)
    assert list(samplers(40, 1, seed=6)[0]) != first


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ResumableSampler(10, num_replicas=2, rank=2, seed=0)
    with pytest.raises(ValueError):
        ResumableSampler(0, num_replicas=1, rank=0, seed=0)
