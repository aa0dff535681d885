"""The GPU benchmark, one script for a lent GPU machine: what the expensive stages cost on its accelerator.

In one run it prints:
- embedding images/s with ViT-B/32 and ViT-L/14 (random weights: the cost does not depend on them) through
  ``winnow embed``'s own path: real JPEG decoding from WebDataset shards, the decode threads, batches on the GPU;
- training samples/s per GPU at the small scale's per-device batch (4,096 over 8 GPUs: 512, ViT-B/32,
  amp_bf16) with open_clip_train, median over the logged steps after the first;
- the time of DataComp's 38-task evaluation on miniature sets written at ``--eval-scale`` of the real sizes
  (:mod:`winnow.pipeline.synth.datacomp_evalsets`), extrapolated linearly to the real sizes (DataComp quotes about
  86 minutes on one GPU);
- negCLIPLoss and NormSim_inf rows/s (the paper's batch 32,768, K 10; a 100k-row ImageNet-like target).
Every line names the device; peak memory is the process's and the GPU's.

    python benchmarks/bench_gpu.py [--device cuda] [--images 4096] [--eval-scale 0.01] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _peak(device: str) -> str:
    import psutil
    import torch

    rss = psutil.Process().memory_info().rss / 2**30
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else ""
    return f"process {rss:.2f} GiB{gpu}"


def embedding(root: str, device: str, images: int, models: list[str]) -> list[str]:
    from bench_reshard import make_pool

    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.embed import EmbedConfig, embed

    pool = os.path.join(root, "pool")
    if not os.path.isdir(pool):
        make_pool(pool, max(1, images // 1000), min(images, 1000))
    out = []
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        for model in models:
            start = time.monotonic()
            doc = embed(pool, EmbedConfig(model=model, pretrained="", tag=re.sub(r"\W", "", model), device=device,
                                          batch_size=256, precision="fp16" if device == "cuda" else "fp32",
                                          decode_threads=8), runner, log=lambda m: None)
            n = doc["rows"]["embedded_images"]
            out.append(f"embed {model}: {n / (time.monotonic() - start):,.0f} images/s ({n:,} JPEGs decoded from "
                       f"shards, {device}; {_peak(device)})")
            print(out[-1], flush=True)
    return out


def training(root: str, device: str, steps: int) -> list[str]:
    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import write_subset
    from winnow.pipeline.stages.train import TrainConfig, train

    pool = os.path.join(root, "pool")
    from winnow.pipeline.data import shards

    uids = [u for i in shards.list_shards(pool) for u in shards.read_table(pool, i, ["uid"])["uid"]]
    write_subset(os.path.join(root, "sub"), uids, {})
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        reshard(pool, os.path.join(root, "sub", "uids.npy"), os.path.join(root, "shards"), runner, shard_size=1000,
                log=lambda m: None)
    batch = 512 if device == "cuda" else 16
    cfg = TrainConfig(model="ViT-B-32", samples_seen=batch * steps, batch_size=batch, warmup=10, workers=6,
                      precision="amp_bf16" if device == "cuda" else "fp32", device=device)
    train(os.path.join(root, "shards"), os.path.join(root, "logs"), "b32", cfg, log=lambda m: None)
    log = open(os.path.join(root, "logs", "b32", "out.log")).read()
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)][1:] or [float("nan")]
    line = (f"train ViT-B-32 at the small scale's per-device batch {batch}: {statistics.median(rates):,.0f} "
            f"samples/s per {'GPU' if device == 'cuda' else 'CPU process'} (median of {len(rates)} logged steps)")
    print(line, flush=True)
    return [line]


def evaluation(root: str, device: str, scale: float) -> list[str]:
    import torch

    from winnow.pipeline.models.registry import load
    from winnow.pipeline.stages.evaluate import evaluate
    from winnow.pipeline.synth.datacomp_evalsets import write_evalsets
    from winnow.pipeline.tasks import load_tasklist

    data = os.path.join(root, "evalsets")
    written = write_evalsets(data, scale=scale, side=256)
    net, _, _ = load("ViT-B-32", "", seed=0)
    ckpt = os.path.join(root, "b32-random.pt")
    torch.save({"state_dict": net.state_dict()}, ckpt)
    tasks = load_tasklist("datacomp", {"data_dir": data}, log=lambda m: None)
    start = time.monotonic()
    evaluate("ViT-B-32", ckpt, tasks, os.path.join(root, "eval"), device=device, log=lambda m: None)
    took = time.monotonic() - start
    items = sum(written.values())
    line = (f"DataComp's 38-task evaluation, ViT-B-32: {took:,.0f} s for {items:,} items ({scale:g} of the real "
            f"sizes) -> about {took / scale / 60:,.0f} min at the real sizes ({device}; {_peak(device)})")
    print(line, flush=True)
    return [line]


def curation(device: str, rows: int, target_rows: int) -> list[str]:
    from winnow.filters.neg_clip_loss import draw_batches, normaliser
    from winnow.filters.norm_sim import norm_sim_inf

    rng = np.random.default_rng(0)
    img = rng.standard_normal((rows, 768)).astype(np.float32)
    txt = rng.standard_normal((rows, 768)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    uids = np.zeros(rows, dtype="u8,u8")
    uids["f1"] = np.arange(rows)
    batch = min(32_768, rows)
    start = time.monotonic()
    normaliser(img, txt, draw_batches(uids, batch, 10), 0.01, batch, device)
    neg = rows / (time.monotonic() - start)
    target = rng.standard_normal((target_rows, 768)).astype(np.float32)
    start = time.monotonic()
    norm_sim_inf(img, target, device)
    ns = rows / (time.monotonic() - start)
    line = (f"negCLIPLoss (K 10, batch {batch:,}): {neg:,.0f} rows/s; NormSim_inf ({target_rows:,}-row target): "
            f"{ns:,.0f} rows/s ({device}; {_peak(device)})")
    print(line, flush=True)
    return [line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-scale", type=float, default=0.01)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="a few of everything (checks the script runs, on a CPU)")
    args = ap.parse_args()
    if args.quick:
        args.images, args.steps, args.eval_scale, args.rows = 1000, 4, 0.0005, 4096
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; run it where one is lent (or --device cpu --quick to check it)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"bench_gpu on {name}", flush=True)
    root = tempfile.mkdtemp(prefix="winnow-bench-gpu-")
    lines = embedding(root, args.device, args.images, ["ViT-B-32"] if args.quick else ["ViT-B-32", "ViT-L-14"])
    lines += training(root, args.device, args.steps)
    lines += evaluation(root, args.device, args.eval_scale)
    lines += curation(args.device, args.rows, 100_000 if not args.quick else 2048)
    print("\n" + "\n".join(lines))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump({"device": name, "lines": lines}, f, indent=1)
    subprocess.run(["rm", "-rf", os.path.join(root, "pool"), os.path.join(root, "shards")], check=False)


if __name__ == "__main__":
    main()
