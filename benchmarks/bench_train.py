"""Training throughput of the tiny scale on this machine: tiny CLIP (small ResNet) and tiny ViTamin, with open_clip_train.

Both train on the same resharded synthetic shards with the same batch size; throughput is open_clip_train's own
per-step samples/s, median over the logged steps after the first (start-up excluded). Baseline: the tiny CLIP.
On a GPU, ``--model ViT-B-32 --batch-size 256 --precision amp_bf16`` gives the figure the issue asks for there.

    python benchmarks/bench_train.py [--samples 3200] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile


def main() -> None:
    from pipeline.stages.reshard import reshard
    from pipeline.run.runner import ClusterConfig, Runner
    from pipeline.stages.subset import write_subset
    from pipeline.stages.train import TrainConfig, train

    from bench_reshard import make_pool

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--models", default="winnow-tiny-clip,winnow-tiny-vitamin")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="winnow-bench-train-")
    uids = make_pool(os.path.join(root, "pool"), 4, 500)
    write_subset(os.path.join(root, "subset"), uids, {})
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        reshard(os.path.join(root, "pool"), os.path.join(root, "subset", "uids.npy"), os.path.join(root, "shards"),
                runner, shard_size=500, log=lambda m: None)
    rows = []
    for model in args.models.split(","):
        cfg = TrainConfig(model=model, samples_seen=args.samples, batch_size=args.batch_size, warmup=2,
                          precision=args.precision)
        train(os.path.join(root, "shards"), os.path.join(root, "logs"), model, cfg, log=lambda m: None)
        log = open(os.path.join(root, "logs", model, "out.log")).read()
        rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)][1:]
        rows.append((model, statistics.median(rates)))
        print(f"bench: {model}: {rows[-1][1]:.1f} samples/s", flush=True)
    print()
    print(f"open_clip_train throughput, batch {args.batch_size}, {args.samples} samples, this machine")
    print(f"{'model':<22} {'samples/s':>10} {'vs tiny CLIP':>13}")
    for model, rate in rows:
        print(f"{model:<22} {rate:>10.1f} {rate / rows[0][1]:>12.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
