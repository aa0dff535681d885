"""k-means in bounded memory (pipeline/models/kmeans.py): the image_cluster and density_prune filters' clustering."""

import faiss
import numpy as np

from winnow.pipeline.models import kmeans


def blobs(n=6000, k=12, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 4
    label = rng.integers(0, k, n)
    return (centres[label] + rng.normal(size=(n, d))).astype(np.float32), label


def inertia(x, c):
    return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())


def test_clusters_as_well_as_faiss():
    """Over 5 seeds the mean within-cluster squared distance is within 2% of faiss.Kmeans's (Lloyd from random
    rows, the same local optima) and far below the spread of the data."""
    x, _ = blobs()
    mine, ref = [], []
    for seed in range(5):
        c = kmeans.train(x, 12, niter=20, seed=seed)
        assert c.shape == (12, 16) and c.dtype == np.float32
        mine.append(inertia(x, c))
        km = faiss.Kmeans(16, 12, niter=20, seed=seed)
        km.train(x)
        ref.append(inertia(x, km.centroids))
    assert np.mean(mine) <= 1.02 * np.mean(ref)
    assert np.mean(mine) < 0.2 * inertia(x, x.mean(0, keepdims=True))


def test_float16_sample_gives_the_float32_answer_and_is_seeded():
    x, _ = blobs(seed=1)
    a = kmeans.train(x, 12, seed=3)
    b = kmeans.train(x.astype(np.float16), 12, seed=3)
    assert abs(inertia(x, a) - inertia(x, b)) < 1e-3 * inertia(x, a)
    assert np.array_equal(a, kmeans.train(x, 12, seed=3))
    assert not np.array_equal(a, kmeans.train(x, 12, seed=4))


def test_spherical_centroids_are_unit_and_ignore_zero_rows():
    x, _ = blobs(seed=2)
    x[:100] = 0
    c = kmeans.train(x, 8, niter=10, spherical=True)
    assert np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5) and np.isfinite(c).all()


def test_no_cluster_stays_empty():
    """Duplicated rows make faiss-style splits necessary: every centroid ends with members."""
    x = np.repeat(np.eye(4, dtype=np.float32), [500, 500, 1, 1], axis=0)
    x = np.concatenate([x, x[:1000] + np.random.default_rng(0).normal(scale=0.01, size=(1000, 4)).astype(np.float32)])
    c = kmeans.train(x, 6, niter=10, seed=0)
    assert len(np.unique(((x[:, None] - c[None]) ** 2).sum(-1).argmin(1))) == 6
