"""End to end: the tiny world served on 127.0.0.1, downloaded by img2dataset on a real Dask LocalCluster."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import webdataset as wds
from helpers import tiny_ingest_config

from winnow.pipeline.data import shards
from winnow.pipeline.data.ledger import STATES
from winnow.pipeline.data.manifest import read_manifest
from winnow.pipeline.data.pool import ledger, read_states
from winnow.pipeline.stages.ingest import ingest
from winnow.pipeline.synth.server import WebPoolServer
from winnow.pipeline.synth.world import expected_state, read_truth

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ingested(tiny_pool):
    return tiny_pool


def test_every_input_row_has_exactly_one_state(ingested):
    counts, total = ledger(ingested["pool"])
    assert total == 240 and sum(counts.values()) == 240
    assert set(counts) <= set(STATES)
    states = read_states(ingested["pool"])
    assert states["uid"].is_unique and len(states) == 240


def test_every_planted_defect_ends_in_its_expected_state(ingested):
    truth = read_truth(ingested["world"]).merge(read_states(ingested["pool"]), on="uid", how="left")
    truth["expected"] = [expected_state(d, ingested["config"].min_image_size) for d in truth["defect"]]
    wrong = truth[truth["state"] != truth["expected"]]
    assert wrong.empty, wrong[["defect", "expected", "state"]].to_string()
    for defect in ("http_404", "http_500", "slow", "hang", "corrupt", "truncated", "not_image", "bomb",
                   "pixel_image"):
        assert (truth["defect"] == defect).any(), f"{defect} not planted in the tiny world"


def test_shards_follow_the_datacomp_contract(ingested):
    pool = ingested["pool"]
    ids = shards.list_shards(pool)
    assert ids == list(range(4))  # 240 rows / 60 per shard, numbered from 0
    urls = pd.read_parquet(os.path.join(ingested["world"], "urls.parquet"))
    for i in ids:
        table = shards.read_table(pool, i)
        stats = shards.read_stats(pool, i)
        assert {"uid", "key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                "original_height", "sha256", "state"} <= set(table.columns)
        assert stats["count"] == len(table) == 60
        assert list(table["key"]) == [f"{i:08d}{r:02d}" for r in range(60)]  # img2dataset keys, input order
        # uids are carried from the input, row for row
        assert list(table["uid"]) == list(urls["uid"].iloc[i * 60:(i + 1) * 60])
        ok = table[table["state"] == "ok"].set_index("key")
        samples = list(wds.WebDataset(shards.paths(pool, i)["tar"], shardshuffle=False).decode("pil"))
        assert stats["successes"] == len(samples) == len(ok)
        for s in samples:
            row = ok.loc[s["__key__"]]
            assert s["json"]["uid"] == row["uid"] and s["txt"] == row["caption"]
            w, h = s["jpg"].size
            assert (w, h) == (row["width"], row["height"]) and max(w, h) <= 512
            if max(row["original_width"], row["original_height"]) <= 512:  # never upscaled
                assert (w, h) == (row["original_width"], row["original_height"])
    resized = pd.concat(shards.read_table(pool, i) for i in ids).query("state == 'ok' and original_width > 512")
    assert len(resized) > 0  # the world has images above 512 px, so resizing was exercised


def test_manifest_records_provenance_and_a_rerun_is_skipped(ingested, local_cluster, tiny_world):
    doc = read_manifest(ingested["pool"])
    assert doc["stage"] == "ingest" and doc["rows"]["input"] == 240
    assert doc["rows"]["ok"] + doc["rows"]["failed"] == 240
    assert doc["inputs"][0]["fingerprint"].startswith("sha256:") and doc["params"]["shard_size"] == 60
    assert {o["path"] for o in doc["outputs"]} >= {"00000000.tar", "00000000.parquet", "00000000_stats.json"}
    assert all(o["size"] > 0 for o in doc["outputs"])
    assert not os.path.exists(os.path.join(ingested["pool"], "_inputs"))
    messages = []
    again = ingest(os.path.join(tiny_world["path"], "urls.parquet"), ingested["pool"], ingested["config"],
                   local_cluster, log=messages.append)
    assert any("up to date" in m for m in messages) and json.dumps(again) == json.dumps(doc)


def test_uids_are_derived_when_the_input_has_none(tmp_path, tiny_world, local_cluster):
    from winnow.pipeline.data.uid import derive_uid

    urls = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet")).iloc[:20]
    truth = read_truth(tiny_world["path"]).set_index("uid")
    keep = [u for u in urls["uid"] if truth.loc[u, "defect"] not in ("hang", "slow")]
    urls = urls[urls["uid"].isin(keep)]
    rows = urls.drop(columns=["uid"])
    rows.loc[rows.index[0], "url"] = None  # a row with no url at all
    src = tmp_path / "urls.jsonl"
    rows.to_json(src, orient="records", lines=True)
    pool = str(tmp_path / "pool")
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        ingest(str(src), pool, tiny_ingest_config(), local_cluster, log=lambda m: None)
    table = shards.read_table(pool, 0)
    assert list(table["uid"]) == [derive_uid(u or "", t) for u, t in zip(rows["url"], rows["text"])]
    assert table["state"].iloc[0] == "bad_url"


def test_invalid_input_uids_are_recorded_not_downloaded(tmp_path, tiny_world, local_cluster):
    truth = read_truth(tiny_world["path"])
    urls = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet"))
    good = urls[(truth["defect"] == "none").to_numpy()].iloc[:6].copy()
    good.loc[good.index[:2], "uid"] = ["not-a-uid", "1" * 40]
    good.to_csv(tmp_path / "urls.csv", index=False)
    pool = str(tmp_path / "pool")
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        ingest(str(tmp_path / "urls.csv"), pool, tiny_ingest_config(), local_cluster, log=lambda m: None)
    table = shards.read_table(pool, 0)
    assert list(table["state"]) == ["bad_uid", "bad_uid", "ok", "ok", "ok", "ok"]
    assert "not-a-uid" in table["error_message"].iloc[0]
    assert table["uid"].str.fullmatch("[0-9a-f]{32}").all()
    assert shards.read_stats(pool, 0)["successes"] == 4


def test_same_command_runs_on_an_existing_scheduler(tmp_path, tiny_world):
    """`--scheduler ADDRESS` submits the same stages to a cluster the command did not start."""

    from dask.distributed import LocalCluster

    urls = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet"))
    truth = read_truth(tiny_world["path"])
    urls[(truth["defect"] == "none").to_numpy()].iloc[:10].to_parquet(tmp_path / "urls.parquet")
    pool = tmp_path / "pool"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "ingest", str(tmp_path / "urls.parquet"),
                                 str(pool), "--scheduler", cluster.scheduler_address, "--set", "ingest.timeout=5",
                                 "--set", "ingest.deadline=10", "--set", "ingest.stall_seconds=30",
                                 "--set", "ingest.allow_hosts=[127.0.0.1]"],
                                capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"connected to Dask scheduler {cluster.scheduler_address}" in result.stderr
    assert "Dask dashboard at http" in result.stderr
    assert "ok + failed" in result.stdout and shards.read_stats(str(pool), 0)["successes"] == 10


def test_tar_samples_are_in_key_order_whatever_order_downloads_finished(ingested):
    """Downloads finish in any order; the pool's tars do not depend on it (so resharding and training on them
    are repeatable)."""
    for i in shards.list_shards(ingested["pool"]):
        keys = [s["__key__"] for s in shards.iter_tar(shards.paths(ingested["pool"], i)["tar"])]
        assert keys == sorted(keys) and len(keys) == shards.read_stats(ingested["pool"], i)["successes"]
