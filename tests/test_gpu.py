"""The GPU tier (``pytest -m gpu``, opt-in: CI has no GPU): every stage that runs on CUDA gives the CPU's result.

Embedding, training (one process; two with nccl when two GPUs exist), evaluation, negCLIPLoss, NormSim, and
faiss k-means and dedup when faiss was built with GPUs. Each is checked against the same work on the CPU."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import make_pool

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _pool(tmp_path, n: int = 96) -> str:
    uids = [f"{i + 1:032x}" for i in range(n)]
    return make_pool(tmp_path / "pool", uids, [f"a {['red', 'green', 'blue'][i % 3]} square {i}" for i in range(n)])


def test_embed_on_cuda_matches_the_cpu(tmp_path):
    from winnow.pipeline.data import shards
    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.embed import EmbedConfig, embed

    pool = _pool(tmp_path)
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        for device in ("cpu", "cuda"):
            embed(pool, EmbedConfig(model="winnow-tiny-clip", pretrained="", tag=device, device=device,
                                    batch_size=32), runner, log=lambda m: None)
    for i in shards.list_shards(pool):
        with np.load(os.path.join(pool, "embeddings", "cpu", f"{i:08d}.npz")) as a, \
                np.load(os.path.join(pool, "embeddings", "cuda", f"{i:08d}.npz")) as b:
            assert np.allclose(a["cpu_img"], b["cuda_img"], atol=2e-3, equal_nan=True)
            assert np.allclose(a["cpu_txt"], b["cuda_txt"], atol=2e-3, equal_nan=True)


def test_negcliploss_and_normsim_on_cuda_match_the_cpu():
    from winnow.filters.neg_clip_loss import draw_batches, normaliser
    from winnow.filters.norm_sim import norm_sim_inf

    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((500, 64)).astype(np.float32), rng.standard_normal((500, 64)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    uids = np.zeros(500, dtype="u8,u8")
    uids["f1"] = np.arange(500)
    batches = draw_batches(uids, 64, 3)
    cpu, gpu = (normaliser(img, txt, batches, 0.07, 64, d) for d in ("cpu", "cuda"))
    assert np.allclose(cpu, gpu, atol=1e-4)
    target = rng.standard_normal((3000, 64)).astype(np.float32)
    assert np.allclose(norm_sim_inf(img, target, "cpu"), norm_sim_inf(img, target, "cuda"), atol=1e-5)


def _data(tmp_path) -> str:
    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import write_subset

    pool = _pool(tmp_path, 300)
    from winnow.pipeline.data import shards

    uids = list(shards.read_table(pool, 0)["uid"])
    write_subset(str(tmp_path / "sub"), uids, {})
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        reshard(pool, str(tmp_path / "sub" / "uids.npy"), str(tmp_path / "shards"), runner, shard_size=64,
                log=lambda m: None)
    return str(tmp_path / "shards")


def test_training_on_cuda_and_its_evaluation_matches_the_cpus(tmp_path):
    from winnow.pipeline.stages.evaluate import evaluate
    from winnow.pipeline.stages.train import Launch, TrainConfig, train
    from winnow.pipeline.synth.datacomp_evalsets import write_evalsets
    from winnow.pipeline.tasks import load_tasklist

    data = _data(tmp_path)
    cfg = TrainConfig(samples_seen=512, batch_size=32, warmup=2, epochs=1, seed=0, precision="fp32")
    ckpt = train(data, str(tmp_path / "logs"), "gpu", cfg, log=lambda m: None)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    if torch.cuda.device_count() >= 2:  # nccl, one process per GPU; the global batch is the same
        two = train(data, str(tmp_path / "logs"), "gpu2", replace(cfg, processes=2), launch=Launch(2),
                    log=lambda m: None)
        assert os.path.exists(two)
    write_evalsets(str(tmp_path / "evalsets"), keys=["cifar10", "wilds/fmow", "misc/winogavil",
                                                     "retrieval/flickr_1k_test_image_text_retrieval"])
    tasks = load_tasklist("datacomp", {"data_dir": str(tmp_path / "evalsets")}, log=lambda m: None)
    on = {d: evaluate("", ckpt, tasks, str(tmp_path / f"eval-{d}"), device=d, log=lambda m: None) for d in
          ("cpu", "cuda")}
    assert on["cpu"]["tasks"].keys() == on["cuda"]["tasks"].keys()
    for name, value in on["cpu"]["tasks"].items():
        assert on["cuda"]["tasks"][name] == pytest.approx(value, abs=0.02), name  # a tie may flip one item


def test_faiss_kmeans_on_gpu_matches_the_cpu():
    import faiss

    if not getattr(faiss, "get_num_gpus", lambda: 0)():
        pytest.skip("this faiss has no GPU support (faiss-cpu); k-means and dedup run on the CPU")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20_000, 32)).astype(np.float32)
    cpu = faiss.Kmeans(32, 50, niter=20, seed=0)
    gpu = faiss.Kmeans(32, 50, niter=20, seed=0, gpu=True)
    cpu.train(x)
    gpu.train(x)
    assert abs(cpu.obj[-1] - gpu.obj[-1]) / cpu.obj[-1] < 0.01
