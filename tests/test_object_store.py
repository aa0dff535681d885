"""Object stores and remote workers: the chain ingest -> ledger -> embed -> subset -> dedup -> reshard on s3://
against a real S3 API server (moto's, on 127.0.0.1) gives the local run's outputs; an exception or a kill
mid-write leaves no object under the final name; workers started in another folder read and write the same
files as the command's own folder names them."""

import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pytest
from helpers import free_port, tiny_ingest_config

from winnow.pipeline.core import fsio
from winnow.pipeline.data import shards

pytestmark = pytest.mark.e2e
BIN = os.path.dirname(sys.executable)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stdout.read() if proc.stdout else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {port} within {timeout} s")


@pytest.fixture(scope="module")
def bucket():
    """moto's S3 server on the port conftest put in AWS_ENDPOINT_URL (the workers inherited it), one bucket."""
    import s3fs

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proc = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "moto_server")
        s3fs.S3FileSystem().mkdir("winnow-test")
        yield "s3://winnow-test"
    finally:
        proc.terminate()
        proc.wait(30)


def same_files(local: str, remote: str, names: list[str]) -> None:
    for name in names:
        a, b = fsio.read_bytes(fsio.join(local, name)), fsio.read_bytes(fsio.join(remote, name))
        if name.endswith(".parquet"):
            assert pd.read_parquet(io.BytesIO(a)).equals(pd.read_parquet(io.BytesIO(b))), name
        elif name.endswith(".npz"):
            with np.load(io.BytesIO(a)) as za, np.load(io.BytesIO(b)) as zb:
                assert sorted(za.files) == sorted(zb.files) and all(
                    np.array_equal(za[k], zb[k], equal_nan=True) for k in za.files), name
        else:
            assert a == b, name


def test_the_chain_on_s3_gives_the_local_outputs(tiny_world, tiny_pool, local_cluster, bucket, tmp_path):
    from winnow.pipeline.data.pool import read_states
    from winnow.pipeline.stages.dedup import DedupConfig, dedup
    from winnow.pipeline.stages.embed import EmbedConfig, embed
    from winnow.pipeline.stages.ingest import ingest
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import subset
    from winnow.pipeline.synth.server import WebPoolServer

    def quiet(message):
        pass

    local, remote = tiny_pool["pool"], f"{bucket}/pool"
    world = tiny_world["path"]
    with WebPoolServer(world, port=tiny_world["port"]):
        ingest(os.path.join(world, "urls.parquet"), remote, tiny_ingest_config(), local_cluster, log=quiet)
    assert not [n for n in fsio.listdir(remote) if n.startswith("_tmp") or fsio.TMP_MARK in n]
    names = [n for n in os.listdir(local) if n.endswith((".tar", ".parquet"))]
    assert len(names) == 8
    same_files(local, remote, names)
    assert read_states(local).equals(read_states(remote))  # the ledger

    cfg = EmbedConfig(model="winnow-tiny-clip", pretrained="", tag="objstore", batch_size=32)
    outs = {}
    for where, pool in (("local", local), ("s3", remote)):
        embed(pool, cfg, local_cluster, log=quiet)
        sub = str(tmp_path / "basic") if where == "local" else f"{bucket}/subsets/basic"
        subset("basic", pool, sub, local_cluster, log=quiet)
        dd = str(tmp_path / "dedup") if where == "local" else f"{bucket}/dedup"
        dedup(pool, DedupConfig(tag="objstore"), local_cluster, out=dd, log=quiet)
        rs = str(tmp_path / "shards") if where == "local" else f"{bucket}/shards"
        reshard(pool, fsio.join(sub, "uids.npy"), rs, local_cluster, shard_size=50, log=quiet)
        outs[where] = {"sub": sub, "dedup": dd, "shards": rs}
    from winnow.pipeline.stages.ledger import report

    def mine(text):
        return [ln for ln in text.splitlines() if not ln.startswith("embed '") or "objstore" in ln]

    assert "embed 'objstore'" in report(remote) and mine(report(remote)) == mine(report(local))
    emb = [n for n in os.listdir(os.path.join(local, "embeddings", "objstore")) if n.endswith((".npz", ".parquet"))]
    same_files(os.path.join(local, "embeddings", "objstore"), f"{remote}/embeddings/objstore", emb)
    same_files(outs["local"]["sub"], outs["s3"]["sub"], ["uids.npy"])
    same_files(outs["local"]["dedup"], outs["s3"]["dedup"], ["duplicates.parquet"])
    tars = sorted(n for n in os.listdir(outs["local"]["shards"]) if n.endswith(".tar"))
    assert len(tars) >= 2
    same_files(outs["local"]["shards"], outs["s3"]["shards"], tars)
    assert not fsio.exists(f"{bucket}/dedup/_work")  # the dedup tasks' files are removed


def test_an_exception_mid_write_leaves_no_object(bucket):
    from winnow.pipeline.data.shards import TarWriter

    target = f"{bucket}/atomic/00000002.tar"
    with pytest.raises(RuntimeError, match="injected"), TarWriter(target) as tar:
        for i in range(50):
            tar.add(f"{i:04d}.txt", b"caption %d" % i)
            if i == 3:
                raise RuntimeError("injected")
    assert not fsio.exists(target) and fsio.listdir(f"{bucket}/atomic") == []
    with fsio.atomic_open(target, "wb") as f:  # and a completed write is there, whole
        f.write(b"x" * 1000)
    assert fsio.read_bytes(target) == b"x" * 1000


def test_a_killed_writer_leaves_no_object(bucket):
    target = f"{bucket}/killed/part.bin"
    code = ("import sys, time\nfrom winnow.pipeline.core import fsio\n"
            f"with fsio.atomic_open({target!r}, 'wb') as f:\n"
            "    f.write(b'y' * 100000)\n    print('writing', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not fsio.exists(target)


def test_workers_started_in_another_folder_read_and_write_the_commands_paths(tiny_pool, local_cluster, tmp_path):
    """A scheduler and two workers started in another folder; the command names the pool and its outputs with
    relative paths: the outputs land where the command's folder says, equal to a local run's."""

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_pool["pool"], home / "pool", ignore=shutil.ignore_patterns("embeddings", "dedup"))
    port = free_port()
    procs = [subprocess.Popen([os.path.join(BIN, "dask"), "scheduler", "--port", str(port), "--no-dashboard"],
                              cwd=elsewhere, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    try:
        wait_port(port, procs[0], "dask scheduler")
        procs.append(subprocess.Popen([os.path.join(BIN, "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers",
                                       "2", "--nthreads", "1", "--no-dashboard"], cwd=elsewhere,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        remote = ["--scheduler", f"tcp://127.0.0.1:{port}"]
        for argv in (["subset", "basic", "--pool", "pool", "--out", "sub"], ["reshard", "pool", "sub/uids.npy", "out",
                                                                            "--shard-size", "50"]):
            ran = subprocess.run([os.path.join(BIN, "winnow"), *argv, *remote], cwd=home, capture_output=True,
                                 text=True, timeout=300)
            assert ran.returncode == 0, ran.stderr
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
    assert not list(elsewhere.iterdir())  # nothing landed in the workers' folder
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import subset

    ref = str(home / "ref_sub")  # the reference: the same two steps on the local cluster, with absolute paths
    subset("basic", str(home / "pool"), ref, local_cluster, log=lambda m: None)
    reshard(str(home / "pool"), os.path.join(ref, "uids.npy"), str(home / "ref_out"), local_cluster, shard_size=50,
            log=lambda m: None)
    tars = sorted(n for n in os.listdir(home / "out") if n.endswith(".tar"))
    assert tars and [fsio.read_bytes(str(home / "out" / t)) for t in tars] == \
        [fsio.read_bytes(str(home / "ref_out" / t)) for t in tars]
    assert np.array_equal(np.load(home / "sub" / "uids.npy"), np.load(home / "ref_sub" / "uids.npy"))
    assert shards.list_shards(str(home / "out"))


def test_eval_sets_and_checkpoints_are_read_from_the_object_store(tiny_world, bucket, tmp_path):
    """What `evaluate`, dedup's decontamination and the eval-set builders read may live on the object store."""
    import s3fs
    import torch

    from winnow.pipeline.data.evalsets import labeled_files, read_evalset, read_labeled
    from winnow.pipeline.models.registry import load

    local = os.path.join(tiny_world["path"], "eval")
    s3fs.S3FileSystem().put(local, f"{bucket[5:]}/eval", recursive=True)
    a, b = read_evalset(local), read_evalset(f"{bucket}/eval")
    assert a["images"] == b["images"] and np.array_equal(a["labels"], b["labels"])
    assert a["classnames"] == b["classnames"] and a["templates"] == b["templates"] and a["classnames"]
    assert np.array_equal(read_labeled(f"{bucket}/eval")["labels"], a["labels"])
    assert len(labeled_files(f"{bucket}/eval")) == len(labeled_files(local))

    model, _, _ = load("winnow-tiny-clip", "", seed=5)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fsio.write_bytes(f"{bucket}/ckpt/epoch_1.pt", (tmp_path / "ckpt.pt").read_bytes())
    remote, _, _ = load("winnow-tiny-clip", f"{bucket}/ckpt/epoch_1.pt")
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), remote.state_dict().values()))
    from winnow.pipeline.core.errors import UserError

    with pytest.raises(UserError, match="checkpoint not found"):
        load("winnow-tiny-clip", f"{bucket}/ckpt/missing.pt")


def test_training_and_its_evaluation_read_and_write_the_object_store(tiny_world, tiny_pool, local_cluster, bucket,
                                                                     tmp_path):
    """Shards on s3://, --logs s3://: the checkpoint, out.log and params.txt are objects under the run's URL (no
    local folder named s3:), the printed checkpoint exists and evaluates, compare and report read the evaluation
    there, and no local staging outlives the run."""

    from winnow.pipeline.stages.evaluate import evaluate
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import subset
    from winnow.pipeline.stages.train import TrainConfig, train
    from winnow.pipeline.tasks import load_tasklist
    from winnow.workflows.compare import compare_runs
    from winnow.workflows.report import html_report

    quiet = lambda m: None  # noqa: E731
    sub = str(tmp_path / "sub")
    subset("no_filter", tiny_pool["pool"], sub, local_cluster, log=quiet)
    data = f"{bucket}/train-shards"
    reshard(tiny_pool["pool"], os.path.join(sub, "uids.npy"), data, local_cluster, shard_size=50, log=quiet)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "winnow-scratch-*")))
    cfg = TrainConfig(samples_seen=256, batch_size=32, warmup=2, epochs=2, seed=0)
    os.chdir(tmp_path)
    ckpt = train(data, f"{bucket}/runs", "s3run", cfg, log=quiet)
    assert ckpt == f"{bucket}/runs/s3run/checkpoints/epoch_2.pt" and fsio.exists(ckpt)
    for name in ("out.log", "params.txt", "checkpoints/epoch_1.pt", "_manifest.json"):
        assert fsio.exists(f"{bucket}/runs/s3run/{name}"), name
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "s3").exists()
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "winnow-scratch-*"))) <= before
    tasks = load_tasklist("demo", {"world": tiny_world["path"]})
    evaluate("", ckpt, tasks, f"{bucket}/runs/s3run/eval", log=quiet)
    assert train(data, f"{bucket}/runs", "s3run", cfg, log=quiet) == ckpt  # the same run again: reused
    text = compare_runs([f"{bucket}/runs/s3run"])
    assert text.startswith("subset") and "s3run" in text
    page = html_report([f"{bucket}/runs/s3run"], str(tmp_path / "r.html"), log=quiet)
    assert "s3run" in open(page).read()
