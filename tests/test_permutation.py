"""The epoch order: a seeded bijection evaluated on demand, split over ranks the same way for any world size."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from smim_dist.data.permutation import FeistelPermutation
from smim_dist.data.sampler import ResumableDistributedSampler


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097, 65536, 100_003])
def test_every_sample_appears_exactly_once(n):
    order = FeistelPermutation(n, 0, 1)(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))


def test_the_order_is_a_function_of_the_key_and_looks_random():
    n = 100_000
    positions = np.arange(n)
    first = FeistelPermutation(n, 7, 0)(positions)
    assert np.array_equal(first, FeistelPermutation(n, 7, 0)(positions)), "same seed and epoch, same order"
    assert (first != FeistelPermutation(n, 7, 1)(positions)).mean() > 0.99, "another epoch, another order"
    assert (first != FeistelPermutation(n, 8, 0)(positions)).mean() > 0.99, "another seed, another order"
    displacement = np.abs(first.astype(np.int64) - positions).mean()
    assert displacement == pytest.approx(n / 3, rel=0.02), "a uniform permutation moves a sample n/3 on average"
    halves = first[: n // 2] < n // 2
    assert halves.mean() == pytest.approx(0.5, abs=0.01), "the first half of the epoch draws from all of the data"


def test_any_positions_give_what_the_whole_order_gives_there():
    n = 12_345
    order = FeistelPermutation(n, 3, 2)
    whole = order(np.arange(n))
    picks = np.array([n - 1, 0, 5000, 17, 5000])
    assert np.array_equal(order(picks), whole[picks])
    with pytest.raises(IndexError, match="position 12345 outside a permutation of 12345"):
        order(np.array([n]))


def epoch_shares(num_samples, micro_batch, accumulation, world_size, epoch=3, start_batch=0):
    shares = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(num_samples, micro_batch, accumulation, rank, world_size, seed=5)
        sampler.set_epoch(epoch, start_batch)
        shares.append(sampler.rank_indices().reshape(-1, accumulation, micro_batch))
    return shares


@pytest.mark.parametrize("split", [(8, 4, 1), (16, 1, 2), (4, 2, 4), (2, 1, 16)])
def test_a_global_step_covers_the_same_samples_for_any_split(split):
    """(micro batch, accumulation, world size) with one global batch of 32: step g reads the same 32 samples."""
    num_samples = 1000
    reference = np.concatenate(epoch_shares(num_samples, 32, 1, 1)[0])
    shares = epoch_shares(num_samples, *split)
    steps = np.concatenate([share.reshape(len(share), -1) for share in shares], axis=1)
    assert steps.shape == reference.shape == (num_samples // 32, 32)
    assert all(set(got) == set(want) for got, want in zip(steps, reference))
    assert len(np.unique(steps)) == steps.size, "ranks read disjoint shares"
    assert len({share.size for share in shares}) == 1, "every rank reads as many samples"


def test_a_resumed_epoch_reads_exactly_the_rest_and_iterates_as_rank_indices():
    sampler = ResumableDistributedSampler(5000, 8, 2, 1, 4, seed=0)
    sampler.set_epoch(2)
    whole = sampler.rank_indices()
    sampler.set_epoch(2, start_batch=11)
    assert np.array_equal(sampler.rank_indices(), whole[11 * 8:])
    assert list(sampler) == [(2, int(index)) for index in whole[11 * 8:]]
    assert len(sampler) == len(whole) - 11 * 8


def test_starting_late_in_a_two_billion_sample_epoch_costs_one_chunk():
    """What a LAION-scale rank pays to start (or resume) an epoch: the positions of one chunk, not the epoch."""
    sampler = ResumableDistributedSampler(2_000_000_000, 256, 1, 511, 512, seed=0)
    sampler.set_epoch(4, start_batch=int(0.9 * sampler.batches_per_epoch))
    tracemalloc.start()
    try:
        first = next(sampler.index_chunks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB to start"
    assert len(first) > 0 and int(first.max()) < 2_000_000_000


def test_the_order_benchmark_prints_a_row_per_start_and_the_old_cost(capsys, monkeypatch):
    import runpy

    from conftest import REPO

    monkeypatch.setattr("sys.argv", ["order.py", "--samples", "100000", "--ranks", "4", "--micro-batch", "8",
                                     "--full-permutation-up-to", "100000"])
    runpy.run_path(str(REPO / "bench/order.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 100,000 |")]
    assert [row[2] for row in rows] == ["10%", "90%"]
    assert all(row[-1] == "0 |" for row in rows), "every rank's share has the same size"
    assert [row[-2] for row in rows] == ["22,504", "2,504"], "rank 3's 3,125 batches of 8 from batch 312 and 2812"
    assert "before (np.random.permutation in every rank), 100,000 samples" in out
