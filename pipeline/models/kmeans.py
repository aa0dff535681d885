"""k-means over a sample that may be float16, in bounded memory: the sample plus one float32 block.

faiss's ``Kmeans`` needs the whole training set as one float32 array (12.8M x 768 sampled to 1.28M rows is 3.9 GB,
twice the float16 sample); here Lloyd's iterations read the sample a block at a time, converting only the block,
and faiss does each block's nearest-centroid search. Initialisation and empty clusters follow faiss: ``k`` distinct
rows drawn from ``seed``; an empty cluster takes half of a large cluster (its centroid nudged apart from it).
"""

from __future__ import annotations

import numpy as np

BLOCK = 65_536


def _block(x: np.ndarray, s: int, spherical: bool) -> np.ndarray:
    """Rows ``s`` to ``s + BLOCK`` as float32 (spherical: unit norm, rows of norm 0 left out)."""
    b = np.ascontiguousarray(x[s: s + BLOCK], dtype=np.float32)
    if spherical:
        norm = np.linalg.norm(b, axis=1, keepdims=True)
        b /= np.where(norm > 0, norm, 1)
        if not norm.all():
            b = b[norm[:, 0] > 0]
    return b


def _sums(b: np.ndarray, assign: np.ndarray, sums: np.ndarray) -> None:
    """Add each cluster's rows of ``b`` to its row of ``sums``: rows sorted by cluster, each run summed (numpy's
    reduceat over rows is 3-4x slower)."""
    order = np.argsort(assign, kind="stable")
    rows, ids = b[order], assign[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    for i, j in zip(starts, np.r_[starts[1:], len(ids)]):
        sums[ids[i]] += rows[i:j].sum(axis=0)


def _index(centroids: np.ndarray, spherical: bool, gpu: bool):
    import faiss

    index = (faiss.IndexFlatIP if spherical else faiss.IndexFlatL2)(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> None:
    """Give each empty cluster half of a cluster drawn with probability proportional to its size (as faiss does):
    the two centroids are nudged apart by 1/1024 in alternate coordinates."""
    nudge = np.where(np.arange(centroids.shape[1]) % 2, 1, -1) / 1024
    for j in np.flatnonzero(counts == 0):
        big = rng.choice(len(counts), p=counts / counts.sum())
        centroids[j] = centroids[big] * (1 + nudge)
        centroids[big] = centroids[big] * (1 - nudge)
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]


def train(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, spherical: bool = False,
          gpu: bool = False) -> np.ndarray:
    """``k`` centroids (float32) of the rows of ``x`` (any float dtype; spherical: rows and centroids unit-norm,
    rows of norm 0 ignored) after ``niter`` Lloyd iterations."""
    n, d = x.shape
    if not 0 < k <= n:
        raise ValueError(f"k-means: {n} rows cannot make {k} clusters")
    rng = np.random.default_rng(seed)
    centroids = np.asarray(x[np.sort(rng.choice(n, k, replace=False))], dtype=np.float32)
    if spherical:
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    for _ in range(niter):
        index = _index(centroids, spherical, gpu)
        sums, counts = np.zeros((k, d), np.float64), np.zeros(k, np.int64)
        for s in range(0, n, BLOCK):
            b = _block(x, s, spherical)
            if not len(b):
                continue
            assign = index.search(b, 1)[1][:, 0]
            _sums(b, assign, sums)
            counts += np.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        _split_empty(centroids, counts, rng)
        if spherical:
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids
