"""The embedding-only curation methods at DataComp small's size: each as `winnow subset` runs it, on 2 workers.

Methods (``--methods``; each a recipe, its settings printed and overridable with ``--var METHOD.NAME=VALUE``):
``negcliploss`` (the shipped ``negcliploss_30pct``: K = 10 batches of 32,768, tau = 0.01), ``normsim2`` and
``normsim_inf`` (NormSim with p = 2 / inf, top 30%, against a synthesized target of ``--target-rows`` images,
default 1,281,167 as ImageNet-1k train), ``density`` (``density_30pct``: 100 clusters, k-means on 500,000
rows) and ``metaclip`` (``metaclip_balanced`` when shipped).

The pool is DataComp-metadata-shaped: ``--files`` parquet files (uid, url, text, original_width/height,
clip_l14_similarity_score) of ``--rows`` rows in all (default 12.8M in 128 files), each beside an ``.npz`` with
``l14_img`` and ``l14_txt`` (``--dim`` 768, float16, unit rows). Images come from a mixture of 1,000 Gaussian
clusters of differing spread and Zipf-like weights; a text is near its image's cluster (a fifth of them near another
cluster); each caption names its cluster's concept word (an ImageNet-21k WordNet word) among filler words, so
MetaCLIP's matching has work and head entries to cap. The data are written once, file by file as needed, into
``--keep`` (default a temporary folder removed at the end): 12.8M rows take about 40 GB; the free space is checked
first and, if the pool does not fit, the largest number of files that fits is measured and the rest extrapolated.

Each method is one fresh process tree (``python -m winnow.workflows.cli subset RECIPE --workers N``, a new score
cache),
its wall time (including Python's start and the local Dask cluster's) and the peak resident memory of every
process (the driver, the Dask scheduler and workers), sampled every 0.2 s. ``--fraction-of-rows F`` measures on
the first round(F x files) files and prints a linear extrapolation to the full size (time x the rounds of one file
per worker the full pool takes / the rounds measured: 1 file on 2 workers is one round of 64; memory is not
extrapolated: a worker holds one part at a time, the driver the pool's score columns).
Target: each method under 30 minutes on this 2-core machine, no process above 4 GiB.

    python benchmarks/bench_curation_methods.py [--rows 12800000] [--files 128] [--dim 768] [--workers 2]
        [--methods negcliploss,normsim2,normsim_inf,density,metaclip] [--keep DIR] [--fraction-of-rows 0.0625]
        [--target-rows 1281167] [--var negcliploss.batches=1 ...]

Measured 2026-12-03 on the 2-core machine (12.8M rows, 128 files, 768-d float16, 2 workers; * = a run that shared
the machine with other work, an upper bound):

    method        setting                          rows measured  wall s   full s         largest process
    metaclip      metaclip_balanced (t scaled: 80)  12.8M          374*     374            0.56 GiB driver
    normsim2      1,281,167 target images           12.8M          604      604            2.94 GiB driver (1.97 of
                                                                                           it the mapped target file)
    density       100 clusters, k-means on 500k     12.8M          645*     645            3.10 GiB driver
    negcliploss   K = 10, b = 32,768 (the paper's)  100k (1 file)  919      ~58,800 (16 h) 2.95 GiB worker
    negcliploss   K = 1, b = 1,024                  12.8M          546*     546            3.01 GiB worker
    normsim_inf   128,117 target images             100k (1 file)  483      ~30,900        2.01 GiB worker
    normsim_inf   2,048 target images               100k (1 file)  27       ~1,700         1.62 GiB worker
    normsim_inf   1,281,167 (ImageNet-1k train)     -              -        ~298,000 (83 h) (two-point linear fit)

negCLIPLoss and NormSim_inf at the papers' settings are compute-bound: 12.8M x 32,768 x 768 x 10 = 3.2e15 and
12.8M x 1.28M x 768 = 1.3e16 multiply-adds, about 16 h and 83 h on two cores (the measured files scaled by rounds
of one file per worker; NormSim_inf's time is linear in the target's rows: 27 s + 3.6 ms per 1,000 target rows per
file). Both run on the GPU when torch sees one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_select import measured

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(HERE, "..", "manifests", "subsets")
NORMSIM = """filters:
  - {key: norm_sim, params: {tag: l14, target: "${target}", p: ${p}}}
select:
  - top_fraction: {column: "norm_sim_${p}_l14_score", fraction: ${fraction:-0.3}}
"""
METHODS = {  # name: (recipe name or file, its variables)
    "negcliploss": ("negcliploss_30pct", {}),
    "normsim2": ("normsim.yaml", {"p": "2"}),
    "normsim_inf": ("normsim.yaml", {"p": "inf"}),
    "density": ("density_30pct", {}),
    "metaclip": ("metaclip_balanced", {}),
}
FILLER = "a photo of the my new best with and in on at for sale vintage free image picture close up view".split()
CLUSTERS = 1000


def concepts() -> list[str]:
    """The concept words captions name: ImageNet-21k WordNet words (shipped with the text-based filter)."""
    path = os.path.join(HERE, "..", "filters", "data", "imagenet21k_words.tsv")
    with open(path) as f:
        words = [line.split("\t")[0] for line in f if not line.startswith("#")]
    words = [w for w in words if w.isalpha() and len(w) > 3]
    return list(np.random.default_rng(0).choice(words, CLUSTERS, replace=False))


def mixture(dim: int, seed: int = 0):
    """The clusters: unit centres, each one's spread and weight (Zipf-like, from 5% down to 0.01%)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1 / (np.arange(CLUSTERS) + 10.0)
    return centres, rng.uniform(0.5, 1.3, CLUSTERS).astype(np.float32), weights / weights.sum()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_file(folder: str, k: int, n: int, dim: int, words: list[str], seed: int = 0) -> None:
    """Part ``k``: ``{k:05d}.parquet`` and ``{k:05d}.npz`` (written last, by rename: the part's commit marker)."""
    centres, spread, weights = mixture(dim, seed)
    rng = np.random.default_rng([seed, k])
    c = rng.choice(CLUSTERS, n, p=weights)
    img = unit(centres[c] + spread[c, None] * rng.standard_normal((n, dim), np.float32) / np.sqrt(dim))
    other = np.where(rng.random(n) < 0.2, rng.integers(0, CLUSTERS, n), c)
    txt = unit(0.3 * img + centres[other] + rng.standard_normal((n, dim), np.float32) / np.sqrt(dim))
    hi, lo = (rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) for _ in range(2))
    uid = np.char.add(np.char.zfill(np.char.mod("%x", hi), 16), np.char.zfill(np.char.mod("%x", lo), 16))
    fill = np.array(FILLER)[rng.integers(0, len(FILLER), (n, 4))]
    text = [f"{a} {b} {w} {d} {e}" for (a, b, d, e), w in zip(fill.tolist(), np.array(words)[c].tolist())]
    stem = os.path.join(folder, f"{k:05d}")
    pq.write_table(pa.table({
        "uid": uid.astype(str), "url": np.char.add("http://example.com/", uid).astype(str), "text": text,
        "original_width": rng.integers(32, 2000, n), "original_height": rng.integers(32, 2000, n),
        "clip_l14_similarity_score": np.einsum("ij,ij->i", img, txt)}), stem + ".parquet")
    np.savez(stem + ".tmp.npz", l14_img=img.astype(np.float16), l14_txt=txt.astype(np.float16))
    os.replace(stem + ".tmp.npz", stem + ".npz")


def make_target(path: str, rows: int, dim: int, seed: int = 0) -> None:
    """NormSim's target: ``rows`` float16 image embeddings from 100 of the clusters (the "downstream tasks")."""
    if os.path.exists(path):
        return
    centres, spread, _ = mixture(dim, seed)
    rng = np.random.default_rng([seed, 1 << 20])
    out = np.lib.format.open_memmap(path + ".tmp.npy", "w+", np.float16, (rows, dim))
    for s in range(0, rows, 100_000):
        c = rng.integers(0, 100, min(rows, s + 100_000) - s)
        out[s: s + len(c)] = unit(centres[c] + spread[c, None] * rng.standard_normal((len(c), dim), np.float32) /
                                  np.sqrt(dim))
    out.flush()
    del out
    os.replace(path + ".tmp.npy", path)


def role(cmdline: str) -> str:
    """What a process of `winnow subset`'s tree is, from its command line."""
    return ("driver (and Dask scheduler)" if "winnow.workflows.cli" in cmdline else "Dask worker" if "spawn" in cmdline
            else cmdline[:40])


def _prepare(args, methods: list[str]) -> tuple[str, str, str, int]:
    """Write the synthesized files that fit on disk (reusing ``--keep``'s) and link the first ones into a pool:
    returns (root, pool, NormSim target, files in the pool)."""
    root = args.keep or tempfile.mkdtemp(prefix="winnow-bench-curation-")
    data = os.path.join(root, f"data-{args.rows}-{args.files}-{args.dim}")
    os.makedirs(data, exist_ok=True)
    per = args.rows // args.files
    want = min(args.files, max(1, round(args.files * args.fraction_of_rows)))
    have = sum(os.path.exists(os.path.join(data, f"{k:05d}.npz")) for k in range(want))
    per_file = per * (args.dim * 2 * 2 + 150)  # two float16 arrays and the parquet's ~150 bytes a row
    target = os.path.join(root, f"target-{args.target_rows}-{args.dim}.npy")
    free = shutil.disk_usage(root).free - 5 * 2**30 - (0 if os.path.exists(target) else args.target_rows * args.dim * 2)
    fits = have + max(0, free // per_file)
    if fits < want:
        print(f"bench: {want} files need {(want - have) * per_file / 1e9:.0f} GB more, {free / 1e9:.0f} GB free "
              f"(keeping 5 GiB): measuring {fits} files", flush=True)
        want = int(fits)
        if not want:
            raise SystemExit(f"bench: no file fits in {root}; free some space or pass --keep on a larger disk")
    t = time.time()
    words = concepts()
    for k in range(want):
        if not os.path.exists(os.path.join(data, f"{k:05d}.npz")):
            make_file(data, k, per if k < args.files - 1 else args.rows - per * (args.files - 1), args.dim, words)
    if any(m.startswith("normsim") for m in methods):
        make_target(target, args.target_rows, args.dim)
    print(f"bench: {want} files of {per:,} rows in {data}; {want - have} written in {time.time() - t:.0f} s "
          f"({'kept' if args.keep else 'removed at the end'})", flush=True)
    pool = os.path.join(root, f"pool-{want}")  # the first `want` files, linked
    if not os.path.isdir(pool):
        os.makedirs(pool + ".tmp", exist_ok=True)
        for k in range(want):
            for ext in (".parquet", ".npz"):
                os.symlink(os.path.join(data, f"{k:05d}{ext}"), os.path.join(pool + ".tmp", f"{k:05d}{ext}"))
        os.replace(pool + ".tmp", pool)
    return root, pool, target, want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--keep", help="write the synthesized pool here, once, and reuse it (default: a temporary folder)")
    ap.add_argument("--fraction-of-rows", type=float, default=1.0, help="measure on this share of the files")
    ap.add_argument("--target-rows", type=int, default=1_281_167, help="NormSim's target images")
    ap.add_argument("--var", action="append", default=[], help="METHOD.NAME=VALUE: a recipe variable")
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"bench: unknown method {sorted(unknown)[0]!r}; choose from {', '.join(METHODS)}")
    root, pool, target, want = _prepare(args, methods)
    with open(os.path.join(root, "normsim.yaml"), "w") as f:
        f.write(NORMSIM)
    scale = math.ceil(args.files / args.workers) / math.ceil(want / args.workers)  # rounds of one file per worker
    rows = sum(pq.ParquetFile(os.path.join(pool, f"{k:05d}.parquet")).metadata.num_rows for k in range(want))
    results = []
    for name in methods:
        recipe, variables = METHODS[name]
        variables = {**variables, **({"target": target} if name.startswith("normsim") else {})}
        variables.update(v.split(".", 1)[1].split("=", 1) for v in args.var if v.startswith(name + "."))
        path = os.path.join(root, recipe) if recipe.endswith(".yaml") else recipe
        if not recipe.endswith(".yaml") and not os.path.exists(os.path.join(RECIPES, recipe + ".yaml")):
            print(f"bench: {name}: recipe {recipe} is not shipped yet; skipped", flush=True)
            continue
        out, cache = os.path.join(root, "out", name), os.path.join(root, "cache", name)

        def fresh(out=out, cache=cache):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

        cmd = [sys.executable, "-m", "winnow.workflows.cli", "subset", path, "--pool", pool, "--out", out,
               "--cache", cache, "--workers", str(args.workers)] + [
                  a for k, v in variables.items() for a in ("--var", f"{k}={v}")]
        print(f"bench: {name}: {recipe} {variables}", flush=True)
        try:
            wall, mem = measured(cmd, before=fresh)
        except SystemExit as exc:
            print(f"bench: {name} failed: {str(exc)[-2000:]}", flush=True)
            continue
        with open(os.path.join(out, "subset.json")) as f:
            kept = json.load(f)["kept"]
        print(f"bench: {name}: {wall:.0f} s, largest process {mem.largest / 2**30:.2f} GiB, kept {kept:,}", flush=True)
        results.append((name, recipe, variables, wall, mem, kept))
    print(f"\nmeasured on {rows:,} rows ({want} of {args.files} files, {args.dim}-d float16), {args.workers} workers; "
          f"wall time includes Python's and Dask's start" +
          (f"; 'full' = measured x {scale:g} (rounds of one file per worker), a linear extrapolation"
           if scale != 1 else ""))
    print(f"{'method':<12} {'measured s':>10} {'full s':>8} {'largest GiB':>11} {'tree GiB':>8} {'kept':>11}  settings")
    for name, recipe, variables, wall, mem, kept in results:
        shown = {k: (os.path.basename(v) if k == "target" else v) for k, v in variables.items()}
        print(f"{name:<12} {wall:>10.0f} {wall * scale:>8.0f} {mem.largest / 2**30:>11.2f} {mem.peak / 2**30:>8.2f} "
              f"{kept:>11,}  {recipe} {shown}")
    print("\npeak memory per process (GiB):")
    for name, _, _, _, mem, _ in results:
        top = sorted(mem.processes.values(), key=lambda p: -p[1])
        print(f"  {name:<12} " + "; ".join(f"{rss / 2**30:.2f} {role(label)}" for label, rss in top if rss > 2**26))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
