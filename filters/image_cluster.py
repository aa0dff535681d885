"""1.0 when a sample's image falls in a cluster that the target set occupies (DataComp's image-based baseline).

``prepare`` runs faiss k-means (L2, ``niter`` 20, seed 0, no further subsampling, as DataComp) over the pool's
stored image embeddings, at most ``sample_rows`` of them (a seeded random sample above that, read part by part:
the k-means' memory is bounded whatever the pool's size, 1.28M x 768-d float32 is 3.9 GB; DataComp clustered all
12.8M rows of small, 39 GB, on a GPU), then assigns every target embedding to its nearest centroid by inner product; the clusters hit
form the kept set. Scoring assigns each sample the same way. DataComp used 100,000 centroids for 12.8M samples
(128 samples per cluster) and ImageNet-1k train images as the target; ``n_clusters: 0`` keeps that ratio for
any pool size, and ``target`` is a folder of ``.npz`` embeddings (e.g. the clean set's) or an ``.npy`` array.
Rows without an image embedding score NaN.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import fsio
from pipeline.core.errors import UserError

from .base import Filter, embedding

SAMPLES_PER_CLUSTER = 128  # DataComp small: 12.8M samples / 100,000 centroids


@functools.lru_cache(maxsize=4)
def _centroids(path: str) -> np.ndarray:
    return fsio.load_npy(path, f"image_cluster centroids {path}")


def nearest(x: np.ndarray, centroids: np.ndarray, cells: int = 2**25) -> np.ndarray:
    """Index of the centroid with the largest inner product, for each row of ``x`` (in batches of at most
    ``cells`` similarities: 128 MB, whatever the number of centroids)."""
    batch = max(1, cells // max(1, len(centroids)))
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), batch):
        out[s: s + batch] = np.argmax(x[s: s + batch] @ centroids.T, axis=1)
    return out


def load_target(path: str, tag: str) -> np.ndarray:
    from pipeline.data.parts import load_npz

    if path.endswith(".npy") and os.path.isfile(path):
        return fsio.load_npy(path, f"image_cluster.target {path}").astype(np.float32)
    if not os.path.isdir(path):
        raise UserError(f"image_cluster.target {path!r}: give a folder of .npz embeddings or an .npy array")
    arrays = [load_npz(os.path.join(path, n), tag)["img"] for n in sorted(os.listdir(path)) if n.endswith(".npz")]
    if not arrays:
        raise UserError(f"image_cluster.target {path!r} holds no .npz files with '{tag}_img'")
    target = np.concatenate(arrays)
    return target[np.isfinite(target).all(axis=1)]


@dataclass
class ImageClusterFilter(Filter):
    key = "image_cluster"
    tag: str = "l14"
    target: str = ""
    n_clusters: int = 0
    niter: int = 20
    seed: int = 0
    sample_rows: int = 1_280_000
    centroids_path: str = ""  # set by prepare
    kept_clusters: tuple = ()  # set by prepare

    @property
    def column(self) -> str:
        return f"{self.key}_{self.tag}_score"

    def tags(self):
        return (self.tag,)

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k not in ("centroids_path", "kept_clusters")}

    def prepare(self, context: Any) -> None:
        import faiss

        x = context.sample(self.tag, "img", self.sample_rows, self.seed)
        k = self.n_clusters or max(2, min(100_000, round(len(x) / SAMPLES_PER_CLUSTER)))
        if len(x) < k:
            raise UserError(f"image_cluster: {len(x)} embeddings cannot make {k} clusters; lower n_clusters")
        kmeans = faiss.Kmeans(x.shape[1], k, niter=self.niter, seed=self.seed, max_points_per_centroid=10_000_000)
        kmeans.train(x)
        self.centroids_path = context.save("centroids.npy", kmeans.centroids.astype(np.float32))
        target = load_target(self.target, self.tag)
        self.kept_clusters = tuple(sorted(int(c) for c in np.unique(nearest(target, kmeans.centroids))))
        context.log(f"image_cluster: {k} clusters over {len(x):,} pool images; the {len(target):,} target images "
                    f"occupy {len(self.kept_clusters)}")

    def score(self, part, embeddings):
        img = embedding(embeddings, self.tag, "img", len(part))
        if not self.centroids_path:
            raise ValueError("image_cluster: prepare() has not run")
        valid = np.isfinite(img).all(axis=1)
        out = np.full(len(part), np.nan)
        if valid.any():
            assigned = nearest(img[valid], _centroids(self.centroids_path))
            out[valid] = np.isin(assigned, np.array(self.kept_clusters, dtype=np.int64)).astype(float)
        return pd.Series(out, index=part.index)
