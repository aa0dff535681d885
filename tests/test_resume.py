"""A run killed in the middle of ingest, then rerun, yields the same shards as an uninterrupted run.

The kill lands at a chosen point: one row of shard 3 points at a loopback URL that answers only when released.
With one worker the shards run in order, so when that request arrives shards 0-2 are committed and 3-7 are not;
the whole command (its Dask workers and download processes too) is then killed with SIGKILL.
"""

import os
import signal
import subprocess
import sys
from dataclasses import asdict

import pandas as pd
import pytest
import yaml
from helpers import tiny_ingest_config

from winnow.pipeline.data import shards
from winnow.pipeline.stages.ingest import ingest
from winnow.pipeline.synth.hostile import HostileServer
from winnow.pipeline.synth.server import WebPoolServer
from winnow.pipeline.synth.world import read_truth

pytestmark = pytest.mark.e2e

SHARD, HELD = 25, 3  # rows per shard; the shard whose first row is held


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
    truth = read_truth(tiny_world["path"])
    rows = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet"))
    rows = rows[~truth["defect"].isin(["hang", "slow"]).to_numpy()].iloc[:8 * SHARD].reset_index(drop=True)
    cfg = tiny_ingest_config(shard_size=SHARD)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"ingest": asdict(cfg)}))
    killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]), HostileServer() as hold:
        rows.loc[HELD * SHARD, "url"] = f"{hold.url}/hold"
        rows.to_parquet(tmp_path / "urls.parquet")
        urls = str(tmp_path / "urls.parquet")
        proc = subprocess.Popen([sys.executable, "-m", "winnow.workflows.cli", "ingest", urls, killed, "--config",
                                 str(config_file), "--workers", "1"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert hold.held.wait(180), "the held row was never requested"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the command, its Dask worker and its download process
            proc.wait()
        committed = [i for i in range(8) if os.path.exists(shards.paths(killed, i)["stats"])]
        assert committed == list(range(HELD))
        assert not os.path.exists(os.path.join(killed, "_manifest.json"))
        before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
                  for i in committed for p in shards.paths(killed, i).values()}

        hold.release.set()
        ingest(urls, reference, cfg, local_cluster, log=lambda m: None)
        messages = []
        ingest(urls, killed, cfg, local_cluster, log=messages.append)

    assert any(f"resuming: {HELD} of 8 shards already done" in m for m in messages)
    after = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before}
    assert after == before, "finished shards were rewritten"
    assert _samples(killed) == _samples(reference)
    assert sorted(os.listdir(killed)) == sorted(os.listdir(reference))


def test_a_second_identical_ingest_is_refused_while_the_first_runs(tmp_path):
    """The same command twice into one pool at once: the second says which process holds the pool (it used to
    resume into it and delete the first one's scratch); the first finishes unharmed."""
    with HostileServer() as hold:
        urls = tmp_path / "urls.parquet"
        pd.DataFrame({"url": [f"{hold.url}/hold", f"{hold.url}/ok.jpg"], "text": ["held", "ok"]}).to_parquet(urls)
        cmd = [sys.executable, "-m", "winnow.workflows.cli", "ingest", str(urls), str(tmp_path / "pool"),
               "--workers", "1", "--allow-hosts", "127.0.0.1", "--set", "ingest.shard_size=1"]
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert hold.held.wait(180), "the held row was never requested"
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        finally:
            hold.release.set()
        _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"being written by another run (ingest, process {first.pid} on" in lines[0]
    assert [shards.read_table(str(tmp_path / "pool"), i)["state"].iloc[0] for i in (0, 1)] == ["ok", "ok"]
