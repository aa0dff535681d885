"""Near-duplicate search at scale: the dedup stage on random-but-structured 512-d float16 embeddings.

A DataComp-metadata-like folder is synthesised (``<part>.parquet`` with uid/text/sha256 beside ``<part>.npz`` with
``b32_img``): unit vectors around 2,000 cluster centres (so neighbourhoods are dense, as in real pools), plus 1%
planted near duplicates (cosine about 0.97 to their source). ``winnow dedup`` then runs on a 2-worker
LocalCluster: IVF-PQ fast-scan index with fp16 re-ranking above 200k rows, queries one task per part,
SemDeDup. Reported per size:
wall time, peak memory of the whole process tree (driver + workers, sampled every 0.2 s), planted pairs found,
and the recall of the approximate path against exact (Flat) search for a sample of 2,000 queries, measured in
the same run. Baseline for the ratio: exact search of the sample, extrapolated to all queries.

    python benchmarks/bench_dedup.py [--sizes 100000,300000,1000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def make_metadata(folder: str, n: int, d: int = 512, part: int = 50_000, dup_frac: float = 0.01, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n_dup = int(n * dup_frac)
    base = n - n_dup
    src = rng.choice(base, n_dup, replace=False)
    x = np.empty((n, d), np.float16)
    for s in range(0, base, 100_000):
        e = min(base, s + 100_000)
        v = centres[rng.integers(0, len(centres), e - s)] + 0.06 * rng.standard_normal((e - s, d)).astype(np.float32)
        x[s:e] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    v = x[src].astype(np.float32) + 0.008 * rng.standard_normal((n_dup, d)).astype(np.float32)
    x[base:] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    uids = np.array([f"{i:032x}" for i in range(n)])
    os.makedirs(folder, exist_ok=True)
    for k, s in enumerate(range(0, n, part)):
        e = min(n, s + part)
        pd.DataFrame({"uid": uids[s:e], "text": [f"sample {i}" for i in range(s, e)],
                      "sha256": [f"{i:064x}" for i in range(s, e)]}).to_parquet(os.path.join(folder, f"{k:05d}.parquet"))
        np.savez(os.path.join(folder, f"{k:05d}.npz"), b32_img=x[s:e])
    return x, src, np.arange(base, n)


def main() -> None:
    import faiss
    import pandas as pd

    from pipeline.stages.dedup import DedupConfig, dedup, read_table
    from pipeline.run.runner import ClusterConfig, Runner

    from bench_select import PeakRSS  # peak RSS of this process and its children, sampled every 0.2 s

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--sample", type=int, default=2000)
    args = ap.parse_args()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = tempfile.mkdtemp(prefix="winnow-bench-dedup-")
        x, src, dup = make_metadata(os.path.join(root, "pool"), n)
        cfg = DedupConfig(tag="b32", near_threshold=args.threshold)
        with Runner(ClusterConfig(n_workers=2), log=lambda m: None) as runner:
            runner.start()  # start the cluster before timing
            with PeakRSS() as mem:
                start = time.time()
                dedup(os.path.join(root, "pool"), cfg, runner, out=os.path.join(root, "dedup"), log=print)
                wall = time.time() - start
        table = read_table(os.path.join(root, "dedup", "duplicates.parquet"))
        near = table[table["kind"] == "near"]
        group = dict(zip(near["uid"], near["group"]))
        uid = lambda i: f"{i:032x}"  # noqa: E731
        found = np.mean([uid(a) in group and group.get(uid(a)) == group.get(uid(b)) for a, b in zip(src, dup)])
        # exact search for a sample of queries, in the same run
        rng = np.random.default_rng(1)
        sample = rng.choice(n, min(args.sample, n), replace=False)
        xf = x.astype(np.float32)
        flat = faiss.IndexFlatIP(xf.shape[1])
        flat.add(xf)
        t0 = time.time()
        sims, ids = flat.search(xf[sample], cfg.k)
        exact_s = (time.time() - t0) * n / len(sample)
        exact_pairs = {(int(q), int(j)) for q, row_s, row_i in zip(sample, sims, ids)
                       for s, j in zip(row_s, row_i) if s >= args.threshold and j != q}
        edges = np.concatenate([np.load(os.path.join(root, "dedup", "edges", f), allow_pickle=False)
                                for f in sorted(os.listdir(os.path.join(root, "dedup", "edges")))])
        approx = {(int(a), int(b)) for a, b, _ in edges} | {(int(b), int(a)) for a, b, _ in edges}
        recall = len(exact_pairs & approx) / max(1, len(exact_pairs))
        rows.append((n, wall, mem.peak / 2**30, found, recall, len(exact_pairs), exact_s))
        print(f"bench: n={n:,}: {wall:.1f} s, peak {mem.peak / 2**30:.2f} GiB, planted pairs found {found:.3f}, "
              f"recall vs exact {recall:.3f} ({len(exact_pairs)} exact pairs in the sample)", flush=True)
        del x, xf, flat
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"winnow dedup (Flat up to 200k rows, IVF-PQ + re-ranking above; 2 workers) vs exact Flat search "
          f"extrapolated, threshold {args.threshold}")
    print(f"{'rows':>10} {'wall s':>8} {'peak GiB':>9} {'planted':>8} {'recall':>7} {'exact s (est)':>14} {'ratio':>6}")
    for n, wall, peak, found, recall, _, exact_s in rows:
        print(f"{n:>10,} {wall:>8.1f} {peak:>9.2f} {found:>8.3f} {recall:>7.3f} {exact_s:>14.1f} "
              f"{wall / exact_s:>6.2f}")
    print(pd.DataFrame(rows, columns=["rows", "wall_s", "peak_gib", "planted_found", "recall", "exact_pairs",
                                      "exact_search_s_est"]).to_json(orient="records"))


if __name__ == "__main__":
    main()
