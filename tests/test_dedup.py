"""Dedup building blocks on planted embeddings: exact search vs IVF, groups, keep order, selection rule."""

import numpy as np
import pandas as pd
import pytest

from pipeline.stages.dedup import DedupConfig, build_index, components, dropped_uids, group_rows, keep_order, normalize, search_edges, semantic
from pipeline.core.errors import UserError


def planted(n=3000, d=64, copies=200, seed=0):
    """Clustered random vectors plus ``copies`` perturbed copies (cosine about 0.99 to their source)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d))
    x = centres[rng.integers(0, 30, n)] + 1.0 * rng.standard_normal((n, d))
    src = rng.choice(n, copies, replace=False)
    dup = x[src] + 0.08 * rng.standard_normal((copies, d))
    return normalize(np.concatenate([x, dup])), src, np.arange(n, n + copies)


def pairs(index, x, cfg):
    edges = search_edges(index, x, 0, cfg)
    return {(int(a), int(b)) for a, b, _ in edges}


def test_planted_copies_are_found_and_ivf_agrees_with_exact_search():
    x, src, dup = planted()
    cfg = DedupConfig(near_threshold=0.95)
    exact = pairs(build_index(x, cfg), x, cfg)
    assert {(int(a), int(b)) for a, b in zip(src, dup)} <= exact  # every planted copy at the threshold
    ivf_cfg = DedupConfig(near_threshold=0.95, flat_max=100, nlist=32, nprobe=8)
    index = build_index(x, ivf_cfg)
    assert type(index).__name__ == "IndexRefine"  # IVF-PQ candidates, re-ranked
    approx = pairs(index, x, ivf_cfg)
    assert len(approx & exact) / len(exact) >= 0.95 and approx <= exact | approx


def test_components_and_keep_order_are_deterministic():
    labels = components(6, np.array([[4, 1], [1, 0], [3, 5]]))
    assert list(labels) == [0, 0, 2, 3, 0, 3]
    uids = np.array(["c" * 32, "a" * 32, "b" * 32, "d" * 32])
    rank = keep_order(uids, np.array([0.2, 0.3, 0.3, np.nan]))
    assert list(rank) == [2, 0, 1, 3]  # highest score first, ties by smallest uid, NaN last
    table = group_rows(np.array([7, 7, 7, 9]), np.arange(4), rank, uids, "near")
    assert len(table) == 3 and table.set_index("uid").loc["a" * 32, "kept"]
    assert (table["group"] == "a" * 32).all() and table["kept"].sum() == 1


def test_semantic_dedup_marks_copies_at_every_eps_in_one_pass():
    x, src, dup = planted(n=1000, copies=50)
    rank = np.arange(len(x))  # sources rank before their copies
    _, sim = semantic(x, rank, n_clusters=8)
    assert (sim[dup] > 1 - 0.02).all()  # each copy is within eps 0.02 of its (better-ranked) source
    assert (sim[src] < sim[dup]).mean() > 0.9


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
    from pipeline.stages.subset import load_recipe

    with pytest.raises(UserError, match="exclude_duplicates takes table, kinds"):
        load_recipe({"name": "x", "select": [{"exclude_duplicates": {"table": "t.parquet"}}]})
    recipe = load_recipe("dfn_and_basic_dedup", {"pool": "/p", "dedup_tag": "copy"})
    rule = recipe.select[1]["exclude_duplicates"]
    assert rule["table"] == "/p/dedup/copy/duplicates.parquet" and "contaminated" in rule["kinds"]
