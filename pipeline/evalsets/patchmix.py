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
- :func:`occlude`: SMD-like occlusion: an irregular blob cut from another image pasted over the image, sized by
  bisection to a target share of the image (the real share is returned; the paper's SMD cut occluders from
  segmented objects, which a generic labeled source does not provide, so the blob stands in for the object mask).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError


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


def blob_mask(side: int, level: float, rng: np.random.Generator, max_tries: int = 40) -> np.ndarray:
    """A boolean occluder mask (an irregular blob: a union of rotated ellipses around one centre) covering close
    to ``level`` of a ``side`` x ``side`` image; its real coverage is ``mask.mean()``."""
    from PIL import Image, ImageDraw

    if not 0 <= level < 1:
        raise ValueError(f"occlusion level {level} is outside [0, 1)")
    if level == 0:
        return np.zeros((side, side), bool)
    cx, cy = rng.uniform(0.3, 0.7, 2) * side
    parts = [(rng.uniform(-0.15, 0.15, 2), rng.uniform(0.5, 1.0, 2), rng.uniform(0, 180)) for _ in range(4)]

    def draw(scale: float) -> np.ndarray:
        img = Image.new("L", (side, side), 0)
        d = ImageDraw.Draw(img)
        for (ox, oy), (ax, ay), rot in parts:
            t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            x, y = ax * scale * side * np.cos(t), ay * scale * side * np.sin(t)
            c, s_ = np.cos(np.radians(rot)), np.sin(np.radians(rot))
            pts = [(cx + ox * side * scale + xi * c - yi * s_, cy + oy * side * scale + xi * s_ + yi * c)
                   for xi, yi in zip(x, y)]
            d.polygon(pts, fill=255)
        return np.asarray(img) > 127

    lo, hi = 0.0, 1.5
    mask = draw(hi)
    for _ in range(max_tries):  # bisection on the blob's scale
        mid = (lo + hi) / 2
        mask = draw(mid)
        if abs(mask.mean() - level) < 0.005:
            break
        lo, hi = (mid, hi) if mask.mean() < level else (lo, mid)
    return mask


def occlude(img: np.ndarray, other: np.ndarray, level: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """SMD-like occlusion: a blob cut from ``other`` pasted over ``img`` at the same place; (image, real level)."""
    _check(img, 1)
    mask = blob_mask(img.shape[0], level, rng)
    out = img.copy()
    out[mask] = other[mask]
    return out, float(mask.mean())


# ------------------------------------------------------------------------------------------------ the eval set
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
GRIDS = (7, 14)
TILES = (1, 4, 16, 64, 196)
OCCLUSION = (0.0, 0.2, 0.4, 0.6)


@dataclass
class PatchmixConfig:
    """Which Patch Mixing eval sets are built: images of ``size`` px (centre square), the first ``per_class``
    images of each class (0: all), partners and patch positions fixed by ``seed``."""

    size: int = 224
    per_class: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 16:
            raise UserError(f"patchmix.size {self.size} is too small; use 16 px or more (224 for ImageNet-scale "
                            "models)")


def build_patchmix(source: str, out: str, cfg: PatchmixConfig | None = None, overwrite: bool = False,
                   log=print) -> list[dict]:
    """Write the Patch Mixing conditions of a labeled source and their task list.

    The source is an eval set folder (clip_benchmark layout) or a folder of class folders; ``per_class`` > 0
    keeps the first that many images of each class.

    One eval set folder per condition under ``out`` (``mix-g7-r0.3``, ``mix-g14-r0.1``, ``shuffle-16``,
    ``drop-g14-r0.2``...), each with the source's class names and templates; ``out/manifest.parquet`` records per
    image the condition, key, label, the partner image (another class, fixed per image by the seed) and the changed
    cells; ``out/tasks.yaml`` lists one zero-shot task per condition, grouped into curves (``winnow evaluate``
    reports each curve's normalised area). A stage: the same source and config is reused. Returns the task
    entries.
    """

    from winnow.pipeline.data.evalsets import labeled_files
    from winnow.pipeline.run.stage import Stage

    cfg = cfg or PatchmixConfig()
    stage = Stage("patchmix", out, asdict(cfg), inputs=labeled_files(source), overwrite=overwrite, protect=[source],
                  log=log)
    if not stage.done:
        tasks = _build(source, out, cfg.seed, cfg.size, cfg.per_class, log)
        stage.finish(rows={"conditions": len(tasks)})
    import yaml

    return yaml.safe_load(fsio.read_bytes(os.path.join(out, "tasks.yaml")))["tasks"]


def _build(source: str, out: str, seed: int, size: int, per_class: int, log) -> list[dict]:

    import pandas as pd
    import yaml
    from PIL import Image

    from winnow.pipeline.data import shards
    from winnow.pipeline.data.evalsets import per_class as first_per_class
    from winnow.pipeline.data.evalsets import read_labeled, write_evalset_meta
    from winnow.pipeline.data.images import encode_jpeg, square_image

    data = read_labeled(source)
    chosen = first_per_class(data["labels"], per_class)
    labels = data["labels"][chosen]
    images = [square_image(data["images"][i], size) for i in chosen]
    partners = []
    for i, lab in enumerate(labels):
        others = np.flatnonzero(labels != lab)
        partners.append(int(np.random.default_rng([seed, i]).choice(others)))
    conditions = [("mix", g, r) for g in GRIDS for r in RATIOS] + [("shuffle", n, 0.0) for n in TILES] + \
        [("drop", g, r) for g in GRIDS for r in RATIOS] + [("occlude", 0, r) for r in OCCLUSION]
    rows, tasks = [], []
    for c, (kind, param, r) in enumerate(conditions):
        name = {"shuffle": f"shuffle-{param}", "occlude": f"occlude-{r:.1f}"}.get(kind, f"{kind}-g{param}-r{r:.1f}")
        folder = os.path.join(out, name)
        path = os.path.join(folder, "test", "0.tar")
        with shards.TarWriter(path) as tar:
            for i, img in enumerate(images):
                rng = np.random.default_rng([seed, c, i])
                if kind == "mix":
                    new, cells = mix_patches(img, images[partners[i]], param, r, rng)
                elif kind == "shuffle":
                    new, cells = shuffle_tiles(img, param, rng)
                elif kind == "drop":
                    new, cells = drop_patches(img, param, r, rng)
                else:
                    new, real = occlude(img, images[partners[i]], r, rng)
                    cells = np.array([], int)
                key = f"{i:06d}"
                tar.sample(key, {"jpg": encode_jpeg(Image.fromarray(new), 95), "cls": str(int(labels[i])).encode()})
                rows.append({"condition": name, "key": key, "label": int(labels[i]),
                             "partner": f"{partners[i]:06d}" if kind in ("mix", "occlude") else "",
                             "cells": " ".join(str(int(c)) for c in cells),
                             "occluded": real if kind == "occlude" else float("nan")})
        fsio.write_bytes(os.path.join(folder, "test", "nshards.txt"), b"1\n")
        write_evalset_meta(folder, data["classnames"], data["templates"])
        curve = f"{kind}-g{param}" if kind in ("mix", "drop") else kind
        x = float(r) if kind != "shuffle" else float(TILES.index(param))  # tiles: evenly spaced steps
        tasks.append({"name": f"patchmix-{name}", "kind": "zeroshot_classification", "data": folder,
                      "main_metric": "acc1", "random_score": round(1 / len(set(labels.tolist())), 4),
                      "curve": curve, "x": x})
        log(f"patchmix: {name}: {len(images)} images")
    shards.write_table(os.path.join(out, "manifest.parquet"), pd.DataFrame(rows))
    fsio.write_bytes(os.path.join(out, "tasks.yaml"), yaml.safe_dump({"tasks": tasks}, sort_keys=False).encode())
    return tasks


