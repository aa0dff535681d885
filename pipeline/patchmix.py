"""Patch Mixing image operations (Lee et al. 2023): foreign patches, tile shuffling, patch drop.

All operations work on square images split into a ``grid`` x ``grid`` lattice (7 x 7 and 14 x 14 at 224 px in
the paper: 32 and 16 px patches; the same grids at any size, the patch side being ``side // grid``; pixels
beyond ``grid * patch`` on the right and bottom edge are left as they are). Every function is deterministic given
its ``numpy.random.Generator`` and returns the exact patch positions it changed, which the eval-set manifest
records per image.

- :func:`mix_patches`: ``round(r * grid**2)`` patches, drawn uniformly without replacement, are replaced by the
  patches at the same positions of an image of another class.
- :func:`shuffle_tiles`: the image cut into ``n`` tiles (n a square: 4, 16, 64, 196) that are permuted.
- :func:`drop_patches`: ``round(f * grid**2)`` patches set to the image's mean colour.
"""

from __future__ import annotations

import numpy as np


def _check(img: np.ndarray, grid: int) -> int:
    if img.ndim != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square H x W x C image, got shape {img.shape}")
    patch = img.shape[0] // grid
    if patch < 1:
        raise ValueError(f"a {grid} x {grid} grid needs at least {grid} px, got {img.shape[0]}")
    return patch


def patch_count(fraction: float, grid: int) -> int:
    """How many of the grid's patches a fraction means (round half to even, as numpy)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction {fraction} is outside [0, 1]")
    return int(np.round(fraction * grid * grid))


def _paste(dst: np.ndarray, src: np.ndarray, cells: np.ndarray, grid: int, patch: int) -> None:
    for c in cells:
        y, x = divmod(int(c), grid)
        dst[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = src[y * patch:(y + 1) * patch,
                                                                        x * patch:(x + 1) * patch]


def mix_patches(img: np.ndarray, other: np.ndarray, grid: int, fraction: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with a fraction of its patches replaced by ``other``'s at the same positions; (image, cells)."""
    patch = _check(img, grid)
    if other.shape != img.shape:
        raise ValueError(f"the foreign image must have the same shape {img.shape}, got {other.shape}")
    cells = np.sort(rng.choice(grid * grid, patch_count(fraction, grid), replace=False))
    out = img.copy()
    _paste(out, other, cells, grid, patch)
    return out, cells


def shuffle_tiles(img: np.ndarray, n_tiles: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image's ``n_tiles`` tiles permuted; returns (image, permutation: tile i shows source tile perm[i])."""
    grid = int(round(np.sqrt(n_tiles)))
    if grid * grid != n_tiles:
        raise ValueError(f"n_tiles must be a square number (4, 16, 64, 196), got {n_tiles}")
    patch = _check(img, grid)
    perm = rng.permutation(n_tiles)
    out = img.copy()
    for i, j in enumerate(perm):
        y, x = divmod(i, grid)
        sy, sx = divmod(int(j), grid)
        out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = img[sy * patch:(sy + 1) * patch,
                                                                        sx * patch:(sx + 1) * patch]
    return out, perm


def drop_patches(img: np.ndarray, grid: int, fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fraction of the patches set to the image's mean colour; (image, cells)."""
    patch = _check(img, grid)
    cells = np.sort(rng.choice(grid * grid, patch_count(fraction, grid), replace=False))
    fill = np.broadcast_to(img.reshape(-1, img.shape[2]).mean(axis=0).round().astype(img.dtype), img.shape)
    out = img.copy()
    _paste(out, np.ascontiguousarray(fill), cells, grid, patch)
    return out, cells


def area_under_curve(xs: list[float], ys: list[float]) -> float:
    """Trapezoidal area under an accuracy curve, normalised by the x range (so a flat curve at a gives a)."""
    xs_a, ys_a = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(xs_a)
    xs_a, ys_a = xs_a[order], ys_a[order]
    if len(xs_a) < 2 or xs_a[-1] == xs_a[0]:
        return float(ys_a.mean()) if len(ys_a) else float("nan")
    widths = np.diff(xs_a)
    return float(((ys_a[1:] + ys_a[:-1]) / 2 * widths).sum() / (xs_a[-1] - xs_a[0]))
