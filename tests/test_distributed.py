"""Training with several processes (torch.distributed, gloo on the CPU, started by torchrun): the global batch stays
the scale's, the same seed and process count give the same weights, a rank that dies ends the run with one line
naming it, and --resume finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import psutil
import pytest
import torch
from helpers import make_pool

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.reshard import reshard
from winnow.pipeline.stages.subset import write_subset
from winnow.pipeline.stages.train import Launch, TrainConfig, train

pytestmark = pytest.mark.e2e

TINY = TrainConfig(samples_seen=256, batch_size=32, warmup=2, epochs=2, seed=0)  # 8 global steps of 32
TWO = replace(TINY, processes=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    uids = []
    for s in range(3):
        ids = [f"{s * 1000 + i + 1:032x}" for i in range(100)]
        make_pool(root / "pool", ids, [f"a {['red', 'green', 'blue'][i % 3]} square {i}" for i in range(100)], s)
        uids += ids
    write_subset(str(root / "sub"), uids, {})
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        reshard(str(root / "pool"), str(root / "sub" / "uids.npy"), str(root / "shards"), runner, shard_size=64,
                log=lambda m: None)
    return str(root / "shards")


def _weights(ckpt: str) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_processes_keep_the_global_batch_and_repeat_their_weights(shards, tmp_path):
    said = []
    first = train(shards, str(tmp_path), "two-a", TWO, launch=Launch(nproc_per_node=2), log=said.append)
    assert any("global batch 32 = 16 per process x 2 process(es) x 1 accumulation step(s)" in m and "gloo" in m
               for m in said), said
    manifest = json.load(open(os.path.join(tmp_path, "two-a", "_manifest.json")))
    assert manifest["params"]["batch_size"] == TINY.batch_size and manifest["params"]["processes"] == 2
    args = open(os.path.join(tmp_path, "two-a", "params.txt")).read()
    assert "batch_size: 16" in args and "world_size: 2" in args and "local_loss: True" in args
    second = train(shards, str(tmp_path), "two-b", TWO, launch=Launch(nproc_per_node=2), log=lambda m: None)
    assert _same(_weights(first), _weights(second))  # same seed, same process count: the same weights
    one = train(shards, str(tmp_path), "one", TINY, log=lambda m: None)
    assert not _same(_weights(first), _weights(one))  # other ranks draw other batches

    from winnow.pipeline.models.registry import load

    net, _, _ = load("", first)  # the checkpoint loads as the model its run recorded
    assert sum(p.numel() for p in net.parameters()) > 0


def test_a_batch_that_cannot_be_split_or_a_wrong_process_count_is_one_line(shards, tmp_path):
    with pytest.raises(UserError, match="global batch of 32 cannot be split into 3 process"):
        replace(TINY, processes=3)
    with pytest.raises(UserError, match="the config asks for 2 training process\\(es\\), this launch has 1"):
        train(shards, str(tmp_path), "x", TWO, log=lambda m: None)


def test_a_rank_that_dies_is_named_in_one_line_and_resume_finishes_the_run(shards, tmp_path):
    """Rank 1 is SIGKILLed (as the OOM killer does) once the first epoch's checkpoint exists; the run ends with one
    line naming it; --resume continues from that checkpoint and ends with the weights of an uninterrupted run."""
    cfg = replace(TWO, samples_seen=2048)  # 64 steps in 2 epochs: seconds to act between the two checkpoints
    logs = str(tmp_path / "logs")
    code = (f"import sys\nfrom winnow.pipeline.stages.train import Launch, TrainConfig, train\n"
            f"from winnow.pipeline.core.errors import RunFailed\ntry:\n"
            f"    train({shards!r}, {logs!r}, 'cut', TrainConfig(**{asdict(cfg)!r}), launch=Launch(2), "
            f"log=lambda m: None)\nexcept RunFailed as exc:\n    print('FAILED', exc)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    first = os.path.join(logs, "cut", "checkpoints", "epoch_1.pt")
    deadline = time.monotonic() + 300
    while not os.path.exists(first) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "winnow.pipeline.training.train_entry" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert victims, "rank 1 was not found"
    victims[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
    assert len(lines) == 1 and "training rank 1 (local rank 1) was killed by SIGKILL" in lines[0], out
    assert "--resume" in lines[0] and "--nproc-per-node 2" in lines[0]
    assert not os.path.exists(os.path.join(logs, "cut", "checkpoints", "epoch_2.pt"))
    resumed = train(shards, logs, "cut", cfg, resume=True, launch=Launch(2), log=lambda m: None)
    whole = train(shards, logs, "whole", cfg, launch=Launch(2), log=lambda m: None)
    assert _same(_weights(resumed), _weights(whole))
