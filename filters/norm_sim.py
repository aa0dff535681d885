"""NormSim: how close a pool image is to a target set, as the p-norm of its similarities to the target's images
(column ``norm_sim_<p>_<tag>_score``; Wang et al. 2024, "CLIPLoss and Norm-Based Data Selection Methods for
Multimodal Contrastive Learning", arXiv 2405.19547).

With L2-normalised image embeddings x_i of the pool and x_t of the target set T (the downstream tasks' training
images, e.g. ImageNet-1k train):

    NormSim_p(i) = (sum_{t in T} |<x_t, x_i>|^p)^(1/p),    NormSim_inf(i) = max_{t in T} |<x_t, x_i>|

the plain p-norm of the vector of similarities, not divided by |T| (as the authors' released code computes it;
a division would scale every score by the same constant and select the same rows). Higher is better: recipes keep
the top fraction. ``p`` is 2 or inf (the paper's best DataComp-medium result: inf, ImageNet-1k or the 24
downstream tasks' training sets as the target).

- p = 2, exactly and cheaply: NormSim_2(i)^2 = x_i^T M x_i with M = sum_t x_t x_t^T, the d x d second moment of
  the target, computed once by ``prepare`` (float64); scoring costs d^2 multiply-adds per row, whatever |T|.
- p = inf: the largest |inner product| over the target, |T| * d multiply-adds per row (ImageNet-1k's 1.28M
  training images at d = 768: about 1e9 per row, a GPU's work at pool scale; on the GPU when torch sees one).
  ``prepare`` writes the target as one float32 ``.npy`` that each part reads memory-mapped, a chunk of target
  rows at a time: memory is the part, one target chunk and one block of at most ``CELLS`` similarities.

The target is an ``.npy``/``.pt`` file of image embeddings or a folder of them and/or of ``.npz`` files with
``<tag>_img`` (``image_cluster.each_target``, read a block of rows at a time: ``prepare`` never holds the whole
target); rows without a value are dropped. Rows of the pool without an image embedding score NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError

from .base import EmbeddingFilter
from .image_cluster import each_target

CELLS = 2**24  # similarities held at once: 64 MB of float32


@functools.lru_cache(maxsize=4)
def _state(path: str, mmap: bool) -> np.ndarray:
    """The state ``prepare`` saved (a local copy when it lives in an object store), memory-mapped if ``mmap``."""
    local = fsio.local_copy(path).removeprefix("file://")
    return np.load(local, mmap_mode="r" if mmap else None, allow_pickle=False)


def norm_sim_2(x: np.ndarray, second_moment: np.ndarray) -> np.ndarray:
    """sqrt(x_i^T M x_i) for each row of ``x`` (float64)."""
    x = x.astype(np.float64)
    return np.sqrt(np.maximum(np.einsum("ij,ij->i", x @ second_moment, x), 0))


def norm_sim_inf(x: np.ndarray, target: np.ndarray, device: str = "cpu", cells: int = CELLS) -> np.ndarray:
    """max_t |<x_t, x_i>| for each row of ``x``, over ``target`` (an array or a memory map) read a chunk of
    rows at a time (blocks of at most ``cells`` similarities)."""
    import torch

    with torch.no_grad():
        xs = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        best = torch.zeros(len(x), dtype=torch.float32, device=device)
        step = max(1, cells // max(1, len(x)))
        for s in range(0, len(target), step):
            chunk = torch.from_numpy(np.array(target[s: s + step], np.float32)).to(device)
            best = torch.maximum(best, (xs @ chunk.T).abs().amax(dim=1))
        return best.cpu().numpy().astype(np.float64)


@dataclass
class NormSimFilter(EmbeddingFilter):
    key = "norm_sim"
    tag: str = "l14"
    target: str = ""
    p: float = math.inf  # 2 or inf
    state_path: str = ""  # set by prepare: the target (p = inf) or its second moment (p = 2)
    dims: int = 0  # set by prepare: the target's embedding size

    def __post_init__(self):
        if self.p not in (2, math.inf):
            raise UserError(f"norm_sim: p is 2 or inf, not {self.p!r}")

    @property
    def column(self) -> str:
        return f"{self.key}_{'inf' if math.isinf(self.p) else 2}_{self.tag}_score"

    def arrays(self):
        return ("img",)

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k not in ("state_path", "dims")}

    def prepare(self, context: Any) -> None:
        if not self.target:
            raise UserError("norm_sim: no target; give the target set's image embeddings as its target parameter "
                            "(in the shipped recipes: --var target=PATH)")

        def blocks():
            try:
                yield from each_target(self.target, self.tag)
            except UserError as exc:
                raise UserError(str(exc).replace("image_cluster.target", "norm_sim.target")) from None

        rows = 0
        if math.isinf(self.p):
            self.state_path, (rows, self.dims) = context.save_blocks("target.npy", blocks)
        else:
            moment = None
            for block in blocks():
                x = block.astype(np.float64)
                moment = x.T @ x if moment is None else moment + x.T @ x
                rows += len(block)
            if rows:
                self.state_path, self.dims = context.save("second_moment.npy", moment), int(moment.shape[0])
        if not rows:
            raise UserError(f"norm_sim.target {self.target!r} holds no finite embedding")
        context.log(f"norm_sim: {rows:,} target images of {self.dims} dimensions; p = {self.p:g}")

    def score(self, part, embeddings):
        img = self.array(embeddings, "img", len(part))
        if not self.state_path:
            raise ValueError("norm_sim: prepare() has not run")
        if img.shape[1] != self.dims:
            raise UserError(f"norm_sim: the target embeddings have {self.dims} dimensions, the pool's '{self.tag}' "
                            f"embeddings {img.shape[1]}; embed both with the same model")
        valid = np.isfinite(img).all(axis=1)
        out = np.full(len(part), np.nan)
        if valid.any():
            if math.isinf(self.p):
                from winnow.pipeline.models.registry import default_device

                out[valid] = norm_sim_inf(img[valid], _state(self.state_path, True), default_device())
            else:
                out[valid] = norm_sim_2(img[valid], _state(self.state_path, False))
        return pd.Series(out, index=part.index)
