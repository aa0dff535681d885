"""Selection semantics: DataComp's top fraction, rule composition, recipe validation, subset files."""

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.uid import UID_DTYPE, array_to_uids, sort_order, sort_uids
from winnow.pipeline.stages.subset import (
    Rows,
    apply,
    check_variables,
    load_recipe,
    recipes_dir,
    subset,
    top_fraction_threshold,
    top_fraction_threshold_of,
    write_runs,
    write_subset,
)


def _frame(scores, state=None):
    n = len(scores)
    return Rows.from_frame(pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "state": state or ["ok"] * n,
                                         "s": scores}))


def test_top_fraction_follows_datacomp():
    scores = np.arange(1, 11, dtype=float)  # 1..10
    # n = int(10 * 0.3) = 3; T = the 4th largest = 7; keep >= 7 -> 4 samples (DataComp keeps n + 1)
    assert top_fraction_threshold(scores, 0.3) == 7.0
    assert top_fraction_threshold(scores, 1.0) == 1.0  # n >= len: everything
    # rows without a score count in n, as in DataComp's get_threshold (-np.sort(-x)[int(len(x) * fraction)])
    with_nan = np.array([np.nan, 9, 3, 8, 2, np.nan, 7, 1, 6, 5], dtype=float)
    for fraction in (0.1, 0.34, 0.5, 0.7):
        assert top_fraction_threshold(with_nan, fraction) == -np.sort(-with_nan)[int(len(with_nan) * fraction)]
    assert top_fraction_threshold(with_nan, 0.5) == 3.0  # n = 5: the 6th largest (not int(8 * 0.5) = 4: 5.0)
    assert np.isnan(top_fraction_threshold(np.array([np.nan, np.nan, 3.0]), 0.5))  # n = 1 -> NaN -> keeps none


def test_top_fraction_counts_candidates_not_failed_downloads():
    """n counts every candidate row (state ok, with or without a score); rows that failed to download do not."""
    recipe = load_recipe({"name": "t", "select": [{"top_fraction": {"column": "s", "fraction": 0.5}}]})
    scores = [np.nan, 9, 3, 8, 2, np.nan, 7, 1, 6, 5, np.nan, np.nan]
    kept = apply(recipe, _frame(scores, ["ok"] * 10 + ["http_error"] * 2))
    assert kept.sum() == 6  # n = int(10 * 0.5) = 5 -> the 6th largest, 3.0 -> 9, 8, 7, 6, 5, 3


def test_top_fraction_keeps_ties_at_the_threshold():
    recipe = load_recipe({"name": "t", "select": [{"top_fraction": {"column": "s", "fraction": 0.2}}]})
    kept = apply(recipe, _frame([5, 5, 5, 1, 1]))
    assert kept.tolist() == [True, True, True, False, False]


def test_top_fraction_is_global_not_over_the_rows_left():
    recipe = load_recipe({"name": "t", "select": [{"threshold": {"column": "s", "max": 5}},
                                                  {"top_fraction": {"column": "s", "fraction": 0.5}}]})
    log = []
    kept = apply(recipe, _frame(list(range(1, 11))), log)
    # the global threshold is 5 (n = 5 -> 6th largest of 1..10); max 5 leaves 1..5; so only 5 survives
    assert kept.sum() == 1 and log[-1]["threshold"] == 5.0
    assert [s["kept"] for s in log] == [10, 5, 1]


def test_top_fraction_of_kept_ranks_among_the_rows_kept_so_far():
    """of: kept: n = int(rows kept by the rules before it x fraction), T the (n+1)-th largest among them."""
    recipe = load_recipe({"name": "t", "select": [
        {"top_fraction": {"column": "s", "fraction": 0.5}},
        {"top_fraction": {"column": "r", "fraction": 0.5, "of": "kept"}}]})
    s = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    r = [9, 9, 9, 9, 1, 5, 3, 4, 2, 6]  # s >= 5 keeps rows 4..9 (r 1, 5, 3, 4, 2, 6): n = 3, T = 3
    rows = Rows.from_frame(pd.DataFrame({"uid": [f"{i:032x}" for i in range(10)], "state": ["ok"] * 10,
                                         "s": s, "r": r}))
    log = []
    kept = apply(recipe, rows, log)
    assert np.flatnonzero(kept).tolist() == [5, 6, 7, 9] and log[-1]["threshold"] == 3.0
    assert "kept so far" in log[-1]["rule"]
    whole_pool = load_recipe({"name": "t", "select": [
        {"top_fraction": {"column": "s", "fraction": 0.5}}, {"top_fraction": {"column": "r", "fraction": 0.5}}]})
    assert np.flatnonzero(apply(whole_pool, rows)).tolist() == [5, 9]  # over the pool: T = 5 (of 9 9 9 9 6 5 ...)


def test_top_fraction_of_kept_over_parts_equals_the_whole_pool_at_once(tmp_path):
    """subset() finds an of: kept threshold with one more pass over the parts; the result equals the rule
    applied to the whole pool held at once."""

    rng = np.random.default_rng(4)
    frames = []
    for j in range(3):
        n = 50 + 20 * j
        frame = pd.DataFrame({"uid": [f"{j:016x}{i:016x}" for i in range(n)], "text": ["a cat on a mat"] * n,
                              "clip_b32_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
                              "original_width": rng.integers(10, 500, n), "original_height": rng.integers(10, 500, n)})
        frame.to_parquet(tmp_path / f"{j:032x}.parquet")
        frames.append(frame)
    recipe = {"name": "within", "filters": [{"key": "clip", "params": {"tag": "b32"}}, {"key": "min_side"}],
              "select": [{"top_fraction": {"column": "clip_b32_score", "fraction": 0.4}},
                         {"top_fraction": {"column": "min_side_score", "fraction": 0.5, "of": "kept"}},
                         {"top_fraction": {"column": "clip_b32_score", "fraction": 0.5, "of": "kept"}}]}
    doc = subset(recipe, str(tmp_path), str(tmp_path / "out"), None, log=lambda m: None)
    got = array_to_uids(np.load(tmp_path / "out" / "uids.npy"))
    whole = pd.concat(frames, ignore_index=True)
    rows = Rows.from_frame(pd.DataFrame({
        "uid": whole["uid"], "state": "ok", "clip_b32_score": whole["clip_b32_similarity_score"].astype(float),
        "min_side_score": np.minimum(whole["original_width"], whole["original_height"]).astype(float)}))
    expected = sorted(whole["uid"][apply(load_recipe(recipe), rows)])
    assert sorted(got) == expected and doc["kept"] == len(expected)
    assert [s["kept"] for s in doc["steps"]] == [210, 85, 43, 22]  # int(.4 x 210) + 1, int(85/2) + 1, int(43/2) + 1


def test_only_downloaded_rows_are_candidates():
    kept = apply(load_recipe({"name": "all", "select": []}), _frame([1, 2, 3], ["ok", "http_error", "ok"]))
    assert kept.tolist() == [True, False, True]


def test_intersect_union_and_exclude(tmp_path):
    frame = _frame([1, 2, 3, 4, 5, 6])
    low = {"name": "low", "select": [{"threshold": {"column": "s", "max": 4}}]}
    high = {"name": "high", "select": [{"threshold": {"column": "s", "min": 3}}]}
    assert apply(load_recipe({"name": "i", "select": [{"intersect": [low, high]}]}), frame).sum() == 2
    assert apply(load_recipe({"name": "u", "select": [{"union": [low, high]}]}), frame).sum() == 6
    write_subset(str(tmp_path), frame.uid[[0, 5]], {})
    ex = load_recipe({"name": "e", "select": [{"exclude_uids": str(tmp_path / "uids.npy")}]})
    assert apply(ex, frame).tolist() == [False, True, True, True, True, False]


def test_subset_file_is_sorted_u8_u8_and_keeps_repeats(tmp_path):
    uids = ["f" * 32, "0" * 31 + "1", "0" * 31 + "1"]
    write_subset(str(tmp_path), uids, {"recipe": "x"})
    arr = np.load(tmp_path / "uids.npy", allow_pickle=False)
    assert arr.dtype == UID_DTYPE and array_to_uids(arr) == sorted(uids)
    assert (tmp_path / "subset.json").exists()


def test_every_shipped_recipe_parses():
    for path in sorted(recipes_dir().glob("*.yaml")):
        recipe = load_recipe(path.stem, {"imagenet1k": "/x.npy", "world": "/w", "pool": "/p"})
        assert recipe.name == path.stem and recipe.description
        for spec in recipe.all_filters():
            from winnow.filters import build

            build(spec)
    with pytest.raises(UserError, match="--var imagenet1k"):
        load_recipe("image_based_and_clip")


@pytest.mark.parametrize("rule, fragment", [
    ({"top_fraction": {"column": "s", "fraction": 1.5}}, "fraction in"),
    ({"threshold": {"column": "s"}}, "min and/or max"),
    ({"keep_best": 3}, "one of threshold"),
    ({"union": []}, "non-empty list"),
    ({"top_fraction": {"column": "s", "fraction": 0.5, "of": "rest"}}, "of: kept"),
])
def test_bad_rules_are_user_errors(rule, fragment):
    with pytest.raises(UserError, match=fragment):
        load_recipe({"name": "bad", "select": [rule]})


def test_unknown_score_column_names_what_exists():
    with pytest.raises(UserError, match="no score column 'clip_b32_score'.*s"):
        apply(load_recipe({"name": "x", "select": [{"threshold": {"column": "clip_b32_score", "min": 0}}]}),
              _frame([1]))


def test_shipped_recipes_take_their_knobs_as_variables_with_datacomp_defaults():

    rule = lambda name, **v: load_recipe(name, v).select[-1]  # noqa: E731
    assert rule("clip_l14_30pct") == {"top_fraction": {"column": "clip_l14_score", "fraction": 0.3}}
    assert rule("clip_l14_30pct", fraction="0.2", tag="b32") == {"top_fraction": {"column": "clip_b32_score",
                                                                                   "fraction": 0.2}}
    assert load_recipe("clip_l14_30pct", {"tag": "b32"}).filters == [{"key": "clip", "params": {"tag": "b32"}}]
    assert rule("clip_b32_threshold") == {"threshold": {"column": "clip_b32_score", "min": 0.25}}
    assert rule("clip_b32_threshold", threshold="0.3") == {"threshold": {"column": "clip_b32_score", "min": 0.3}}
    assert rule("laion2b", threshold="0.3")["threshold"]["min"] == 0.3
    assert rule("dfn_30pct", fraction="0.1")["top_fraction"]["fraction"] == 0.1
    # a sub-recipe's variables count as the recipe's own
    check_variables("image_based_and_clip", {"imagenet1k": "x.npy", "fraction": "0.2"})
    with pytest.raises(UserError, match="its variables: centroids, fasttext_model, fraction, imagenet1k, tag"):
        check_variables("image_based_and_clip", {"imagenet1k": "x.npy", "threshold": "0.2"})


def _metadata(folder, names, rows=20, uid=None, extra=None):
    rng = np.random.default_rng(len(names))
    for j, stem in enumerate(names):
        frame = pd.DataFrame({"uid": [uid or f"{j:016x}{i:016x}" for i in range(rows)],
                              "text": ["a cat on a mat"] * rows,
                              "clip_b32_similarity_score": rng.uniform(0.1, 0.4, rows).astype(np.float32),
                              **(extra or {})})
        frame.to_parquet(folder / f"{stem}.parquet")
        v = rng.normal(size=(rows, 4)).astype(np.float16)
        np.savez(folder / f"{stem}.npz", b32_img=v, b32_txt=v)


@pytest.mark.parametrize("problem, fragment", [
    ("not_parquet", "is not a readable parquet file"), ("empty", "Parquet file size is 0 bytes"),
    ("missing_column", "has no column 'original_width', which 'min_side' needs"),
    ("bad_uid", "uid 'xyz' is not hexadecimal")])
def test_every_metadata_problem_is_one_line_naming_the_file(tmp_path, problem, fragment):

    _metadata(tmp_path, ["a" * 32, "b" * 32])
    bad = tmp_path / f"{'c' * 32}.parquet"
    recipe = "clip_b32_threshold"
    if problem == "not_parquet":
        bad.write_bytes(b"not a parquet file")
    elif problem == "empty":
        bad.write_bytes(b"")
    elif problem == "missing_column":
        bad, recipe = tmp_path / f"{'a' * 32}.parquet", "basic"
    else:
        _metadata(tmp_path, ["c" * 32], uid="xyz")
    with pytest.raises(UserError, match=fragment) as caught:
        subset(recipe, str(tmp_path), str(tmp_path / "out"), None, log=lambda m: None)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_added_to_a_metadata_folder_is_scored(tmp_path):

    _metadata(tmp_path, ["a" * 32])
    first = subset("clip_b32_threshold", str(tmp_path), str(tmp_path / "o1"), None, log=lambda m: None)
    _metadata(tmp_path, ["a" * 32, "b" * 32])
    second = subset("clip_b32_threshold", str(tmp_path), str(tmp_path / "o2"), None, log=lambda m: None)
    assert first["rows"] == 20 and second["rows"] == 40


def test_sorted_runs_are_written_as_one_sorted_uid_file(tmp_path):
    """write_runs merges each part's sorted uids a bucket of upper halves at a time; uids sharing an upper half
    (and repeats) land in one bucket and come out in numeric order, as a whole-array lexsort gives."""

    rng = np.random.default_rng(3)
    runs = []
    for n in (0, 1, 50, 400, 1000):
        arr = np.zeros(n, UID_DTYPE)
        arr["f0"] = rng.integers(0, 40, n)  # many equal upper halves, in and across runs
        arr["f1"] = rng.integers(0, 2**63, n)
        if n > 10:
            arr[-3:] = arr[:3]  # repeats
        runs.append(arr[sort_order(arr)])
    assert all(np.array_equal(r, sort_uids(r)) for r in runs)
    written = write_runs(str(tmp_path / "u.npy"), [r["f0"] for r in runs], [r["f1"] for r in runs], buckets=7)
    got = np.load(tmp_path / "u.npy", allow_pickle=False)
    assert written == len(got) == 1451 and got.dtype == UID_DTYPE
    assert np.array_equal(got, sort_uids(np.concatenate(runs)))


def test_numpy_only_filters_score_on_the_drivers_threads_without_a_cluster(tmp_path):
    """A CLIP-score subset of metadata runs on threads of the driver when no cluster is up (no start or stop to pay
    for): the runner never starts one, and the uids equal an in-process run's; a task's error is raised as it is."""
    from winnow.pipeline.run.runner import ClusterConfig, Runner

    _metadata(tmp_path, [f"{i:032x}" for i in range(6)])
    said = []
    with Runner(ClusterConfig(n_workers=2), log=said.append) as runner:
        threaded = subset("clip_b32_threshold", str(tmp_path), str(tmp_path / "t"), runner,
                          cache=str(tmp_path / "c1"), log=lambda m: None)
        assert runner.client is None and not any("Dask" in m for m in said), said
        assert runner.map(lambda i: i * i, range(5), "squares", threads=True) == [0, 1, 4, 9, 16]
        with pytest.raises(UserError, match="part 3"):
            runner.map(lambda i: (_ for _ in ()).throw(UserError(f"part {i}")) if i == 3 else i, range(5), "x",
                       threads=True)
    here = subset("clip_b32_threshold", str(tmp_path), str(tmp_path / "h"), None, cache=str(tmp_path / "c2"),
                  log=lambda m: None)
    assert threaded["rows"] == here["rows"] == 120
    assert np.array_equal(np.load(tmp_path / "t" / "uids.npy"), np.load(tmp_path / "h" / "uids.npy"))


@pytest.mark.parametrize("kind", ["uniform", "ties", "nans", "skewed", "constant"])
def test_the_bracketed_threshold_over_parts_equals_datacomps_rule_on_the_whole_array(kind):
    """The threshold found from a sample's bracket, part by part, is exactly the whole array's partition's."""
    rng = np.random.default_rng(len(kind))
    x = rng.random(300_000).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 50).astype(np.float32) / 50
    elif kind == "nans":
        x[rng.random(len(x)) < 0.3] = np.nan
    elif kind == "skewed":
        x = (rng.pareto(0.5, len(x)) ** 3).astype(np.float32)
    elif kind == "constant":
        x[:] = 0.25
    chunks = np.array_split(x, 7)
    for fraction in (0.0001, 0.1, 0.3, 0.5, 0.9, 0.99, 1.0):
        want = top_fraction_threshold(x.copy(), fraction)
        got = top_fraction_threshold_of([c.copy() for c in chunks], fraction)
        assert got == want or (np.isnan(got) and np.isnan(want)), (kind, fraction, got, want)
