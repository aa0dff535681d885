"""``winnow explain`` and ``winnow diff`` on the tiny world's pool (every planted defect), with two recipes."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.uid import array_to_uids
from winnow.pipeline.stages.diff import diff, format_text
from winnow.pipeline.stages.explain import explain
from winnow.pipeline.stages.explain import format_text as explain_text
from winnow.pipeline.stages.subset import subset
from winnow.pipeline.synth.world import read_truth

pytestmark = pytest.mark.e2e
WORDED = {"name": "worded", "filters": [{"key": "caption_words"}],
          "select": [{"threshold": {"column": "caption_words_score", "min": 3}}]}
SHAPED = {"name": "shaped", "filters": [{"key": "aspect_ratio"}, {"key": "min_side"}],
          "select": [{"threshold": {"column": "aspect_ratio_score", "max": 3}},
                     {"threshold": {"column": "min_side_score", "min": 200}}]}


@pytest.fixture(scope="module")
def two(tiny_pool, local_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    cache = str(root / "cache")
    out = {}
    for recipe in (WORDED, SHAPED):
        folder = str(root / recipe["name"])
        subset(recipe, tiny_pool["pool"], folder, local_cluster, cache=cache, log=lambda m: None)
        out[recipe["name"]] = folder
    return {"pool": tiny_pool["pool"], "world": tiny_pool["world"], "cache": cache, **out}


def _uids(folder: str) -> set[str]:
    return set(array_to_uids(np.load(os.path.join(folder, "uids.npy"))))


def test_diff_is_set_arithmetic_and_names_the_separating_rules(two):
    d = diff(two["worded"], two["shaped"], languages=False)
    a, b = _uids(two["worded"]), _uids(two["shaped"])
    row_a, row_b = d["summary"].iloc[0], d["summary"].iloc[1]
    assert (row_a["rows"], row_a["only here"], row_a["in both"]) == (len(a), len(a - b), len(a & b))
    assert (row_b["rows"], row_b["only here"]) == (len(b), len(b - a))
    only_a = d["rules"]["only in A, dropped by B's"]
    assert only_a["rows"].sum() == len(a - b) > 0
    assert set(only_a["rule"]) <= {"-inf <= aspect_ratio_score <= 3", "200 <= min_side_score <= inf"}
    assert d["rules"]["only in B, dropped by A's"]["rows"].sum() == len(b - a)
    assert "diff of worded (A) and shaped (B)" in format_text(d)


def test_every_group_breakdown_sums_to_the_totals(two, tmp_path):
    d = diff(two["worded"], two["shaped"], by=["status"])
    groups = d["groups"]
    ok = int(d["states"].set_index("state").loc["ok", "pool"])
    kinds = set(groups["by"])
    assert kinds == {"caption language", "host", "caption length", "image size (shorter side)", "status"}
    for kind in kinds:
        part = groups[groups["by"] == kind]
        assert part["candidates"].sum() == ok, kind
        assert part["in A"].sum() == len(_uids(two["worded"])) and part["in B"].sum() == len(_uids(two["shaped"]))
    with pytest.raises(UserError, match="no such column"):
        diff(two["worded"], two["shaped"], by=["not_a_column"], languages=False)
    from winnow.workflows.report import diff_html

    page = open(diff_html(d, str(tmp_path / "diff.html"))).read()
    assert "Who is kept, by group" in page and "data:image/jpeg" in page


def test_explain_names_the_state_the_score_and_the_rule(two):
    truth = read_truth(two["world"])
    short = truth[truth["defect"] == "short_caption"]["uid"].iloc[0]
    missing = truth[truth["defect"] == "http_404"]["uid"].iloc[0]
    docs = explain(two["pool"], [short, missing], subsets=[two["worded"]])
    d_short, d_404 = docs
    assert d_short["state"] == "ok" and d_short["scores"]["caption_words_score"] == 1
    rules = d_short["subsets"][0]["rules"]
    assert not d_short["subsets"][0]["kept"] and rules[-1]["rule"] == "3 <= caption_words_score <= inf"
    assert rules[-1]["passed"] is False and rules[-1]["value"] == 1
    assert d_404["state"] == "http_error" and "404" in d_404["reason"]
    assert d_404["subsets"][0]["rules"][0] == {"rule": "downloaded (state ok)", "passed": False}
    text = explain_text(docs)
    assert "DROPS it (value 1; needs >= 3)" in text and "http_error: HTTP Error 404" in text
    url = pd.read_parquet(os.path.join(two["world"], "urls.parquet"))
    by_url = explain(two["pool"], url=url[url["uid"] == short]["url"].item(), cache=two["cache"])
    assert [d["uid"] for d in by_url] == [short]


def test_the_python_api_returns_what_the_commands_print(two, capsys):
    import winnow

    truth = read_truth(two["world"])
    uid = truth[truth["defect"] == "short_caption"]["uid"].iloc[0]
    docs = winnow.explain(two["pool"], [uid], subset=[two["worded"]], json=True)
    assert docs[0]["uid"] == uid and docs[0]["subsets"][0]["kept"] is False
    assert '"uid": "' + uid in capsys.readouterr().out
    d = winnow.diff(two["worded"], two["shaped"], by=["status"])
    assert set(d["summary"]["subset"]) == {"worded", "shaped"}
