"""Dedup on planted embeddings: the cluster search against exact search, groups, keep order, SemDeDup, the
selection rule; on a DataComp-shaped metadata folder, in-process."""

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.stages.dedup import DedupConfig, dedup, dropped_uids, read_table
from winnow.pipeline.stages.dedup_tasks import (
    _top_k_edges,
    assign_leaves,
    best_earlier,
    components,
    group_rows,
    keep_order,
    normalize,
)


def planted(n=3000, d=64, copies=200, seed=0):
    """Clustered random vectors plus ``copies`` perturbed copies (cosine about 0.99 to their source)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d))
    x = centres[rng.integers(0, 30, n)] + 1.0 * rng.standard_normal((n, d))
    src = rng.choice(n, copies, replace=False)
    dup = x[src] + 0.08 * rng.standard_normal((copies, d))
    return normalize(np.concatenate([x, dup])), src, np.arange(n, n + copies)


def metadata_folder(path, x, files=3, seed=0):
    """A DataComp-shaped metadata folder: <hex>.parquet (uid, text, sha256, clip score) beside <hex>.npz."""
    rng = np.random.default_rng(seed)
    n = len(x)
    uid = np.array([f"{i:032x}" for i in rng.permutation(n)])
    sha = np.array([f"{i:064x}" for i in range(n)])
    sha[5], sha[9] = sha[3], sha[3]  # three rows with identical image bytes
    score = rng.uniform(0.1, 0.4, n).astype(np.float32)
    for j, rows in enumerate(np.array_split(np.arange(n), files)):
        stem = f"{j:032x}"
        pd.DataFrame({"uid": uid[rows], "text": [f"photo {i}" for i in rows], "sha256": sha[rows],
                      "clip_l14_similarity_score": score[rows]}).to_parquet(path / f"{stem}.parquet")
        np.savez(path / f"{stem}.npz", l14_img=x[rows].astype(np.float16), l14_txt=x[rows].astype(np.float16))
    return {"uid": uid, "score": score}


def near_pairs(table, uid):
    """Planted pairs (as uid sets) that the table puts in one near-duplicate group."""
    near = table[table["kind"] == "near"].set_index("uid")["group"]
    return lambda a, b: uid[a] in near.index and uid[b] in near.index and near[uid[a]] == near[uid[b]]


def test_planted_copies_are_found_and_the_cluster_search_agrees_with_exact_search(tmp_path):
    x, src, dup = planted()
    (tmp_path / "meta").mkdir()
    meta = metadata_folder(tmp_path / "meta", x)
    exact_doc = dedup(str(tmp_path / "meta"), DedupConfig(), None, out=str(tmp_path / "exact"), log=lambda m: None)
    exact = read_table(str(tmp_path / "exact" / "duplicates.parquet"))
    same = near_pairs(exact, meta["uid"])
    assert exact_doc["search"] == "exact" and all(same(a, b) for a, b in zip(src, dup))
    cfg = DedupConfig(flat_max=100, semantic_clusters=300, worker_memory_gib=0.002)  # two levels, many buckets
    doc = dedup(str(tmp_path / "meta"), cfg, None, out=str(tmp_path / "clusters"), log=lambda m: None)
    assert doc["clusters"] > 256 and "nprobe 3" in doc["search"]
    approx = read_table(str(tmp_path / "clusters" / "duplicates.parquet"))
    found = near_pairs(approx, meta["uid"])
    assert np.mean([found(a, b) for a, b in zip(src, dup)]) >= 0.95
    e, a = (set(t.loc[t["kind"] == "near", "uid"]) for t in (exact, approx))
    assert len(a & e) / len(e) >= 0.95 and a <= e  # near members: most of exact search's, nothing it lacks
    for kind in ("exact_image", "exact_pair"):  # exact groups do not depend on the search
        assert set(exact.loc[exact["kind"] == kind, "uid"]) == set(approx.loc[approx["kind"] == kind, "uid"])
    assert set(exact.loc[exact["kind"] == "exact_image", "uid"]) == set(meta["uid"][[3, 5, 9]])
    assert not (tmp_path / "clusters" / "_work").exists()  # the tasks' files are gone once the table is written
    # a budget below the pool's size bounds the training sample (1,024 rows at 64-d), and the clusters with it
    small = dedup(str(tmp_path / "meta"), DedupConfig(flat_max=100, worker_memory_gib=2**-11), None,
                  out=str(tmp_path / "small"), log=lambda m: None)
    assert 900 < small["sample"] < 1150 and small["clusters"] <= 1024 // 40


def test_components_and_keep_order_are_deterministic():
    labels = components(6, np.array([[4, 1], [1, 0], [3, 5]]))
    assert list(labels) == [0, 0, 2, 3, 0, 3]
    uids = np.array(["c" * 32, "a" * 32, "b" * 32, "d" * 32])
    rank = keep_order(uids, np.array([0.2, 0.3, 0.3, np.nan]))
    assert list(rank) == [2, 0, 1, 3]  # highest score first, ties by smallest uid, NaN last
    table = group_rows(np.array([7, 7, 7, 9]), np.arange(4), rank, uids, "near")
    assert len(table) == 3 and table.set_index("uid").loc["a" * 32, "kept"]
    assert (table["group"] == "a" * 32).all() and table["kept"].sum() == 1


def test_semdedup_similarity_is_the_largest_cosine_to_an_earlier_row():
    x, src, dup = planted(n=1000, copies=50)
    best = best_earlier(x, chunk=97)  # blocks smaller than the rows: the block edges must not matter
    sims = x @ x.T
    ref = np.array([sims[:j, j].max() if j else -1.0 for j in range(len(x))])
    assert np.allclose(best, ref, atol=1e-5)
    assert (best[dup] > 1 - 0.02).all()  # each copy is within eps 0.02 of its (earlier) source


def test_exclude_duplicates_rule_drops_the_non_kept_members():
    table = pd.DataFrame({"uid": ["a", "b", "c", "d", "e"], "kind": ["near", "near", "semantic", "semantic",
                                                                    "contaminated"],
                          "group": ["a", "a", "k", "k", "eval/1"], "kept": [True, False, True, False, False],
                          "similarity": [1.0, 0.97, 0.985, 0.995, 0.93]})
    assert dropped_uids(table, ["near"]) == {"b"}
    assert dropped_uids(table, ["semantic"]) == {"d"}
    assert dropped_uids(table, ["semantic"], eps=0.02) == {"c", "d"}
    assert dropped_uids(table, ["near", "contaminated"]) == {"b", "e"}
    with pytest.raises(UserError, match="unknown kinds"):
        dropped_uids(table, ["fuzzy"])


def test_exclude_duplicates_rule_is_validated():
    from winnow.pipeline.stages.subset import load_recipe

    with pytest.raises(UserError, match="exclude_duplicates takes table, kinds"):
        load_recipe({"name": "x", "select": [{"exclude_duplicates": {"table": "t.parquet"}}]})
    recipe = load_recipe("dfn_and_basic_dedup", {"pool": "/p", "dedup_tag": "copy"})
    rule = recipe.select[1]["exclude_duplicates"]
    assert rule["table"] == "/p/dedup/copy/duplicates.parquet" and "contaminated" in rule["kinds"]


def test_top_k_edges_are_each_rows_k_nearest_above_the_threshold():
    """Against a full sort per row: rows with more than k columns above the threshold keep their k best (the
    query itself dropped), rows with fewer keep all of them."""
    rng = np.random.default_rng(0)
    x = normalize(rng.normal(size=(300, 16)).astype(np.float32))
    x[:40] = normalize(x[0] + 0.01 * rng.normal(size=(40, 16)).astype(np.float32))  # one dense group of 40
    x[100:103] = normalize(x[99] + 0.01 * rng.normal(size=(3, 16)).astype(np.float32))
    sims = x @ x.T
    for k, threshold in ((5, 0.9), (64, 0.9), (5, 2.0)):
        got = {(int(a), int(b)) for a, b, _ in _top_k_edges(sims, np.arange(300), k, threshold)}
        want = set()
        for i in range(300):
            best = np.argsort(-sims[i], kind="stable")[:k]
            want |= {(i, int(j)) for j in best if sims[i, j] >= threshold and j != i}
        assert got == want, (k, threshold)
    assert len(got) == 0


def test_two_level_assignment_finds_the_nearest_leaf_of_almost_every_row(monkeypatch):
    """Rows look for their nearest leaves under their nearest coarse clusters only: the leaf found is the flat
    search's for nearly every row; up to FLAT_ASSIGN leaves the search is flat, so exact."""
    from winnow.pipeline.stages import dedup_tasks
    from winnow.pipeline.stages.dedup_tasks import nearest, train_clusters

    rng = np.random.default_rng(1)
    centres = normalize(rng.normal(size=(400, 32)).astype(np.float32))
    x = normalize(centres[rng.integers(0, 400, 20_000)] + 0.3 * rng.normal(size=(20_000, 32)).astype(np.float32))
    clusters = train_clusters(x, 400)
    assert len(clusters["top"]) > 1  # trained in two levels
    flat = nearest(clusters["leaves"], x, 3)[1]
    assert np.array_equal(assign_leaves(clusters, x, 3)[1], flat)
    monkeypatch.setattr(dedup_tasks, "FLAT_ASSIGN", 0)  # the two-level search, as above about 5,000 leaves
    _, ids = assign_leaves(clusters, x, 3)
    assert (ids[:, 0] == flat[:, 0]).mean() >= 0.99
