import pickle
from collections import deque

import numpy as np
import pytest

from smim_dist.data.masking import (
    BlockMaskGenerator,
    RandomMaskGenerator,
    build_mask_generator,
)
from smim_dist.data.seeded import sample_key

GRIDS = [(14, 14), (7, 7), (12, 20)]
RATIOS = [0.4, 0.6, 0.75]
KINDS = ["random", "block"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_count_dtype_shape(kind, grid, ratio):
    gen = build_mask_generator(kind, grid, ratio)
    n = grid[0] * grid[1]
    for seed in range(200):
        mask = gen(sample_key(0, 0, seed))
        assert mask.dtype == np.bool_
        assert mask.shape == (n,)
        assert int(mask.sum()) == gen.num_masked


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_reproducibility(kind):
    gen = build_mask_generator(kind, (14, 14), 0.4)
    a = gen(sample_key(123, 0, 0))
    b = gen(sample_key(123, 0, 0))
    np.testing.assert_array_equal(a, b)
    masks = {gen(sample_key(0, 0, s)).tobytes() for s in range(100)}
    assert len(masks) == 100


@pytest.mark.parametrize("kind", KINDS)
def test_mask_for_is_stable_and_keyed(kind):
    gen = build_mask_generator(kind, (14, 14), 0.6)
    ref = gen.mask_for(7, 3, 11)
    np.testing.assert_array_equal(ref, gen.mask_for(7, 3, 11))
    np.testing.assert_array_equal(ref, gen(sample_key(7, 3, 11)))
    # A copy in another worker process gives the same mask.
    np.testing.assert_array_equal(ref, pickle.loads(pickle.dumps(gen)).mask_for(7, 3, 11))
    others = [gen.mask_for(8, 3, 11), gen.mask_for(7, 4, 11), gen.mask_for(7, 3, 12)]
    assert all(not np.array_equal(ref, o) for o in others)


def test_random_masks_are_uniform():
    gen = RandomMaskGenerator((14, 14), 78)
    freq = np.mean([gen(sample_key(0, 0, i)) for i in range(2000)], axis=0)
    # Per-patch std is ~0.011; 0.05 is > 4 std.
    assert np.abs(freq - 78 / 196).max() < 0.05


def _masked_neighbours_per_masked_patch(mask2d):
    m = mask2d.astype(int)
    nb = np.zeros_like(m)
    nb[1:] += m[:-1]
    nb[:-1] += m[1:]
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    return nb[mask2d].mean()


def _largest_component(mask2d):
    rows, cols = mask2d.shape
    seen = np.zeros_like(mask2d)
    best = 0
    for start in zip(*np.nonzero(mask2d)):
        if seen[start]:
            continue
        seen[start] = True
        queue, size = deque([start]), 0
        while queue:
            r, c = queue.popleft()
            size += 1
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < rows and 0 <= nc < cols and mask2d[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        best = max(best, size)
    return best


def test_block_masks_are_spatially_clustered():
    block = BlockMaskGenerator((14, 14), 75)
    rand = RandomMaskGenerator((14, 14), 75)
    keys = [sample_key(0, 0, i) for i in range(300)]
    block_nb = np.mean([_masked_neighbours_per_masked_patch(block(k).reshape(14, 14)) for k in keys])
    rand_nb = np.mean([_masked_neighbours_per_masked_patch(rand(k).reshape(14, 14)) for k in keys])
    # Random: ~4 * 74/195 = 1.5; blocks are mostly interior patches.
    assert rand_nb < 1.7
    assert block_nb > rand_nb + 1.0


def test_block_masks_have_large_components():
    gen = BlockMaskGenerator((14, 14), 75)
    largest = [_largest_component(gen(sample_key(1, 0, i)).reshape(14, 14)) for i in range(300)]
    assert np.mean(np.array(largest) >= 16) > 0.95


def test_block_phase_rarely_falls_short():
    gen = BlockMaskGenerator((14, 14), 75)
    shortfalls = []
    for seed in range(300):
        mask2d, short = gen.place_blocks(sample_key(seed, 0, 0))
        assert int(mask2d.sum()) + short == 75
        shortfalls.append(short)
    assert np.mean(shortfalls) < 2


@pytest.mark.parametrize("ratio, words", [(0.0, "none"), (1.0, "all 196"), (0.999, "all 196"), (1.5, "[0, 1]")])
def test_bad_ratio(ratio, words):
    with pytest.raises(ValueError, match=rf"mask_ratio={ratio!r}.*{words}") as err:
        build_mask_generator("block", (14, 14), ratio)
    assert "use a ratio in" in str(err.value)


@pytest.mark.parametrize("cls", [RandomMaskGenerator, BlockMaskGenerator])
@pytest.mark.parametrize("num_masked", [0, 196, -1, 2.5])
def test_bad_num_masked(cls, num_masked):
    with pytest.raises(ValueError, match=rf"num_masked={num_masked!r}.*\[1, 195\]"):
        cls((14, 14), num_masked)


@pytest.mark.parametrize("grid", [(14, 0), (14,), (14.0, 14), "14x14", (-2, 3)])
def test_bad_grid(grid):
    with pytest.raises(ValueError, match="grid="):
        RandomMaskGenerator(grid, 10)


def test_bad_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"'blockwise'.*\['block', 'random'\]"):
        build_mask_generator("blockwise", (14, 14), 0.4)


def test_min_block_larger_than_num_masked():
    with pytest.raises(ValueError, match=r"min_block_patches=16.*num_masked=10"):
        BlockMaskGenerator((14, 14), 10)
    with pytest.raises(ValueError, match=r"min_block_patches=0"):
        BlockMaskGenerator((14, 14), 75, min_block_patches=0)
    with pytest.raises(ValueError, match=r"max_block_patches=8"):
        BlockMaskGenerator((14, 14), 75, max_block_patches=8)


@pytest.mark.parametrize("kwargs", [{"min_aspect": 0.0}, {"min_aspect": -1.0}, {"min_aspect": 2.0, "max_aspect": 1.0},
                                    {"min_aspect": 3.0}])
def test_bad_aspect(kwargs):
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMaskGenerator((14, 14), 75, **kwargs)


@pytest.mark.parametrize("grid, ratio, count", [((14, 14), 0.4, 79), ((14, 14), 0.6, 118), ((14, 14), 0.75, 147),
                                                ((7, 7), 0.4, 20), ((2, 5), 0.3, 3), ((8, 8), 0.6, 39)])
def test_the_masked_count_rounds_up_as_the_authors_count(grid, ratio, count):
    """ceil(ratio x patches) (79 of 196 at 40%, where rounding gives 78); 0.3 x 10 stays 3 despite floating point."""
    assert build_mask_generator("random", grid, ratio).num_masked == count


def test_build_forwards_options_and_repr():
    gen = build_mask_generator("block", (14, 14), 0.4, min_block_patches=8)
    assert isinstance(gen, BlockMaskGenerator)
    assert (gen.num_masked, gen.min_block_patches, gen.max_aspect) == (79, 8, pytest.approx(1 / 0.3))
    assert "num_masked=79 of 196" in repr(gen)
    assert repr(build_mask_generator("random", (14, 14), 0.75)) == (
        "RandomMaskGenerator(grid=(14, 14), num_masked=147 of 196)"
    )
