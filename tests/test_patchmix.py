"""Patch Mixing operations: exact fractions of foreign patches at the recorded positions, shuffles, drops."""

import numpy as np
import pytest

from pipeline.patchmix import area_under_curve, drop_patches, mix_patches, patch_count, shuffle_tiles


def cells_equal_to(img, ref, grid):
    patch = img.shape[0] // grid
    return {y * grid + x for y in range(grid) for x in range(grid)
            if np.array_equal(img[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch],
                              ref[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch])}


@pytest.mark.parametrize("grid,side", [(7, 224), (14, 224), (7, 64), (14, 70)])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
def test_mix_puts_the_exact_fraction_of_foreign_patches_at_the_recorded_positions(grid, side, fraction):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
    other = rng.integers(128, 256, (side, side, 3), dtype=np.uint8)  # no pixel value in common with img
    out, cells = mix_patches(img, other, grid, fraction, np.random.default_rng(1))
    assert len(cells) == patch_count(fraction, grid) == round(fraction * grid * grid)
    assert cells_equal_to(out, other, grid) == set(cells.tolist())
    assert cells_equal_to(out, img, grid) == set(range(grid * grid)) - set(cells.tolist())
    edge = (side // grid) * grid
    assert np.array_equal(out[edge:], img[edge:]) and np.array_equal(out[:, edge:], img[:, edge:])
    again, cells2 = mix_patches(img, other, grid, fraction, np.random.default_rng(1))
    assert np.array_equal(again, out) and np.array_equal(cells, cells2)  # deterministic from the seed


@pytest.mark.parametrize("n", [4, 16, 64, 196])
def test_tile_shuffle_is_a_permutation_of_the_tiles(n):
    side = 224
    img = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out, perm = shuffle_tiles(img, n, np.random.default_rng(2))
    grid, patch = int(np.sqrt(n)), side // int(np.sqrt(n))
    assert sorted(perm.tolist()) == list(range(n))
    for i, j in enumerate(perm):
        y, x = divmod(i, grid)
        sy, sx = divmod(int(j), grid)
        assert np.array_equal(out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch],
                              img[sy * patch:(sy + 1) * patch, sx * patch:(sx + 1) * patch])
    with pytest.raises(ValueError, match="square number"):
        shuffle_tiles(img, 10, np.random.default_rng(0))


def test_drop_fills_the_exact_cells_with_the_mean_colour():
    img = np.zeros((56, 56, 3), np.uint8)
    img[:, 28:] = 200
    out, cells = drop_patches(img, 7, 0.2, np.random.default_rng(3))
    assert len(cells) == 10
    patch = 8
    for c in cells:
        y, x = divmod(int(c), 7)
        assert (out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] == 100).all()


def test_area_under_curve_is_normalised():
    assert area_under_curve([0, 0.5], [0.8, 0.8]) == pytest.approx(0.8)
    assert area_under_curve([0, 0.25, 0.5], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        patch_count(1.5, 7)
