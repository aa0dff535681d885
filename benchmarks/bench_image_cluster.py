"""`image_based`'s clustering at DataComp small's size: 12.8M x 768-d float16 image embeddings, 2 workers.

A metadata-shaped folder (128 parts of 100,000 rows, ``l14_img`` float16 around 2,000 centres) is synthesised
part by part; the subset ``image_cluster`` filter then runs as `winnow subset` runs it: k-means on a seeded
sample of ``sample_rows`` rows read part by part (the driver), the target's clusters, then every part assigned
to its nearest centroid on the workers. Reported: wall time of each phase, peak resident memory of every process
and of the tree. The baseline is the memory DataComp's approach needs to hold all rows for k-means (12.8M x 768
float32 = 39.3 GB), computed, not run. DataComp used 100,000 centroids; on 2 cores the time of that is
extrapolated (k-means and assignment are linear in the number of centroids), ``--clusters`` sets what runs.

    python benchmarks/bench_image_cluster.py [--rows 12800000] [--clusters 1000] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

PART = 100_000


def make_metadata(folder: str, n: int, d: int = 768, seed: int = 0) -> None:
    import pandas as pd

    done = os.path.join(folder, "_complete")
    if os.path.exists(done):
        return
    os.makedirs(folder, exist_ok=True)
    centres = np.random.default_rng(seed).standard_normal((2000, d)).astype(np.float32)
    for k, s in enumerate(range(0, n, PART)):
        e = min(n, s + PART)
        rng = np.random.default_rng([seed, k])
        v = centres[rng.integers(0, len(centres), e - s)] / np.sqrt(d) + 0.04 * rng.standard_normal((e - s, d),
                                                                                                   np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        pd.DataFrame({"uid": [f"{i:032x}" for i in range(s, e)], "text": ["a photo"] * (e - s)}).to_parquet(
            os.path.join(folder, f"{k:05d}.parquet"))
        np.savez(os.path.join(folder, f"{k:05d}.npz"), l14_img=v.astype(np.float16))
    open(done, "w").close()


def main() -> None:
    from bench_select import PeakRSS

    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.stages.subset import subset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--filter", default="image_cluster", choices=["image_cluster", "density_prune"],
                    help="density_prune: DBP's k-means (a 500,000-row sample, niter 100) and its two passes")
    ap.add_argument("--data", help="folder for the synthesised metadata (kept); default a temporary one")
    args = ap.parse_args()
    root = args.data or tempfile.mkdtemp(prefix="winnow-bench-imgcl-")
    data = os.path.join(root, f"meta768-{args.rows}")
    t0 = time.time()
    make_metadata(data, args.rows)
    print(f"bench: {args.rows:,} x 768 in {data} ({time.time() - t0:.0f} s to write or check)", flush=True)
    target = os.path.join(root, "target.npy")
    with np.load(os.path.join(data, "00000.npz")) as z:
        np.save(target, z["l14_img"][:5000].astype(np.float32))  # 5,000 rows play ImageNet-1k's embeddings
    params = ({"tag": "l14", "target": target, "n_clusters": args.clusters} if args.filter == "image_cluster" else
              {"tag": "l14", "n_clusters": args.clusters})
    recipe = {"name": f"{args.filter}_bench", "filters": [{"key": args.filter, "params": params}],
              "select": [{"threshold": {"column": f"{args.filter}_l14_score", "min": 1}}]}
    out = os.path.join(root, "out")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(os.path.join(data, "scores"), ignore_errors=True)
    stamps = []

    def log(message: str) -> None:
        stamps.append((time.time(), message))
        print(message, flush=True)

    with Runner(ClusterConfig(n_workers=2), log=log) as runner:
        runner.start()
        with PeakRSS() as mem:
            start = time.time()
            doc = subset(recipe, data, out, runner, log=log)
            wall = time.time() - start
    prepared = next((t for t, m in stamps if m.startswith(f"{args.filter}:")), start)
    procs = sorted(mem.processes.values(), key=lambda p: -p[1])
    print(f"\n{args.filter} on {args.rows:,} x 768 (float16), {args.clusters} clusters, 2 workers: {wall:.0f} s "
          f"(sample + k-means {prepared - start:.0f} s, assignment and selection {start + wall - prepared:.0f} s); "
          f"kept {doc['kept']:,}")
    print(f"peak memory: tree {mem.peak / 2**30:.2f} GiB; per process:")
    for label, peak in procs:
        print(f"    {peak / 2**30:6.2f} GiB  {label}")
    baseline = args.rows * 768 * 4 / 2**30
    print(f"baseline (all rows in memory for k-means, as DataComp): {baseline:.1f} GiB; ratio of the largest process "
          f"to it: {procs[0][1] / 2**30 / baseline:.3f}")
    scale = 100_000 / args.clusters
    print(f"100,000 clusters (DataComp's) on these 2 cores: about {(prepared - start) * scale / 3600:.1f} h of k-means "
          f"and {(start + wall - prepared) * scale / 3600:.1f} h of assignment (linear in clusters); memory grows by "
          f"the centroids only ({100_000 * 768 * 4 / 2**30:.2f} GiB)")
    if not args.data:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
