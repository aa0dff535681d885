"""Density-based pruning (DBP; Abbas et al., ICLR 2024, "Effective pruning of web-scale datasets based on complexity
of concept clusters", arXiv 2401.04578): column ``density_prune_<tag>_score``, 1.0 for a row kept, 0.0 for a row
pruned, NaN for a row without an image embedding; a recipe keeps ``score >= 1``.

The method, as the paper and its released code (github.com/amro-kamal/effective_pruning) define it, with the cosine
distance d(a, b) = 1 - <a, b> of unit vectors:

1. spherical k-means on the image embeddings (``n_clusters``: 100, the paper's DataComp Medium setting; it used 500
   on LAION-DeDup-280M);
2. per cluster j with centroid mu_j:
   d_intra_j = the mean of d(x, mu_j) over the cluster's members (every row of the pool, not only the sample);
   d_inter_j = the mean of d(mu_j, mu_l) over the ``neighbors`` (20) centroids nearest mu_j;
   C_j = d_inter_j * d_intra_j (a cluster with no member gets the mean C of the others, as the released code does);
3. N = int(fraction x rows with an image embedding), P = softmax(C / temperature), and the budgets N_j solve the
   paper's quadratic program: minimise sum_j (N_j - P_j N)^2 subject to sum_j N_j = N and 1 <= N_j <= |cluster j|.
   Its solution is N_j = clip(P_j N - lambda, 1, |cluster j|) for the one lambda that makes the sum N, so what a
   cluster cannot hold is spread over the others in equal amounts (lambda found by bisection: no QP solver);
4. within each cluster the N_j least prototypical members are kept: the farthest from the centroid (SSP-Pruning's
   "keep hard", the released code's setting).

Where the paper is silent or Winnow differs:

- Embedding: the pool's stored image embeddings of ``tag`` (OpenAI CLIP ViT-L/14 in DataComp's metadata); the
  paper's best was a distilled DINOv2-L/14. ``centroids: PATH`` (``.npy``/``.pt``) uses given centroids instead of
  k-means (e.g. SemDeDup's).
- k-means: spherical, ``niter`` 100, on a seeded float16 sample of at most ``sample_rows`` embeddings
  (``PoolContext.sample``; ``pipeline/models/kmeans.py`` reads it a block at a time, faiss finds each block's
  nearest centroids); every row is then assigned to its nearest centroid.
- temperature: 0.5, the released ``prune.py``'s default. The lower bound 1 is the released QP's (without its
  class-balance option); it is 0 when N is smaller than the number of non-empty clusters.
- Rounding: the released code rounds the QP's solution (np.rint), so the budgets may miss N; here each budget is
  floored and the units left go to the largest remainders (ties: lower cluster index), so they sum to N exactly.
- Ties: members at the same distance are kept in uid order (smaller first), so every cluster keeps exactly N_j.
  uids are assumed unique.
- Similarities are computed in float64 and rounded to multiples of 2^-20 before the argmax and the distance, so
  the driver (which counts the budgets' boundaries) and the workers (which score) agree on every row whatever
  their BLAS's summation order.
- The paper deduplicates (SemDeDup) before DBP. ``within: PATH`` (a subset's ``uids.npy``, e.g. made by a recipe
  with ``exclude_duplicates: {kinds: [semantic]}``, or a CLIP-score subset) restricts DBP to those rows: only they
  are sampled for k-means, counted in the clusters and budgets (N = fraction x those with an embedding), and kept;
  the others score NaN. Without it the budgets are over the whole pool, and a later ``exclude_duplicates`` rule
  removes rows after the budgets were drawn.

``prepare`` (on the driver) reads the pool part by part (``PoolContext.each_part``: one part's embeddings at a
time): pass 1 assigns every row, sums each cluster's distances, counts them in a coarse histogram of distances (at
most 4M counts) and saves each part's (cluster, distance) as int32; from the budgets and the histogram each
cluster's boundary bin is known, and pass 2 reads only the saved arrays (and the uids of parts with rows in a
partly kept bin) to find each cluster's exact cut. ``clusters.npy`` (one row per cluster: size, d_intra, d_inter,
complexity, budget and the cut) is what the workers read; each scores its part with k * d multiply-adds per row
(on the CPU: at k = 100 a GPU would spend longer on the transfer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.models import kmeans

from .base import EmbeddingFilter
from .image_cluster import load_matrix

SCALE = 1 << 20  # similarities and distances in units of 2^-20
CELLS = 2**22  # float64 values held at once by a batch (32 MB)
HIST_CELLS = 2**22  # coarse histogram counts over all clusters
FAR = np.int64(1) << 40  # a cut above every distance: keep nothing
CLUSTERS = np.dtype([("size", "i8"), ("d_intra", "f8"), ("d_inter", "f8"), ("complexity", "f8"), ("budget", "i8"),
                     ("cut", "i8"), ("cut_hi", "u8"), ("cut_lo", "u8")])


def assign(x: np.ndarray, centroids: np.ndarray, cells: int = CELLS) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, distance) of each row of ``x`` against unit ``centroids`` (float64): rows are normalised, the
    similarities rounded to multiples of 2^-20, the cluster is the first with the largest one and the distance is
    1 - that similarity in units of 2^-20 (int64, 0..2^21). Rows that are not finite or are zero: cluster -1."""
    cluster = np.full(len(x), -1, np.int64)
    dist = np.zeros(len(x), np.int64)
    batch = max(1, cells // (len(centroids) + (x.shape[1] if x.ndim == 2 else 0)))
    for s in range(0, len(x), batch):
        v = np.asarray(x[s: s + batch], np.float64)
        norm = np.sqrt((v * v).sum(axis=1))
        ok = np.isfinite(v).all(axis=1) & (norm > 0)
        if not ok.any():
            continue
        sims = np.rint((v[ok] / norm[ok, None]) @ centroids.T * SCALE).astype(np.int64)
        best = sims.argmax(axis=1)
        rows = np.flatnonzero(ok) + s
        cluster[rows] = best
        dist[rows] = SCALE - sims[np.arange(len(best)), best]
    return cluster, dist


def inter_distances(centroids: np.ndarray, neighbors: int) -> np.ndarray:
    """d_inter: each centroid's mean cosine distance to its ``neighbors`` nearest other centroids."""
    k = len(centroids)
    m = max(1, min(neighbors, k - 1))
    out = np.empty(k)
    batch = max(1, CELLS // k)
    for s in range(0, k, batch):
        sims = centroids[s: s + batch] @ centroids.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # not itself
        nearest = -np.partition(-sims, m - 1, axis=1)[:, :m]
        out[s: s + batch] = (1 - nearest).mean(axis=1)
    return out


def budgets(complexity: np.ndarray, sizes: np.ndarray, total: int, temperature: float) -> np.ndarray:
    """N_j: the integer solution of min sum_j (N_j - P_j total)^2, sum_j N_j = total, 1 <= N_j <= sizes_j (lower
    bound 0 when total is below the number of non-empty clusters), P = softmax(complexity / temperature). A
    non-finite complexity (an empty cluster) counts as the mean of the others."""
    sizes = np.asarray(sizes, np.int64)
    if not 0 <= total <= sizes.sum():
        raise ValueError(f"cannot keep {total} of {sizes.sum()} rows")
    c = np.asarray(complexity, np.float64).copy()
    finite = np.isfinite(c)
    c[~finite] = c[finite].mean() if finite.any() else 0.0
    z = c / temperature
    p = np.exp(z - z.max())
    target = p / p.sum() * total
    lower = np.minimum(sizes, 1) if total >= (sizes > 0).sum() else np.zeros_like(sizes)
    lo, hi = float((target - sizes).min()) - 1, float((target - lower).max()) + 1  # sums: all sizes, all lower
    for _ in range(200):  # bisection on lambda: sum(clip(target - lambda, lower, sizes)) is non-increasing
        mid = (lo + hi) / 2
        if np.clip(target - mid, lower, sizes).sum() > total:
            lo = mid
        else:
            hi = mid
    x = np.clip(target - hi, lower, sizes)
    out = np.minimum(np.floor(x).astype(np.int64), sizes)
    order = np.lexsort((np.arange(len(x)), -(x - out)))  # largest remainder first, then the lower index
    while (left := total - int(out.sum())) > 0:
        room = order[out[order] < sizes[order]][:left]
        out[room] += 1
    return out


@functools.lru_cache(maxsize=2)
def _within(path: str) -> np.ndarray:
    """The ``within`` subset's uids (``u8,u8``)."""
    from winnow.pipeline.data.uid import UID_DTYPE

    uids = fsio.load_npy(path, f"density_prune.within {path}")
    if uids.dtype != UID_DTYPE:
        raise UserError(f"density_prune.within {path}: a subset's uids.npy holds {UID_DTYPE} uids, not {uids.dtype}")
    return uids


@functools.lru_cache(maxsize=4)
def _load(path: str) -> np.ndarray:
    return fsio.load_npy(path, f"density_prune state {path}")


@dataclass
class DensityPruneFilter(EmbeddingFilter):
    key = "density_prune"
    requires = ("uid",)  # ties within a cluster are broken by uid
    tag: str = "l14"
    fraction: float = 0.3  # of the rows with an image embedding
    n_clusters: int = 100
    neighbors: int = 20  # d_inter: the nearest centroids averaged over
    temperature: float = 0.5
    niter: int = 100
    seed: int = 0
    sample_rows: int = 500_000  # k-means training sample
    centroids: str = ""  # given centroids (.npy or .pt); empty: k-means over the pool
    within: str = ""  # a subset's uids.npy: only its rows are clustered, budgeted and kept; empty: the whole pool
    centroids_path: str = ""  # set by prepare
    clusters_path: str = ""  # set by prepare: CLUSTERS, one row per cluster

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise UserError(f"density_prune: fraction is in (0, 1], not {self.fraction!r}")
        if self.temperature <= 0:
            raise UserError(f"density_prune: temperature must be positive, not {self.temperature!r}")
        if self.n_clusters < 2 or self.neighbors < 1:
            raise UserError("density_prune: n_clusters must be at least 2 and neighbors at least 1")

    def arrays(self):
        return ("img",)

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k not in ("centroids_path", "clusters_path")}

    def _train(self, context: Any) -> np.ndarray:
        """Unit centroids (float64): the given ones, or spherical k-means over a sample of the pool."""
        if self.centroids:

            centroids = load_matrix(self.centroids, f"density_prune.centroids {self.centroids}")
        else:
            import faiss

            inside = None if not self.within else (lambda part: self._inside(context.uids(part)))
            x = context.sample(self.tag, "img", self.sample_rows, self.seed, keep=inside, dtype=np.float16)
            nonzero = int(sum(np.count_nonzero(np.abs(x[s: s + kmeans.BLOCK]).sum(axis=1, dtype=np.float32))
                              for s in range(0, len(x), kmeans.BLOCK)))  # rows k-means can use
            if nonzero < self.n_clusters:
                raise UserError(f"density_prune: {nonzero} image embeddings cannot make {self.n_clusters} clusters; "
                                "lower n_clusters")
            gpu = bool(getattr(faiss, "get_num_gpus", lambda: 0)())
            centroids = kmeans.train(x, self.n_clusters, niter=self.niter, seed=self.seed, spherical=True, gpu=gpu)
            del x
        centroids = np.asarray(centroids, np.float64)
        norm = np.linalg.norm(centroids, axis=1, keepdims=True)
        if len(centroids) < 2 or not np.isfinite(centroids).all() or (norm == 0).any():
            raise UserError("density_prune: the centroids must be at least 2 finite, non-zero rows")
        return centroids / norm

    def _inside(self, uids: np.ndarray) -> np.ndarray:
        """Which of ``uids`` DBP sees: all, or those of the ``within`` subset."""
        from winnow.pipeline.data.uid import isin_uids

        return np.ones(len(uids), bool) if not self.within else isin_uids(uids, _within(self.within))

    def prepare(self, context: Any) -> None:
        centroids = self._train(context)
        k = len(centroids)
        shift = 0
        while k * ((2 * SCALE >> shift) + 1) > HIST_CELLS:
            shift += 1
        bins = (2 * SCALE >> shift) + 1
        sizes, sums, hist = np.zeros(k, np.int64), np.zeros(k), np.zeros(k * bins, np.int64)
        saved = []  # (part, path of its (cluster, distance) array)
        for part, x in context.each_part(self.tag, "img"):  # pass 1: every row's cluster and distance
            if x.shape[1] != centroids.shape[1]:
                raise UserError(f"density_prune: the centroids have {centroids.shape[1]} dimensions, the pool's "
                                f"'{self.tag}' embeddings {x.shape[1]}; use the same embedding model")
            cluster, dist = assign(x, centroids)
            if self.within:
                cluster[~self._inside(context.uids(part))] = -1
            ok = cluster >= 0
            sizes += np.bincount(cluster[ok], minlength=k)
            sums += np.bincount(cluster[ok], weights=dist[ok], minlength=k)
            hist += np.bincount(cluster[ok] * bins + (dist[ok] >> shift), minlength=k * bins)
            saved.append((part, context.save(f"_rows.{part.stem}.npy", np.stack([cluster, dist]).astype(np.int32))))
        n = int(sizes.sum())
        if not n:
            raise UserError(f"density_prune: the pool has no image embedding with tag {self.tag!r}" +
                            (f" among the rows of {self.within}" if self.within else ""))
        table = np.zeros(k, CLUSTERS)
        table["size"] = sizes
        with np.errstate(invalid="ignore", divide="ignore"):
            table["d_intra"] = sums / sizes / SCALE
        table["d_inter"] = inter_distances(centroids, self.neighbors)
        table["complexity"] = table["d_inter"] * table["d_intra"]
        total = int(n * self.fraction)
        budget = table["budget"] = budgets(table["complexity"], sizes, total, self.temperature)

        # each cluster's cut: keep a row iff dist > cut, or dist == cut and uid < (cut_hi, cut_lo)
        hist = hist.reshape(k, bins)
        above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # rows in this bin or farther
        edge = np.maximum((above >= np.maximum(budget, 1)[:, None]).sum(axis=1) - 1, 0)  # the bin holding the cut
        need = budget - (above[np.arange(k), edge] - hist[np.arange(k), edge])  # rows to keep from it
        cut = np.where(budget == 0, FAR, np.where(budget == sizes, -1, (edge << shift) - 1))
        partial = (budget > 0) & (budget < sizes) & (need < hist[np.arange(k), edge])
        if partial.any():  # pass 2: the rows of the partly kept bins, their distances and uids
            found = []
            for part, path in saved:
                cluster, dist = fsio.load_npy(path, "density_prune rows").astype(np.int64)
                hit = (cluster >= 0) & partial[cluster] & ((dist >> shift) == edge[cluster])
                if hit.any():
                    uid = context.uids(part)
                    found.append((cluster[hit], dist[hit], uid["f0"][hit], uid["f1"][hit]))
            c, d, hi, lo = (np.concatenate(a) for a in zip(*found))
            order = np.lexsort((lo, hi, -d, c))  # per cluster: farthest first, then smaller uid
            first = np.searchsorted(c[order], np.arange(k))
            j = np.flatnonzero(partial)
            stop = order[first[j] + need[j]]  # the first row not kept
            cut[j] = d[stop]
            table["cut_hi"][j], table["cut_lo"][j] = hi[stop], lo[stop]
        table["cut"] = cut
        for _, path in saved:
            fsio.remove(path)
        self.centroids_path = context.save("centroids.npy", centroids)
        self.clusters_path = context.save("clusters.npy", table)
        context.log(f"density_prune: {k} clusters over {n:,} images; keeping {total:,} ({self.fraction:.0%}), "
                    f"{int(budget.min())}..{int(budget.max())} per cluster")

    def score(self, part, embeddings):
        from winnow.pipeline.data.uid import uids_to_array

        img = self.array(embeddings, "img", len(part))
        if not self.clusters_path:
            raise ValueError("density_prune: prepare() has not run")
        table = _load(self.clusters_path)
        cluster, dist = assign(img, _load(self.centroids_path))
        uids = uids_to_array(part["uid"].array, sort=False)
        ok = (cluster >= 0) & self._inside(uids)
        out = np.full(len(part), np.nan)
        if ok.any():
            uid = uids[ok]
            rule = table[cluster[ok]]
            d = dist[ok]
            below = (uid["f0"] < rule["cut_hi"]) | ((uid["f0"] == rule["cut_hi"]) & (uid["f1"] < rule["cut_lo"]))
            out[ok] = ((d > rule["cut"]) | ((d == rule["cut"]) & below)).astype(float)
        return pd.Series(out, index=part.index)
