"""Density-based pruning (filters/density_prune.py): the budgets' quadratic program by hand and by its optimality
conditions, cluster complexity on a 2-D example worked by hand, and the shipped recipe on DataComp-shaped metadata
folders against the paper's rule computed directly."""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest

import winnow.filters.density_prune as dp
from winnow.filters import build
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.parts import list_parts
from winnow.pipeline.data.uid import UID_DTYPE
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.select.score import PoolContext
from winnow.pipeline.stages.subset import subset

QUIET = dict(log=lambda m: None)


def _uid_array(uids) -> np.ndarray:
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], UID_DTYPE)
    arr.sort()
    return arr


def _write_metadata(folder, uids, img, splits):
    """A DataComp metadata folder: one parquet + .npz (``l14_img``/``l14_txt``) per slice of the rows."""
    os.makedirs(folder, exist_ok=True)
    for j, (a, b) in enumerate(zip([0, *splits], [*splits, len(uids)])):
        stem = f"{j:032x}"
        table = pd.DataFrame({"uid": uids[a:b], "text": ["a photo"] * (b - a)})
        table.to_parquet(os.path.join(folder, f"{stem}.parquet"))
        np.savez(os.path.join(folder, f"{stem}.npz"), l14_img=img[a:b], l14_txt=img[a:b])
    return str(folder)


# --- the budgets: N_j = argmin sum (N_j - P_j N)^2, sum N_j = N, 1 <= N_j <= |cluster j| -----------------------

def test_budgets_by_hand():
    # P = (1, 2, 5) / 8 and N = 8: targets 1, 2, 5; the third cluster holds 3, its 2 left over go 1 + 1 to the others
    assert dp.budgets(np.log([1, 2, 5.0]), [10, 10, 3], 8, 1.0).tolist() == [2, 3, 3]
    assert dp.budgets(np.log([1, 2, 5.0]), [10, 10, 10], 8, 1.0).tolist() == [1, 2, 5]
    # the temperature divides the complexity: C = 2 log(1, 2, 5) at temperature 2 is the same distribution
    assert dp.budgets(2 * np.log([1, 2, 5.0]), [10, 10, 10], 8, 2.0).tolist() == [1, 2, 5]
    # targets 0.1, 0.1, 9.8 with 5 per cluster: 4.8 over, 2.4 to each other -> 2.5, 2.5, 5; the unit left after
    # flooring goes to the larger remainder, a tie: the lower cluster index
    assert dp.budgets(np.log([1, 1, 98.0]), [5, 5, 5], 10, 1.0).tolist() == [3, 2, 5]
    # every non-empty cluster keeps at least one row when N allows it
    assert dp.budgets(np.log([1, 1, 1e6]), [10, 10, 10], 4, 1.0).tolist() == [1, 1, 2]
    # an empty cluster (no complexity) keeps nothing; N below the non-empty clusters: no lower bound
    assert dp.budgets(np.array([np.log(3), np.nan, 0.0]), [4, 0, 4], 4, 1.0).tolist() == [3, 0, 1]
    assert dp.budgets(np.log([1, 2, 5.0]), [10, 10, 10], 2, 1.0).tolist() == [0, 1, 1]  # .25 .5 1.25
    with pytest.raises(ValueError):
        dp.budgets(np.zeros(2), [1, 1], 3, 1.0)


def test_budgets_sum_to_the_target_fit_the_clusters_and_solve_the_quadratic_program():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 40))
        sizes = rng.integers(0, 50, k) * (rng.random(k) < 0.9)
        total = int(rng.integers(0, sizes.sum() + 1))
        complexity, temperature = rng.uniform(0, 0.5, k), float(rng.choice([0.05, 0.1, 0.5, 1.0]))
        got = dp.budgets(complexity, sizes, total, temperature)
        assert got.sum() == total and (got >= 0).all() and (got <= sizes).all()
        lower = np.minimum(sizes, 1) if total >= (sizes > 0).sum() else np.zeros(k, int)
        assert (got >= lower).all()
        p = np.exp(complexity / temperature)
        excess = got - p / p.sum() * total
        # integer optimum: moving a unit from a cluster that can give (above its lower bound) to one that can take
        # (below its size) never lowers sum (N_j - P_j N)^2, i.e. their excesses differ by at most 1
        give, take = excess[got > lower], excess[got < sizes]
        if len(give) and len(take):
            assert give.max() - take.min() <= 1 + 1e-9


# --- complexity on a 2-D example worked by hand --------------------------------------------------------------

# centroids at 0, 90 and 180 degrees; cosine distances between them 1 (neighbours) and 2 (opposite)
CENTROIDS = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
POINTS = np.array([[0.8, 0.6], [0.8, -0.6], [1, 0], [1, 0],                        # cluster 0: 0.2 0.2 0 0
                   [0.6, 0.8], [-0.6, 0.8], [0, 1],                                  # cluster 1: 0.2 0.2 0
                   [-0.8, 0.6], [-0.8, -0.6], [-0.6, -0.8], [-1, 0], [-0.28, -0.96]],  # 2: 0.2 0.2 0.4 0 0.72
                  np.float32)
UIDS = [f"{100 - i:032x}" for i in range(len(POINTS))]  # later rows have smaller uids


@pytest.fixture()
def plane(tmp_path):
    np.save(tmp_path / "centroids.npy", CENTROIDS)
    folder = _write_metadata(tmp_path / "plane", UIDS, POINTS, [5])  # rows 4 and 5 tie across the two parts
    return {"folder": folder, "centroids": str(tmp_path / "centroids.npy"), "tmp": tmp_path}


def test_complexity_and_budgets_on_three_clusters_by_hand(plane):
    filt = build({"key": "density_prune", "params": {"centroids": plane["centroids"], "fraction": 0.5}})
    out = plane["tmp"] / "state"
    filt.prepare(PoolContext(plane["folder"], list_parts(plane["folder"]), None, str(out), lambda m: None))
    table = np.load(filt.clusters_path, allow_pickle=False)
    assert table["size"].tolist() == [4, 3, 5]
    d_intra = np.array([0.4 / 4, 0.4 / 3, 1.52 / 5])
    d_inter = np.array([(1 + 2) / 2, (1 + 1) / 2, (2 + 1) / 2])  # 20 neighbours asked, 2 exist
    assert np.allclose(table["d_intra"], d_intra, atol=1e-6) and np.allclose(table["d_inter"], d_inter)
    assert np.allclose(table["complexity"], [0.15, 0.4 / 3, 0.456], atol=1e-6)
    # N = int(0.5 x 12) = 6; softmax(C / 0.5) = e^(0.3, 0.2667, 0.912) / 5.1448 -> targets 1.574, 1.523, 2.903,
    # all within [1, size]: floors 1, 1, 2 and the 2 units left to the largest remainders (.903, .574)
    p = np.exp(table["complexity"] / 0.5)
    assert np.allclose(6 * p / p.sum(), [1.574, 1.523, 2.903], atol=1e-3)
    assert table["budget"].tolist() == [2, 1, 3]
    assert sorted(os.listdir(out)) == ["centroids.npy", "clusters.npy"]  # the pass-1 arrays are gone


def test_each_cluster_keeps_its_farthest_members_ties_by_uid(plane):
    doc = subset("density_30pct", plane["folder"], str(plane["tmp"] / "s"), None, cache=str(plane["tmp"] / "c"),
                 variables={"fraction": "0.5", "centroids": plane["centroids"]}, **QUIET)
    got = np.load(plane["tmp"] / "s" / "uids.npy", allow_pickle=False)
    # cluster 0: its two rows at 0.2; cluster 1: one of the two at 0.2, the smaller uid (row 5, not row 4);
    # cluster 2: 0.72, 0.4 and of the two at 0.2 the smaller uid (row 8)
    assert np.array_equal(got, _uid_array([UIDS[i] for i in (0, 1, 5, 11, 9, 8)]))
    assert doc["kept"] == 6


# --- the recipe on a DataComp-shaped metadata folder -----------------------------------------------------------

@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """450 rows in 3 parts: 6 blobs of different sizes and spreads in 16-D (float16, as DataComp's), 20 exact
    copies of one image in the tightest blob."""
    rng = np.random.default_rng(3)
    centers = np.linalg.qr(rng.normal(size=(16, 16)))[0][:6]
    sizes, spreads = [120, 90, 80, 70, 50, 40], [0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    img = np.concatenate([c + s * rng.normal(size=(n, 16)) for c, n, s in zip(centers, sizes, spreads)])
    img[100:120] = img[99]
    img = img[rng.permutation(len(img))]
    img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float16)
    uids = [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(len(img))]
    folder = _write_metadata(tmp_path_factory.mktemp("blobs") / "meta", uids, img, [150, 300])
    return {"folder": folder, "uids": uids, "img": img}


def _expected(m, centroids, fraction=0.3, temperature=0.5, neighbors=20):
    """The paper's rule computed directly over the whole folder (distances rounded to 2^-20 as documented)."""
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    x = m["img"].astype(np.float64)
    sims = np.rint((x / np.linalg.norm(x, axis=1, keepdims=True)) @ c.T * 2**20)
    cluster, dist = sims.argmax(axis=1), 2**20 - sims.max(axis=1)
    k = len(c)
    sizes = np.bincount(cluster, minlength=k)
    d_intra = np.array([dist[cluster == j].mean() / 2**20 if sizes[j] else np.nan for j in range(k)])
    between = 1 - c @ c.T
    np.fill_diagonal(between, np.inf)
    d_inter = np.sort(between, axis=1)[:, :min(neighbors, k - 1)].mean(axis=1)
    budget = dp.budgets(d_inter * d_intra, sizes, int(len(x) * fraction), temperature)
    uid = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in m["uids"]], UID_DTYPE)
    keep = np.zeros(len(x), bool)
    for j in range(k):
        rows = np.flatnonzero(cluster == j)
        order = np.lexsort((uid["f1"][rows], uid["f0"][rows], -dist[rows]))  # farthest first, then smaller uid
        keep[rows[order[: budget[j]]]] = True
    return np.sort(uid[keep]), cluster, budget, d_intra


@pytest.mark.parametrize("hist_cells", [dp.HIST_CELLS, 64])  # 64: a few coarse bins, cuts inside crowded bins
def test_recipe_equals_the_rule_computed_directly(blobs, tmp_path, monkeypatch, hist_cells):
    monkeypatch.setattr(dp, "HIST_CELLS", hist_cells)
    doc = subset("density_30pct", blobs["folder"], str(tmp_path / "s"), None, cache=str(tmp_path / "c"),
                 variables={"n_clusters": "6"}, **QUIET)
    got = np.load(tmp_path / "s" / "uids.npy", allow_pickle=False)
    [folder] = glob.glob(str(tmp_path / "c" / "scores" / "*" / "density_prune_l14_score-*"))
    centroids = np.load(os.path.join(folder, "centroids.npy"), allow_pickle=False)
    table = np.load(os.path.join(folder, "clusters.npy"), allow_pickle=False)
    expected, cluster, budget, d_intra = _expected(blobs, centroids)
    assert got.dtype == UID_DTYPE and np.array_equal(got, expected)
    assert doc["kept"] == len(got) == int(450 * 0.3) and table["budget"].tolist() == budget.tolist()
    assert np.allclose(table["d_intra"], d_intra) and table["size"].tolist() == np.bincount(cluster).tolist()
    # complexity drives the budgets: the spread-out blobs keep a larger share of their rows than the tight ones
    share = budget / np.bincount(cluster)
    assert share[np.argmax(d_intra)] > share[np.argmin(d_intra)]


def test_within_a_subset_only_its_rows_are_clustered_budgeted_and_kept(blobs, tmp_path):
    """within: the paper's DBP after deduplication: here the 21 identical images (all but one) and a random third of
    the rest are left out; the result is the rule computed directly over the rows left."""
    rng = np.random.default_rng(8)
    img, uids = blobs["img"], blobs["uids"]
    copies = np.flatnonzero((img == img[np.argmax((img[:, None] == img[None]).all(axis=2).sum(axis=1))]).all(axis=1))
    inside = rng.random(len(img)) > 1 / 3
    inside[copies[1:]] = False
    within = np.sort(np.array([(int(u[:16], 16), int(u[16:], 16)) for u, i in zip(uids, inside) if i], UID_DTYPE))
    np.save(tmp_path / "within.npy", within)
    doc = subset("density_30pct", blobs["folder"], str(tmp_path / "s"), None, cache=str(tmp_path / "c"),
                 variables={"n_clusters": "6", "within": str(tmp_path / "within.npy")}, **QUIET)
    got = np.load(tmp_path / "s" / "uids.npy", allow_pickle=False)
    [folder] = glob.glob(str(tmp_path / "c" / "scores" / "*" / "density_prune_l14_score-*"))
    centroids = np.load(os.path.join(folder, "centroids.npy"), allow_pickle=False)
    sub = {"img": img[inside], "uids": [u for u, i in zip(uids, inside) if i]}
    expected, _, budget, _ = _expected(sub, centroids)
    assert len(copies) == 21 and np.array_equal(got, expected) and doc["kept"] == int(inside.sum() * 0.3)
    assert np.isin(got.view("V16"), within.view("V16")).all()
    table = np.load(os.path.join(folder, "clusters.npy"), allow_pickle=False)
    assert table["size"].sum() == inside.sum() and table["budget"].tolist() == budget.tolist()
    np.save(tmp_path / "bad.npy", np.arange(3))
    with pytest.raises(UserError, match="density_prune.within .*holds"):
        subset("density_30pct", blobs["folder"], str(tmp_path / "t"), None, cache=str(tmp_path / "c2"),
               variables={"n_clusters": "6", "within": str(tmp_path / "bad.npy")}, **QUIET)


def test_the_same_subset_from_another_cache_and_from_a_runner(blobs, tmp_path):
    variables = {"n_clusters": "6", "fraction": "0.2"}
    subset("density_30pct", blobs["folder"], str(tmp_path / "a"), None, cache=str(tmp_path / "ca"),
           variables=variables, **QUIET)
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        subset("density_30pct", blobs["folder"], str(tmp_path / "b"), runner, cache=str(tmp_path / "cb"),
               variables=variables, **QUIET)
    a, b = (np.load(tmp_path / n / "uids.npy", allow_pickle=False) for n in "ab")
    assert np.array_equal(a, b) and len(a) == 90


def test_more_clusters_than_images_is_a_one_line_error(plane):
    with pytest.raises(UserError, match="cannot make 50 clusters; lower n_clusters"):
        subset("density_30pct", plane["folder"], str(plane["tmp"] / "s"), None, cache=str(plane["tmp"] / "c"),
               variables={"n_clusters": "50"}, **QUIET)
