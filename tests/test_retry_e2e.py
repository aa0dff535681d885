"""``winnow ingest --retry``: after a run in which a flaky server failed some rows, only those rows are fetched
again, every other tar member stays byte-identical, and the stages that used the pool are redone by their next
run (and only then)."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import fields

import pandas as pd
import pytest
from helpers import free_port, tiny_ingest_config

from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.explain import explain
from winnow.pipeline.stages.ingest import ingest
from winnow.pipeline.stages.retry import expand, retry
from winnow.pipeline.stages.subset import subset
from winnow.pipeline.synth.server import WebPoolServer
from winnow.pipeline.synth.world import DefectRates, SynthConfig, build_world

pytestmark = pytest.mark.e2e
RECIPE = {"name": "worded", "filters": [{"key": "caption_words"}],
          "select": [{"threshold": {"column": "caption_words_score", "min": 1}}]}


def _members(pool: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(pool)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(pool, name)) as tar:
                out |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


def _table(pool: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(os.path.join(pool, n)) for n in sorted(os.listdir(pool))
                      if n.endswith(".parquet")], ignore_index=True)


@pytest.fixture(scope="module")
def flaky(tmp_path_factory, local_cluster):
    port = free_port()
    zero = {f.name: 0.0 for f in fields(DefectRates) if f.name not in ("bomb", "hang")}
    cfg = SynthConfig(seed=5, n_pool=90, n_clean=4, n_eval_per_class=1, base_url=f"http://127.0.0.1:{port}",
                      chunk_size=90, rates=DefectRates(**zero, bomb=0, hang=0))
    world, pool = str(tmp_path_factory.mktemp("flaky-world")), str(tmp_path_factory.mktemp("flaky-pool"))
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        build_world(cfg, world, runner, log=lambda m: None)
    routes_path = os.path.join(world, "site", "routes.json")
    flaky_paths = [f"/img/{i:07d}.jpg" for i in (3, 17, 31, 32, 48)]  # shards 0 (3, 17) and 1 (31, 32, 48)
    json.dump({p: {"flaky": 1} for p in flaky_paths} | {"/img/0000040.jpg": {"status": 404}}, open(routes_path, "w"))
    icfg = tiny_ingest_config(shard_size=30)
    cache = str(tmp_path_factory.mktemp("cache"))
    logs: list[str] = []
    with WebPoolServer(world, port=port) as server:
        ingest(os.path.join(world, "urls.parquet"), pool, icfg, local_cluster, log=lambda m: None)
        before = {"table": _table(pool), "members": _members(pool),
                  "files": {n: open(os.path.join(pool, n), "rb").read() for n in os.listdir(pool)
                            if n.startswith("00000002")}}
        made_before = subset(RECIPE, pool, os.path.join(pool, "..", "sub-before"), local_cluster, cache=cache,
                             log=lambda m: None)
        doc = retry(pool, None, local_cluster, log=logs.append)
        hits = dict(server.hits)
    return {"pool": pool, "before": before, "doc": doc, "hits": hits, "flaky": flaky_paths, "cache": cache,
            "made_before": made_before, "logs": logs, "cluster": local_cluster}


def test_the_flaky_rows_failed_first(flaky):
    table = flaky["before"]["table"]
    failed = table[table["url"].str.endswith(tuple(flaky["flaky"]))]
    assert list(failed["state"]) == ["http_error"] * 5 and failed["error_message"].str.contains("503").all()


def test_retry_recovers_exactly_those_rows(flaky):
    before, after = flaky["before"]["table"], _table(flaky["pool"])
    assert list(after["uid"]) == list(before["uid"]) and list(after["key"]) == list(before["key"])
    changed = after["state"] != before["state"]
    assert sorted(after.loc[changed, "url"].str[-16:]) == sorted(p[-16:] for p in flaky["flaky"])
    assert (after.loc[changed, "state"] == "ok").all()
    assert (after.loc[changed, "attempts"] == 2).all() and (after.loc[changed, "previous_states"] == "http_error").all()
    assert after.loc[after["url"].str.endswith("/img/0000040.jpg"), "state"].item() == "http_error"  # a 404 stays
    assert flaky["hits"][("127.0.0.1", "/img/0000040.jpg")] == 1  # and is not asked again
    assert flaky["doc"]["rows"]["ok"] == int((after["state"] == "ok").sum()) == int((before["state"] == "ok").sum()) + 5
    assert flaky["doc"]["retries"][-1] | {"time": None} == {"time": None, "states": list(expand(None)),
                                                           "retried": 5, "recovered": 5}


def test_every_other_tar_member_is_byte_identical(flaky):
    before, after = flaky["before"]["members"], _members(flaky["pool"])
    assert {k: after[k] for k in before} == before
    added = set(after) - set(before)
    assert len(added) == 5 * 3  # jpg, json, txt of each recovered sample
    untouched = flaky["before"]["files"]  # shard 2 had no flaky row: its files were not rewritten
    assert untouched and all(open(os.path.join(flaky["pool"], n), "rb").read() == b for n, b in untouched.items())


def test_a_subset_made_before_is_redone_and_then_reused(flaky):
    out = os.path.join(flaky["pool"], "..", "sub-before")
    lines: list[str] = []
    again = subset(RECIPE, flaky["pool"], out, flaky["cluster"], cache=flaky["cache"], log=lines.append)
    assert any("redoing" in line for line in lines)
    assert again["kept"] == flaky["made_before"]["kept"] + 5
    lines.clear()
    subset(RECIPE, flaky["pool"], out, flaky["cluster"], cache=flaky["cache"], log=lines.append)
    assert any("up to date" in line for line in lines) and not any("redoing" in line for line in lines)


def test_explain_shows_the_attempts(flaky):
    table = _table(flaky["pool"])
    uid = table.loc[table["url"].str.endswith(flaky["flaky"][0]), "uid"].item()
    doc = explain(flaky["pool"], [uid], cache=flaky["cache"])[0]
    assert doc["state"] == "ok" and doc["attempts"]["attempts"] == 2
    assert doc["attempts"]["previous_states"] == "http_error"


def test_retry_names_bad_states_and_needs_a_finished_pool(tmp_path):
    from winnow.pipeline.core.errors import UserError

    with pytest.raises(UserError, match="not a state"):
        expand(["timeuot"])
    with pytest.raises(UserError, match="needs a pool that winnow ingest finished"):
        retry(str(tmp_path), None, None)
