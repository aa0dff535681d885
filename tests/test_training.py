"""Training: progress lines, resuming, repeatable weights and shards; model loading errors and warnings."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, replace

import pandas as pd
import pytest
from helpers import make_pool

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import shards
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.reshard import reshard
from winnow.pipeline.stages.subset import write_subset
from winnow.pipeline.stages.train import Progress, TrainConfig, train

COLORS = ["red", "green", "blue", "yellow", "black"]
TINY = TrainConfig(samples_seen=256, batch_size=32, warmup=2, epochs=2, seed=0)  # 8 steps of 32 in 2 epochs


def _pool(path, shard_count: int = 3, rows: int = 100) -> tuple[str, list[str]]:
    uids = []
    for s in range(shard_count):
        ids = [f"{s * 1000 + i + 1:032x}" for i in range(rows)]
        make_pool(path, ids, [f"a {COLORS[i % 5]} square number {i}" for i in range(rows)], shard_id=s)
        uids += ids
    return str(path), uids


def _reshard(pool: str, subset: str, out: str, shard_size: int = 64) -> dict:
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        return reshard(pool, subset, out, runner, shard_size=shard_size, log=lambda m: None)


def _files(folder: str) -> dict[str, bytes]:
    """The shards and their sizes (``meta.json`` names the input folders, ``_stats.json`` a duration)."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n.endswith(".tar") or n == "sizes.json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 captioned samples in 3 pool shards, one uid listed twice, resharded into 5 shards."""
    root = tmp_path_factory.mktemp("training")
    pool, uids = _pool(root / "pool")
    write_subset(str(root / "sub"), uids + uids[:1], {})
    _reshard(pool, str(root / "sub" / "uids.npy"), str(root / "shards"))
    return {"pool": pool, "subset": str(root / "sub" / "uids.npy"), "shards": str(root / "shards"), "root": root}


def test_reshard_gives_the_same_bytes_whatever_order_the_pool_rows_are_in(data, tmp_path):
    """A pool's parquet rows are in the order downloads finished; resharding follows (shard, key), so the same
    subset of the same samples gives byte-identical shards, and so does resharding twice."""
    shuffled = str(tmp_path / "pool")
    shutil.copytree(data["pool"], shuffled)
    for i in shards.list_shards(shuffled):
        path = shards.paths(shuffled, i)["parquet"]
        table = pd.read_parquet(path)
        table.sample(frac=1, random_state=i).to_parquet(path, index=False)  # another download order
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    _reshard(data["pool"], data["subset"], again)
    _reshard(shuffled, data["subset"], other)
    first = _files(data["shards"])
    assert len([n for n in first if n.endswith(".tar")]) == 5
    assert _files(again) == first and _files(other) == first


def test_progress_is_one_line_per_interval_and_always_the_last_step():
    clock = [0.0]
    progress = Progress(TrainConfig(batch_size=32, epochs=2), every=10, clock=lambda: clock[0])

    def step(epoch, seen, loss, t):
        clock[0] = t
        return progress.line(f"2026-01-01,00:00:00 | INFO | Train Epoch: {epoch} [{seen:>4}/320 ({seen // 32}%)] "
                             f"Data (t): 0.3 Batch (t): 1.1, 28.6147/s, 28.6147/s/gpu LR: 0.000250 Logit Scale: "
                             f"14.286 Contrastive_loss: {loss} ({loss}) Loss: {loss} (4.1)")

    assert progress.line("2026-01-01,00:00:00 | INFO | Start epoch 0") is None
    assert step(0, 32, 4.0447, 100) == "train: step 1/20 (epoch 1/2), 29 samples/s, loss 4.0447, ETA 0:00:21"
    assert step(0, 320, 3.9, 105) is None  # 5 s after the last line
    assert step(1, 32, 3.8, 110) == "train: step 11/20 (epoch 2/2), 32 samples/s, loss 3.8, ETA 0:00:09"
    assert step(1, 320, 3.7, 111) == "train: step 20/20 (epoch 2/2), 55 samples/s, loss 3.7, ETA 0:00:00"


def test_resume_and_other_settings_are_refused_with_commands_that_work(data, tmp_path):

    from winnow.pipeline.run.stage import Stage

    logs = str(tmp_path / "logs")
    Stage("train", os.path.join(logs, "x"), asdict(TINY), inputs=[os.path.join(data["shards"], "_manifest.json")],
          log=lambda m: None)  # an interrupted run: started, no checkpoint, no manifest
    open(os.path.join(logs, "x", "out.log"), "w").close()
    resume = f"`winnow train {data['shards']} --name x --logs {logs} --resume`"
    with pytest.raises(UserError, match=re.escape(f"an interrupted training run named 'x' exists in {logs} with "
                                                  f"other settings: seed 0 (here 3); resume it with {resume}, or "
                                                  "pass --overwrite to start over")):
        train(data["shards"], logs, "x", replace(TINY, seed=3), log=lambda m: None)
    copy = str(tmp_path / "copy")  # the same samples resharded again: another input
    _reshard(data["pool"], data["subset"], copy)
    with pytest.raises(UserError, match=re.escape(f"with other data; resume it with {resume}")):
        train(copy, logs, "x", TINY, log=lambda m: None)
    with pytest.raises(UserError, match=re.escape(f"no training run 'y' in {logs} to resume; start it with "
                                                  f"`winnow train {data['shards']} --name y --logs {logs}`")):
        train(data["shards"], logs, "y", TrainConfig(), resume=True, log=lambda m: None)
    with pytest.raises(UserError, match="--resume continues a run and --overwrite replaces it"):
        train(data["shards"], logs, "x", TrainConfig(), resume=True, overwrite=True, log=lambda m: None)


def test_checkpoint_loads_without_the_random_init_warning(tmp_path, caplog):
    import torch

    from winnow.pipeline.models.registry import load

    caplog.set_level(logging.INFO)
    model, _, _ = load("winnow-tiny-clip", "", seed=1)
    assert "Model initialized randomly" in caplog.text  # true here: no checkpoint follows
    caplog.clear()
    ckpt = str(tmp_path / "epoch_1.pt")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    loaded, _, _ = load("winnow-tiny-clip", ckpt)
    assert all(loaded.state_dict()[k].equal(v) for k, v in model.state_dict().items())
    assert "initialized randomly" not in caplog.text and caplog.records  # other records still pass
    logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    assert "initialized randomly" in caplog.text  # the filter is gone after the load


@pytest.mark.parametrize("model, pretrained, message", [
    ("winnow-tiny-clip", "openai", "--pretrained openai: no such tag for winnow-tiny-clip and no such checkpoint "
                                   "file; it has no pretrained tags"),
    ("ViT-B-32", "opena1", "--pretrained opena1: no such tag for ViT-B-32 and no such checkpoint file; its tags: "
                           "openai, "),
    ("ViT-B-23", "", "unknown open_clip model 'ViT-B-23'; did you mean ViT-B-32"),
    ("winnow-tiny-clip", "runs/nope/epoch_1.pt", "checkpoint not found: runs/nope/epoch_1.pt"),
])
def test_wrong_model_or_tag_is_one_line(model, pretrained, message):
    from winnow.pipeline.models.registry import load

    with pytest.raises(UserError) as err:
        load(model, pretrained)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_checkpoint_of_another_model_is_one_line(tmp_path):
    import torch

    from winnow.pipeline.models.registry import load

    ckpt = str(tmp_path / "clip.pt")
    torch.save({"state_dict": load("winnow-tiny-clip", "")[0].state_dict()}, ckpt)
    with pytest.raises(UserError, match=f"{re.escape(ckpt)} is not a winnow-tiny-vitamin checkpoint .*; pass the "
                                        "--model it was trained as") as err:
        load("winnow-tiny-vitamin", ckpt)
    assert "\n" not in str(err.value)


def test_embed_with_a_wrong_tag_is_one_line(data):
    result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "embed", data["pool"], "--model",
                             "winnow-tiny-clip", "--pretrained", "openai", "--scheduler", "sync"],
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("winnow: error: --pretrained openai: no such tag for winnow-tiny-clip")


def _weights(ckpt: str) -> dict:
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.e2e
def test_training_streams_progress_and_is_repeatable_and_resumable(data):
    """A real open_clip_train run prints its progress while it runs; the same shards, config and seed give the
    same weights; a run cut after its first epoch and resumed (by the command its refusal names) ends with them."""
    logs, lines, final = str(data["root"] / "logs"), [], os.path.join(str(data["root"] / "logs"), "a", "checkpoints",
                                                                       "epoch_2.pt")

    def log(line):
        lines.append((line, os.path.exists(final)))

    first = train(data["shards"], logs, "a", TINY, log=log, progress_every=0)
    assert lines[0][0].endswith(f"(step log: {os.path.join(logs, 'a', 'out.log')})")
    steps = [(line, done) for line, done in lines if line.startswith("train: step ")]
    assert re.fullmatch(r"train: step 1/8 \(epoch 1/2\), [\d,]+ samples/s, loss [\d.]+, ETA \d+:\d\d:\d\d",
                        steps[0][0]), steps
    assert steps[-1][0].startswith("train: step 8/8 (epoch 2/2)") and not steps[0][1]  # printed while training

    second = train(data["shards"], logs, "b", TINY, log=lambda m: None)
    reference = _weights(first)
    assert reference.keys() == _weights(second).keys()
    assert all(reference[k].equal(v) for k, v in _weights(second).items())

    os.remove(second)  # as if the run had stopped after its first epoch
    os.remove(os.path.join(logs, "b", "_manifest.json"))
    cli = [sys.executable, "-m", "winnow.workflows.cli"]
    refused = subprocess.run([*cli, "train", data["shards"], "--name", "b", "--logs", logs, "--seed", "1"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "seed 0 (here 1)" in refused.stderr, refused.stderr
    command = shlex.split(re.search(r"resume it with `([^`]+)`", refused.stderr)[1])
    assert command[:2] == ["winnow", "train"] and command[-1] == "--resume"
    resumed = subprocess.run([*cli, *command[1:]], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch_1.pt" in resumed.stdout
    assert all(reference[k].equal(v) for k, v in _weights(second).items())
