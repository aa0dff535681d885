"""Safety of every command a user runs: --overwrite never deletes an input or someone else's files, unfinished
pools are refused, and failures end in one line naming the cause and the fix."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import make_pool

from winnow.pipeline.data import manifest
from winnow.pipeline.data.uid import uids_to_array
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.register import register

pytestmark = pytest.mark.e2e  # real CLI processes, loopback servers, a Dask cluster, mounted disks

UIDS = [f"{i:032x}" for i in range(1, 7)]


def winnow(*args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "winnow.workflows.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240, **kw)


def one_line(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]  # progress lines may come before it
    assert errors == lines[-1:] and lines[-1].startswith("winnow: error: "), result.stderr
    assert "Traceback" not in result.stderr and max(len(line) for line in lines) < 500
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture()
def pool(tmp_path):
    path = make_pool(tmp_path / "pool", UIDS)
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        register(path, runner, log=lambda m: None)
    np.save(tmp_path / "uids.npy", uids_to_array(UIDS[:4]))
    return path


def listing(path):
    return sorted(os.listdir(path))


# ------------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_never_deletes_the_url_list(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "text": ["a"]}).to_parquet(folder / "urls.parquet")
    one_line(winnow("ingest", str(folder / "urls.parquet"), str(folder), "--overwrite"), 2,
             "holds this command's input", "choose another output folder")
    assert listing(folder) == ["urls.parquet"]


def test_overwrite_never_deletes_inside_the_url_list_folder(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "text": ["a"]}).to_parquet(folder / "urls.parquet")
    manifest.StageRun("ingest", str(folder / "pool"), params={"an": "older run"}).open()
    manifest.unlock(str(folder / "pool"))  # that older run has ended
    one_line(winnow("ingest", str(folder), str(folder / "pool"), "--overwrite"), 2,
             "inside this command's input folder", "choose another output folder")
    assert listing(folder / "pool") == ["_run.json"]


def test_overwrite_never_deletes_the_pool_being_resharded(pool, tmp_path):
    before = listing(pool)
    for out in (pool, str(tmp_path)):  # the pool itself, and a folder holding it
        one_line(winnow("reshard", pool, str(tmp_path / "uids.npy"), out, "--overwrite", "--scheduler", "sync"), 2,
                 "holds this command's input")
    assert listing(pool) == before


def test_overwrite_never_deletes_a_file(pool, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    one_line(winnow("reshard", pool, str(tmp_path / "uids.npy"), str(target), "--overwrite", "--scheduler", "sync"),
             2, "is a file")
    assert target.read_text() == "mine"


def test_overwrite_never_deletes_another_stages_output(pool, tmp_path):
    other = make_pool(tmp_path / "other", UIDS[:2])
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        register(other, runner, log=lambda m: None)
    before = listing(other)
    one_line(winnow("reshard", pool, str(tmp_path / "uids.npy"), other, "--overwrite", "--scheduler", "sync"), 2,
             "register output, not a reshard output")
    assert listing(other) == before


def test_overwrite_replaces_an_output_of_its_own_stage(pool, tmp_path):
    out = str(tmp_path / "shards")
    assert winnow("reshard", pool, str(tmp_path / "uids.npy"), out, "--scheduler", "sync").returncode == 0
    line = one_line(winnow("reshard", pool, str(tmp_path / "uids.npy"), out, "--shard-size", "2",
                           "--scheduler", "sync"), 2, "different run", "--overwrite")
    assert "choose another output folder" in line
    result = winnow("reshard", pool, str(tmp_path / "uids.npy"), out, "--shard-size", "2", "--overwrite",
                    "--scheduler", "sync")
    assert result.returncode == 0, result.stderr
    assert json.load(open(os.path.join(out, "meta.json")))["output_shard_count"] == 2


# ------------------------------------------------------------------------------------------- unfinished pools
@pytest.fixture()
def unfinished(tmp_path):
    """A pool whose ingest stopped after one of three shards (as a full disk or a kill leaves it)."""
    path = str(tmp_path / "half")
    manifest.StageRun("ingest", path, params={}).open()
    make_pool(path, UIDS)
    os.makedirs(os.path.join(path, "_inputs"))
    with open(os.path.join(path, "_inputs", "_split.json"), "w") as f:
        json.dump({"rows": 18, "shards": 3, "shard_size": 6}, f)
    np.save(tmp_path / "uids.npy", uids_to_array(UIDS[:4]))
    return path


def test_ledger_says_an_ingest_is_unfinished(unfinished):
    result = winnow("ledger", unfinished)
    assert result.returncode == 0, result.stderr
    assert "ingest unfinished: 1 of 3 shards done" in result.stdout


@pytest.mark.parametrize("command", [
    ["embed", "{pool}", "--model", "winnow-tiny-clip", "--pretrained", "", "--tag", "t"],
    ["subset", "no_filter", "--pool", "{pool}", "--out", "{tmp}/subset"],
    ["dedup", "{pool}", "--tag", "t"],
    ["reshard", "{pool}", "{tmp}/uids.npy", "{tmp}/shards"],
])
def test_later_stages_refuse_an_unfinished_pool(unfinished, tmp_path, command):
    args = [a.format(pool=unfinished, tmp=tmp_path) for a in command]
    one_line(winnow(*args, "--scheduler", "sync"), 2, "ingest unfinished: 1 of 3 shards done", "--allow-partial")


def test_allow_partial_uses_the_finished_shards(unfinished, tmp_path):
    result = winnow("reshard", unfinished, str(tmp_path / "uids.npy"), str(tmp_path / "shards"), "--allow-partial",
                    "--scheduler", "sync")
    assert result.returncode == 0, result.stderr
    assert "4 samples" in result.stdout


# ------------------------------------------------------------------------------------------- one-line failures
def test_a_python_tag_in_a_recipe_is_one_line_and_never_runs(tmp_path):
    canary = tmp_path / "PWNED"
    (tmp_path / "evil.yaml").write_text(f'filters: !!python/object/apply:os.system ["touch {canary}"]\n')
    one_line(winnow("subset", str(tmp_path / "evil.yaml"), "--pool", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--scheduler", "sync"), 2, "not valid YAML", "!!python")
    assert not canary.exists()


def test_a_pickled_npy_is_one_line_and_never_unpickled(pool, tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "r.yaml").write_text(f"select:\n  - exclude_uids: {tmp_path / 'evil.npy'}\n")
    one_line(winnow("subset", str(tmp_path / "r.yaml"), "--pool", pool, "--out", str(tmp_path / "o"),
                    "--scheduler", "sync"), 2, "evil.npy", "pickled")
    one_line(winnow("reshard", pool, str(tmp_path / "evil.npy"), str(tmp_path / "s"), "--scheduler", "sync"), 2,
             "pickled")


def test_an_input_without_captions_is_refused_unless_said_so(tmp_path):
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "alt": ["a"]}).to_parquet(tmp_path / "u.parquet")
    one_line(winnow("ingest", str(tmp_path / "u.parquet"), str(tmp_path / "p")), 2, "no caption column",
             "ingest.caption_col", "ingest.no_captions")


def test_a_run_that_downloads_nothing_exits_non_zero_with_a_hint(tmp_path):

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pd.DataFrame({"url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(3)],
                  "text": ["a", "b", "c"]}).to_parquet(tmp_path / "u.parquet")
    result = winnow("ingest", str(tmp_path / "u.parquet"), str(tmp_path / "p"), "--scheduler", "sync",
                    "--set", "ingest.allow_hosts=[127.0.0.1]", "--set", "ingest.retries=0")
    one_line(result, 1, "no row of 3 was downloaded", "connection_error 3", "is the server reachable?")
    assert "ok + failed" in result.stdout  # the ledger is still shown


def _quick_urls(tiny_world) -> pd.DataFrame:
    """The tiny world's URL list without the rows that answer slowly on purpose."""
    from winnow.pipeline.synth.world import read_truth

    urls = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet"))
    return urls[~read_truth(tiny_world["path"])["defect"].isin(["hang", "slow"]).to_numpy()]


def test_a_write_failure_inside_a_worker_is_one_line(tmp_path, tiny_world):
    """Writes fail in the download process (a file size limit stands in for a full disk): one line naming the
    shard and the cause, not one traceback per sample and not a task repr."""

    from winnow.pipeline.synth.server import WebPoolServer

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    urls = _quick_urls(tiny_world).iloc[:40]
    urls.to_parquet(tmp_path / "u.parquet")
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        result = winnow("ingest", str(tmp_path / "u.parquet"), str(tmp_path / "p"), "--workers", "1",
                        "--set", "ingest.allow_hosts=[127.0.0.1]", "--set", "ingest.timeout=5",
                        "--set", "ingest.deadline=10", "--set", "ingest.stall_seconds=30", preexec_fn=limit)
    line = one_line(result, 1, "shard 00000000", "File too large", "finished shards are kept")
    assert "ShardTask(" not in line and len(line) < 400


@pytest.fixture()
def mounted(tmp_path):
    """Mount a small tmpfs with the given options (read-only, or a few KB to fill): a real full or read-only
    disk. Needs the right to mount (root here); skipped with the reason elsewhere."""
    mounts = []

    def mount(options: str):
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_read_only_output_folder_is_one_line(tmp_path, mounted):
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "text": ["a"]}).to_parquet(tmp_path / "u.parquet")
    target = mounted("ro,size=1m")
    line = one_line(winnow("ingest", str(tmp_path / "u.parquet"), str(target / "pool"), "--scheduler", "sync"), 1,
                    "cannot write", "Read-only file system", "choose a writable output folder")
    assert "rerun" not in line


def test_a_full_disk_is_one_line_and_keeps_finished_shards(tmp_path, tiny_world, mounted):
    from winnow.pipeline.synth.server import WebPoolServer

    urls = _quick_urls(tiny_world).iloc[:60]
    urls.to_parquet(tmp_path / "u.parquet")
    disk = mounted("size=1500k")
    pool = disk / "pool"
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        result = winnow("ingest", str(tmp_path / "u.parquet"), str(pool), "--scheduler", "sync",
                        "--set", "ingest.shard_size=5", "--set", "ingest.allow_hosts=[127.0.0.1]",
                        "--set", "ingest.timeout=5", "--set", "ingest.deadline=10", "--set", "ingest.stall_seconds=30")
    one_line(result, 1, "disk full", "No space left on device", "finished shards are kept", "rerun")
    finished = [n for n in os.listdir(pool) if n.endswith("_stats.json")]
    assert finished and not os.path.exists(pool / "_manifest.json")
    for name in finished:  # every shard that says it is finished is whole
        stem = name[: -len("_stats.json")]
        assert os.path.getsize(pool / f"{stem}.tar") > 0 and os.path.getsize(pool / f"{stem}.parquet") > 0


# ----------------------------------------------------------------------------------- what training is handed
def test_reshard_never_writes_one_key_twice(tmp_path):
    """Two pool rows with one uid (a pool made before ingest refused repeated uids, or adopted from elsewhere):
    the first in pool order is the sample, so webdataset (and open_clip_train) can read the tar."""
    import webdataset as wds

    from winnow.pipeline.stages.reshard import reshard

    uids = [UIDS[0], UIDS[1], UIDS[0], UIDS[2]]
    pool = make_pool(tmp_path / "pool", uids, captions=["first", "b", "second", "c"])
    np.save(tmp_path / "uids.npy", uids_to_array([UIDS[0], UIDS[0], UIDS[2]]))  # listed twice: two samples
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        doc = reshard(pool, str(tmp_path / "uids.npy"), str(tmp_path / "out"), runner, log=lambda m: None)
    assert doc["rows"]["repeated_pool_uids"] == 1 and doc["rows"]["samples"] == 3
    samples = list(wds.WebDataset(str(tmp_path / "out" / "00000000.tar"), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted([f"{UIDS[0]}-0", f"{UIDS[0]}-1", f"{UIDS[2]}-0"])
    assert {s["txt"] for s in samples if s["__key__"].startswith(UIDS[0])} == {b"first"}


def test_training_refuses_shards_whose_captions_are_all_empty(tmp_path):
    from winnow.pipeline.core.errors import UserError
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.train import check_shards

    pool = make_pool(tmp_path / "pool", UIDS, captions=[""] * len(UIDS))
    np.save(tmp_path / "uids.npy", uids_to_array(UIDS))
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        reshard(pool, str(tmp_path / "uids.npy"), str(tmp_path / "out"), runner, shard_size=2, log=lambda m: None)
        with pytest.raises(UserError, match="every caption .* is empty.*ingest.caption_col"):
            check_shards(str(tmp_path / "out"))
        captioned = make_pool(tmp_path / "pool2", UIDS, captions=[""] * 5 + ["one caption"])
        reshard(captioned, str(tmp_path / "uids.npy"), str(tmp_path / "out2"), runner, shard_size=2,
                log=lambda m: None)
    assert check_shards(str(tmp_path / "out2"))[1] == len(UIDS)
