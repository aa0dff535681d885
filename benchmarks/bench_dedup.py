"""Dedup at scale: ``winnow dedup`` on 512-d float16 embeddings with planted near duplicates, on 2 workers.

A DataComp-metadata-shaped folder is synthesised part by part (``<part>.parquet`` with uid/text/sha256/clip score
beside ``<part>.npz`` with ``b32_img``, 100,000 rows a part: 128 parts at 12.8M): unit vectors around 2,000
centres (cosine about 0.35 between members of a centre, as dense neighbourhoods in real pools), 2% planted near
duplicates of rows of the previous part (cosine about 0.98) and 0.5% exact copies (same sha256). The stage runs on
a 2-worker LocalCluster with its default ``worker_memory_gib``. Reported per size, in one run:

- wall time; peak resident memory of every process (the driver, each worker, the nannies) and of the whole tree;
- planted near pairs found in one group, and recall against exact search: for a sample of queries (half planted
  copies, half random rows), every row at cosine >= threshold, found by brute force over all parts in this run;
  recall = share of those pairs that the table puts in one near-duplicate group;
- the baseline: exact (brute-force) search of the whole pool, extrapolated from the sample's measured time, and
  the ratio;
- from the measured rows per worker-second, the time and memory that 128M and 1.28B rows need on N workers.

    python benchmarks/bench_dedup.py [--sizes 1000000,12800000] [--data DIR (keeps the synthesised folders)]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

PART = 100_000


def make_metadata(folder: str, n: int, d: int = 512, dup_frac: float = 0.02, exact_frac: float = 0.005,
                  seed: int = 0) -> dict:
    """Write the folder (skipped when complete); return the planted (source, copy) row pairs."""
    import pandas as pd

    done = os.path.join(folder, "_complete")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    os.makedirs(folder, exist_ok=True)
    pairs, prev = [], None
    for k, s in enumerate(range(0, n, PART)):
        e = min(n, s + PART)
        prng = np.random.default_rng([seed, k])
        v = centres[prng.integers(0, len(centres), e - s)] + 0.06 * prng.standard_normal((e - s, d), np.float32)
        x = v / np.linalg.norm(v, axis=1, keepdims=True)
        sha = np.array([f"{i:064x}" for i in range(s, e)], dtype=object)
        if prev is not None:  # near copies of the previous part's rows, exact copies of its sha256
            m = int((e - s) * dup_frac)
            src, dst = prng.choice(len(prev), m, replace=False), prng.choice(e - s, m, replace=False)
            c = prev[src] + 0.008 * prng.standard_normal((m, d), np.float32)
            x[dst] = c / np.linalg.norm(c, axis=1, keepdims=True)
            pairs += list(zip(src + s - PART, dst + s))
            ex = prng.choice(np.setdiff1d(np.arange(e - s), dst), int((e - s) * exact_frac), replace=False)
            sha[ex] = [f"{i:064x}" for i in prng.integers(s - PART, s, len(ex))]
        prev = x
        if not os.path.exists(done):
            stem = os.path.join(folder, f"{k:05d}")
            pd.DataFrame({"uid": [f"{i:032x}" for i in range(s, e)], "text": [f"sample {i}" for i in range(s, e)],
                          "sha256": sha, "clip_b32_similarity_score": prng.uniform(0.1, 0.4, e - s).astype(
                              np.float32)}).to_parquet(stem + ".parquet")
            np.savez(stem + ".npz", b32_img=x.astype(np.float16))
    open(done, "w").close()
    return {"pairs": np.array(pairs, np.int64).reshape(-1, 2)}


def read_part(folder: str, k: int) -> np.ndarray:
    with np.load(os.path.join(folder, f"{k:05d}.npz"), allow_pickle=False) as z:
        x = z["b32_img"].astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_pairs(folder: str, n: int, queries: np.ndarray, threshold: float) -> tuple[set, float]:
    """Every (query, row) at cosine >= threshold by brute force over all parts, and the seconds it took."""
    q = np.concatenate([read_part(folder, k)[queries[queries // PART == k] % PART] for k in range(-(-n // PART))])
    order = np.concatenate([queries[queries // PART == k] for k in range(-(-n // PART))])
    start, found = time.time(), set()
    for k in range(-(-n // PART)):
        sims = q @ read_part(folder, k).T
        a, b = np.nonzero(sims >= threshold)
        found |= {(int(order[i]), int(k * PART + j)) for i, j in zip(a, b) if order[i] != k * PART + j}
    return found, time.time() - start


def _same_group(group: dict, a: int, b: int) -> bool:
    """Whether rows ``a`` and ``b`` landed in one near-duplicate group."""
    return f"{a:032x}" in group and group.get(f"{a:032x}") == group.get(f"{b:032x}")


def main() -> None:
    import pandas as pd
    from bench_select import PeakRSS  # peak RSS of this process and its children, sampled every 0.2 s

    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.dedup import DedupConfig, dedup, read_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--data", help="folder for the synthesised metadata (kept); default a temporary one")
    args = ap.parse_args()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = args.data or tempfile.mkdtemp(prefix="winnow-bench-dedup-")
        data = os.path.join(root, f"meta-{n}")
        t0 = time.time()
        planted = make_metadata(data, n)["pairs"]
        print(f"bench: {n:,} rows in {data} ({time.time() - t0:.0f} s to write or check)", flush=True)
        out = os.path.join(root, f"dedup-{n}")
        shutil.rmtree(out, ignore_errors=True)
        cfg = DedupConfig(tag="b32", near_threshold=args.threshold)
        with Runner(ClusterConfig(n_workers=2), log=print) as runner:
            runner.start()  # the cluster's start is not timed
            with PeakRSS() as mem:
                start = time.time()
                doc = dedup(data, cfg, runner, out=out, log=print)
                wall = time.time() - start
        table = read_table(os.path.join(out, "duplicates.parquet"))
        near = table[table["kind"] == "near"]
        group = dict(zip(near["uid"], near["group"]))
        found = float(np.mean([_same_group(group, a, b) for a, b in planted]))
        rng = np.random.default_rng(1)
        queries = np.unique(np.concatenate([rng.choice(planted[:, 1], args.queries // 2, replace=False),
                                            rng.choice(n, args.queries // 2, replace=False)]))
        truth, exact_s = exact_pairs(data, n, queries, args.threshold)
        recall = float(np.mean([_same_group(group, a, b) for a, b in truth])) if truth else 1.0
        exact_full = exact_s * n / len(queries)
        procs = sorted(mem.processes.values(), key=lambda p: -p[1])
        rows.append({"rows": n, "wall_s": round(wall, 1), "tree_peak_gib": round(mem.peak / 2**30, 2),
                     "largest_process_gib": round(procs[0][1] / 2**30, 2), "planted_found": round(found, 4),
                     "recall": round(recall, 4), "exact_pairs": len(truth), "exact_search_s_est": round(exact_full),
                     "search": doc["search"], "dropped": doc["dropped"]})
        print(f"bench: n={n:,}: {wall:.1f} s, tree peak {mem.peak / 2**30:.2f} GiB, planted pairs found {found:.4f}, "
              f"recall vs exact {recall:.4f} ({len(truth)} exact pairs for {len(queries)} queries); {doc['search']}")
        for label, peak in procs:
            print(f"    {peak / 2**30:6.2f} GiB  {label}")
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nwinnow dedup (2 workers, worker_memory_gib {DedupConfig.worker_memory_gib}) vs exact brute-force search "
          f"(extrapolated from {args.queries} queries), threshold {args.threshold}")
    print(f"{'rows':>12} {'wall s':>8} {'tree GiB':>9} {'max proc':>9} {'planted':>8} {'recall':>7} "
          f"{'exact s (est)':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['rows']:>12,} {r['wall_s']:>8.1f} {r['tree_peak_gib']:>9.2f} {r['largest_process_gib']:>9.2f} "
              f"{r['planted_found']:>8.4f} {r['recall']:>7.4f} {r['exact_search_s_est']:>14,} "
              f"{r['wall_s'] / r['exact_search_s_est']:>6.3f}")
    big = rows[-1]
    per_worker = big["rows"] / (big["wall_s"] * 2)  # rows per worker-second; every pass is linear in rows
    print(f"\nextrapolation from {per_worker:,.0f} rows per worker-second at {big['rows']:,} rows (clusters of about "
          "1,000 rows keep every pass linear; memory per worker stays at worker_memory_gib; the driver holds the "
          "training sample and the duplicates found):")
    print(f"{'rows':>14} " + " ".join(f"{w:>10} workers" for w in (2, 32, 256)))
    for n in (128_000_000, 1_280_000_000):
        print(f"{n:>14,} " + " ".join(f"{n / (per_worker * w) / 3600:>16.2f} h" for w in (2, 32, 256)))
    print(pd.DataFrame(rows).to_json(orient="records"))


if __name__ == "__main__":
    main()
