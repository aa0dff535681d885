"""Resharding throughput against a plain byte copy and a naive webdataset decode-and-rewrite loop.

The input is a pool of ``--shards`` tars of ``--per-shard`` samples (synthetic-world JPEGs, jpg + txt + json per
sample, as ingest writes them). All three runs materialise the same subset (``--keep`` fraction, every uid once):

- byte copy: ``shutil.copyfileobj`` of every input tar (the upper bound: no parsing at all);
- naive: ``webdataset.WebDataset(...).decode("pil")`` then ``ShardWriter`` re-encoding each kept sample;
- winnow reshard: plan from the parquet uids, then seek-and-copy of the kept members, on a local Dask cluster.

Rates are input bytes per second. Target: winnow >= 50% of the byte-copy rate.

    python benchmarks/bench_reshard.py [--shards 16] [--per-shard 1000] [--keep 1.0]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np


def make_pool(folder: str, shards_n: int, per_shard: int) -> list[str]:
    from winnow.pipeline.data import shards
    from winnow.pipeline.synth.world import SynthConfig, _jpeg, _spec_for

    cfg = SynthConfig()
    images = [_jpeg(_spec_for(cfg, 1, i)) for i in range(200)]
    rng = np.random.default_rng(0)
    uids = []
    for s in range(shards_n):
        rows, payload = [], {}
        for r in range(per_shard):
            uid = f"{rng.integers(2**63):016x}{rng.integers(2**63):016x}"
            key = f"{s:08d}{r:04d}"
            uids.append(uid)
            payload[key] = images[(s * per_shard + r) % len(images)]
            rows.append({"uid": uid, "key": key, "caption": f"a photo of shape {r}", "url": f"http://x/{key}.jpg",
                         "status": "success", "error_message": None, "width": 512, "height": 400, "state": "ok"})
        shards.write_shard(folder, s, rows, payload)
    return uids


def byte_copy(pool: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(pool)):
        if name.endswith(".tar"):
            with open(os.path.join(pool, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)


def naive(pool: str, out: str, keep: set[str], shard_size: int) -> int:

    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    tars = sorted(os.path.join(pool, n) for n in os.listdir(pool) if n.endswith(".tar"))
    written = 0
    with wds.ShardWriter(os.path.join(out, "%08d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
            uid = sample["json"]["uid"]
            if uid in keep:
                buf = io.BytesIO()
                sample["jpg"].save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{uid}-0", "jpg": buf.getvalue(), "txt": sample["txt"],
                            "json": json.dumps(sample["json"])})
                written += 1
    return written


def main() -> None:
    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import write_subset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--keep", type=float, default=1.0, help="fraction of samples in the subset")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="winnow-bench-reshard-")
    pool = os.path.join(root, "pool")
    uids = make_pool(pool, args.shards, args.per_shard)
    rng = np.random.default_rng(1)
    chosen = [u for u in uids if rng.random() < args.keep]
    write_subset(os.path.join(root, "subset"), chosen, {})
    total_bytes = sum(os.path.getsize(os.path.join(pool, n)) for n in os.listdir(pool) if n.endswith(".tar"))

    t = time.time()
    byte_copy(pool, os.path.join(root, "copy"))
    copy_s = time.time() - t

    t = time.time()
    with Runner(ClusterConfig(n_workers=args.workers), log=lambda m: None) as runner:
        runner.start()
        t = time.time()  # cluster start-up is not resharding
        doc = reshard(pool, os.path.join(root, "subset", "uids.npy"), os.path.join(root, "ours"), runner,
                      shard_size=args.per_shard, log=lambda m: None)
        ours_s = time.time() - t
    assert doc["rows"]["samples"] == len(chosen)

    t = time.time()
    n = naive(pool, os.path.join(root, "naive"), set(chosen), args.per_shard)
    naive_s = time.time() - t
    assert n == len(chosen)

    mb = total_bytes / 2**20
    print()
    print(f"reshard {len(chosen):,} of {len(uids):,} samples ({mb:.0f} MiB of input tars), {args.workers} workers")
    print(f"{'method':<28} {'s':>7} {'MiB/s':>8} {'vs byte copy':>13}")
    for name, s in (("byte copy (shutil)", copy_s), ("winnow reshard", ours_s), ("naive wds decode+rewrite", naive_s)):
        print(f"{name:<28} {s:>7.2f} {mb / s:>8.1f} {copy_s / s:>12.0%}")
    print("target: winnow >= 50% of the byte-copy rate")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
