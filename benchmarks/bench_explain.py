"""``winnow explain`` on DataComp-shaped metadata (default 12.8M rows in 128 parquet files, DataComp small), with
the score cache a ``winnow subset`` run left: seconds per uid, and the peak memory of the process.

The metadata is bench_select's (CommonPool's nine columns). One ``winnow subset clip_l14_30pct`` run fills the
cache (its time is printed, not the target). Then, in one Python process, as a user's script or notebook calls
it (``winnow.pipeline.stages.explain.explain``, what ``winnow.explain`` runs, without printing): the history of
``--uids`` uids drawn from the pool (half kept by the subset, half dropped: their rule is traced) and of uids
that are not in the pool (every part searched), each with ``--subset``; plus one ``winnow explain`` from the
command line (Python's start included). Target: under 2 s per uid.

    python benchmarks/bench_explain.py [--rows 12800000] [--files 128] [--uids 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
from bench_select import PeakRSS, make_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--uids", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="keep (and reuse) the metadata, subset and cache in this folder")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="winnow-bench-explain-")
    pool = os.path.join(root, f"metadata-{args.rows}-{args.files}")
    if not os.path.isdir(pool):
        os.makedirs(pool + ".tmp", exist_ok=True)
        t = time.time()
        make_pool(pool + ".tmp", args.rows, args.files)
        os.replace(pool + ".tmp", pool)
        print(f"bench: metadata of {args.rows:,} rows written in {time.time() - t:.0f} s", flush=True)
    out, cache = os.path.join(root, "clip_l14_30pct"), os.path.join(root, "cache")
    winnow = os.path.join(os.path.dirname(sys.executable), "winnow")
    t = time.time()
    subprocess.run([winnow, "subset", "clip_l14_30pct", "--pool", pool, "--out", out, "--cache", cache,
                    "--workers", str(args.workers)], check=True, stdout=subprocess.DEVNULL)
    print(f"bench: winnow subset clip_l14_30pct (fills the cache): {time.time() - t:.0f} s", flush=True)

    from winnow.pipeline.data.uid import array_to_uids
    from winnow.pipeline.stages.explain import explain

    rng = np.random.default_rng(0)
    files = sorted(n for n in os.listdir(pool) if n.endswith(".parquet"))
    drawn = []
    for name in rng.choice(files, min(len(files), args.uids), replace=False):
        uids = pq.read_table(os.path.join(pool, name), columns=["uid"])["uid"].to_pylist()
        drawn.append(uids[int(rng.integers(len(uids)))])
    kept = set(array_to_uids(np.load(os.path.join(out, "uids.npy"))[:: max(1, args.rows // 1000)]))
    drawn[: args.uids // 2] = list(kept)[: args.uids // 2]
    absent = [f"{int(rng.integers(2**62)):032x}" for _ in range(3)]
    times, states = [], []
    with PeakRSS(os.getpid()) as mem:
        for uid in drawn + absent:
            t = time.perf_counter()
            doc = explain(pool, [uid], subsets=[out], cache=cache)
            times.append(time.perf_counter() - t)
            states.append("absent" if not doc[0]["found"] else "kept" if doc[0]["subsets"][0]["kept"] else "dropped")
    t = time.time()
    subprocess.run([winnow, "explain", pool, drawn[-1], "--subset", out, "--cache", cache], check=True,
                   stdout=subprocess.DEVNULL)
    cli = time.time() - t
    found = np.array(times[: len(drawn)])
    print(f"\nexplain on {args.rows:,} rows in {len(files)} files, cached scores ({psutil.cpu_count()} cores)")
    print(f"uids in the pool ({states[: len(drawn)].count('kept')} kept, {states[: len(drawn)].count('dropped')} "
          f"dropped, traced): median {np.median(found):.2f} s, max {found.max():.2f} s per uid")
    print(f"uids not in the pool (every part searched): max {max(times[len(drawn):]):.2f} s")
    print(f"winnow explain from the command line (Python start included): {cli:.2f} s")
    print(f"peak memory of the process: {mem.peak / 2**30:.2f} GiB; target: under 2 s per uid")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
