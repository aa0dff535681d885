"""Training throughput of the tiny scale on this machine: tiny CLIP (small ResNet) and tiny ViTamin, with
open_clip_train,
then the tiny CLIP with 1 and with 2 training processes (torchrun, gloo) given the same CPU threads in all.

All train on the same resharded synthetic shards with the same global batch; throughput is open_clip_train's own
per-step samples/s (global: every process's samples), median over the logged steps after the first (start-up
excluded), and the whole run's wall time; the peak resident memory of each run's process tree and of its largest
process. Baselines: the tiny CLIP, and for the process counts the single process.
On a GPU, ``--model ViT-B-32 --batch-size 256 --precision amp_bf16`` gives the figure the issue asks for there.

    python benchmarks/bench_train.py [--samples 3200] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time


def main() -> None:
    from bench_reshard import make_pool

    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.reshard import reshard
    from winnow.pipeline.stages.subset import write_subset
    from winnow.pipeline.stages.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--models", default="winnow-tiny-clip,winnow-tiny-vitamin")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads in all, per run")
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
    processes(root, args)
    shutil.rmtree(root, ignore_errors=True)


def processes(root: str, args) -> None:
    """The tiny CLIP with 1 and 2 processes, ``args.threads`` torch threads in all (one loader worker each)."""
    from bench_select import PeakRSS

    from winnow.pipeline.stages.train import Launch, TrainConfig, train

    rows = []
    for n in (1, 2):
        os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads // n))
        cfg = TrainConfig(samples_seen=args.samples, batch_size=args.batch_size, warmup=2, precision=args.precision,
                          processes=n)
        name = f"procs{n}"
        start = time.monotonic()
        with PeakRSS(os.getpid()) as mem:
            train(os.path.join(root, "shards"), os.path.join(root, "logs"), name, cfg, launch=Launch(n),
                  log=lambda m: None)
        wall = time.monotonic() - start
        log = open(os.path.join(root, "logs", name, "out.log")).read()
        rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)][1:]
        largest = max(peak for _, peak in mem.processes.values())
        rows.append((n, statistics.median(rates), wall, mem.peak, largest, len(mem.processes)))
        print(f"bench: {n} process(es): {rows[-1][1]:.1f} samples/s, {wall:.1f} s", flush=True)
    os.environ.pop("OMP_NUM_THREADS", None)
    print()
    print(f"winnow-tiny-clip, global batch {args.batch_size}, {args.samples} samples, {args.threads} torch threads "
          "in all; peak memory of the whole process tree (the bench process included)")
    print(f"{'processes':>9} {'samples/s':>10} {'vs 1':>6} {'wall s':>7} {'peak tree GiB':>14} {'largest GiB':>12} "
          f"{'processes seen':>15}")
    for n, rate, wall, peak, largest, count in rows:
        print(f"{n:>9} {rate:>10.1f} {rate / rows[0][1]:>5.2f}x {wall:>7.1f} {peak / 2**30:>14.2f} "
              f"{largest / 2**30:>12.2f} {count:>15}")


if __name__ == "__main__":
    main()
