"""A run killed in the middle of ingest, then rerun, yields the same shards as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import yaml
from helpers import tiny_ingest_config

from pipeline.data import shards
from pipeline.stages.ingest import ingest
from pipeline.synth.server import WebPoolServer

pytestmark = pytest.mark.e2e


def _samples(pool):
    """key -> (uid, state, jpg bytes, txt bytes) over the whole pool."""
    out = {}
    for i in shards.list_shards(pool):
        table = shards.read_table(pool, i).set_index("key")
        for key, row in table.iterrows():
            out[key] = (row["uid"], row["state"], None, None)
        for s in shards.iter_tar(shards.paths(pool, i)["tar"]):
            uid, state, _, _ = out[s["__key__"]]
            out[s["__key__"]] = (uid, state, s["jpg"], s["txt"])
    return out


def test_killed_ingest_resumes_without_redoing_finished_shards(tiny_world, local_cluster, tmp_path):
    urls = os.path.join(tiny_world["path"], "urls.parquet")
    cfg = tiny_ingest_config(shard_size=30)  # 8 shards
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"ingest": asdict(cfg)}))
    killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        ingest(urls, reference, cfg, local_cluster, log=lambda m: None)

        proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "ingest", urls, killed, "--config",
                                 str(config_file), "--workers", "2"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = [n for n in os.listdir(killed)] if os.path.isdir(killed) else []
            if any(n.endswith("_stats.json") for n in done):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the command, its Dask workers and their download processes
        proc.wait()

        committed = [i for i in range(8) if os.path.exists(shards.paths(killed, i)["stats"])]
        assert 1 <= len(committed) < 8, "the kill should land in the middle of the run"
        assert not os.path.exists(os.path.join(killed, "_manifest.json"))
        before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
                  for i in committed for p in shards.paths(killed, i).values()}

        messages = []
        ingest(urls, killed, cfg, local_cluster, log=messages.append)

    assert any(f"resuming: {len(committed)} of 8 shards already done" in m for m in messages)
    after = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before}
    assert after == before, "finished shards were rewritten"
    assert _samples(killed) == _samples(reference)
    assert sorted(os.listdir(killed)) == sorted(os.listdir(reference))
