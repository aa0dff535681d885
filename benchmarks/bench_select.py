"""Filter + select over a synthesized pool shaped like DataComp small's metadata (12.8M rows, 26 parquet files).

Columns as in CommonPool: uid, url, text, original_width, original_height, clip_b32_similarity_score,
clip_l14_similarity_score, face_bboxes, sha256. Recipes run with ``winnow``'s scoring and selection (a local
Dask cluster, scores cached per filter) from a cold cache:

- ``clip_l14_30pct``: DataComp's best small-scale baseline (global top 30% by the L/14 column);
- ``basic_no_lang``: basic filtering's caption and image-size rules (word and character counts, shorter side,
  aspect ratio). Language identification is measured separately below: on a 2-core machine it dominates.

Baseline, in the same run: DataComp's way, one pandas pass per recipe over all files (read the needed columns,
compute the mask with numpy, np.quantile-free fraction rule), single process. Peak memory is the largest total
RSS of this process and all its children, sampled every 0.2 s. Target: < 60 s and < 4 GiB.

    python benchmarks/bench_select.py [--rows 12800000] [--files 26]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("a photo of the red blue green small large cat dog car house tree star heart shirt shoe table chair "
         "lamp city beach mountain flower for sale vintage best new free download image picture").split()


def make_pool(folder: str, rows: int, files: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = rows // files
    for f in range(files):
        n = per if f < files - 1 else rows - per * (files - 1)
        lengths = rng.integers(1, 14, n)
        vocab = np.array(WORDS)
        flat = vocab[rng.integers(0, len(vocab), lengths.sum())]
        cuts = np.cumsum(lengths)[:-1]
        text = [" ".join(ws) for ws in np.split(flat, cuts)]
        hi = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        lo = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        uid = np.char.add(np.char.zfill(np.char.mod("%x", hi), 16), np.char.zfill(np.char.mod("%x", lo), 16))
        table = pa.table({
            "uid": pa.array(uid.astype(str)),
            "url": pa.array(np.char.add("http://example.com/img/", uid.astype(str))),
            "text": pa.array(text),
            "original_width": pa.array(rng.integers(32, 2000, n)),
            "original_height": pa.array(rng.integers(32, 2000, n)),
            "clip_b32_similarity_score": pa.array(rng.normal(0.25, 0.05, n).astype(np.float32)),
            "clip_l14_similarity_score": pa.array(rng.normal(0.22, 0.05, n).astype(np.float32)),
            "face_bboxes": pa.array([[]] * n, type=pa.list_(pa.list_(pa.float64()))),
            "sha256": pa.array(np.char.add(uid.astype(str), uid.astype(str))),
        })
        pq.write_table(table, os.path.join(folder, f"{f:032x}.parquet"))


BASIC_NO_LANG = {
    "name": "basic_no_lang",
    "filters": [{"key": "caption_words"}, {"key": "caption_chars"}, {"key": "min_side"}, {"key": "aspect_ratio"}],
    "select": [{"threshold": {"column": "caption_words_score", "min": 3}},
               {"threshold": {"column": "caption_chars_score", "min": 6}},
               {"threshold": {"column": "min_side_score", "min": 200}},
               {"threshold": {"column": "aspect_ratio_score", "max": 3}}],
}


def baseline(folder: str, recipe: str) -> int:
    """DataComp's apply_filter style: one pass over every parquet with pandas and numpy."""
    kept = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".parquet"):
            continue
        path = os.path.join(folder, name)
        if recipe == "clip_l14_30pct":
            kept.append(pd.read_parquet(path, columns=["uid", "clip_l14_similarity_score"]))
        else:
            df = pd.read_parquet(path, columns=["uid", "text", "original_width", "original_height"])
            w, h = df["original_width"].to_numpy(), df["original_height"].to_numpy()
            mask = (df["text"].str.split().str.len() > 2) & (df["text"].str.len() > 5)
            mask &= (np.minimum(w, h) >= 200) & (np.maximum(w, h) / np.minimum(w, h) <= 3)
            kept.append(df.loc[mask, ["uid"]])
    df = pd.concat(kept, ignore_index=True)
    if recipe == "clip_l14_30pct":
        scores = df["clip_l14_similarity_score"].to_numpy()
        n = int(len(scores) * 0.3)
        threshold = -np.sort(-scores)[n]
        df = df[scores >= threshold]
    return len(df)


class PeakRSS:
    """Peak resident memory of a process tree (this process, or ``pid``, and all children: Dask workers, download
    processes), sampled in a thread every 0.2 s: ``peak`` of the sum, and ``processes`` {pid: (label, peak)}."""

    def __init__(self, pid: int | None = None):
        self.pid = pid

    def __enter__(self):
        self.peak, self.stop, self.processes = 0, threading.Event(), {}
        root = psutil.Process(self.pid)

        def sample():
            while not self.stop.is_set():
                total = 0
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    tree = []
                for p in tree:
                    try:
                        rss = p.memory_info().rss
                        label = self.processes.get(p.pid, ("", 0))[0] or " ".join(p.cmdline()[1:4])[:60]
                    except psutil.Error:
                        continue
                    total += rss
                    self.processes[p.pid] = (label, max(rss, self.processes.get(p.pid, ("", 0))[1]))
                self.peak = max(self.peak, total)
                time.sleep(0.2)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    from pipeline.run.runner import ClusterConfig, Runner
    from pipeline.stages.subset import subset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=26)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="keep the synthesized pool in this folder (and reuse it)")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="winnow-bench-select-")
    pool = os.path.join(root, "metadata")
    if not os.path.isdir(pool):
        os.makedirs(pool)
        t = time.time()
        make_pool(pool, args.rows, args.files)
        print(f"bench: synthesized {args.rows:,} rows in {args.files} files in {time.time() - t:.0f} s", flush=True)
    results = []
    for recipe in ("clip_l14_30pct", BASIC_NO_LANG):
        name = recipe if isinstance(recipe, str) else recipe["name"]
        shutil.rmtree(os.path.join(pool, "scores"), ignore_errors=True)
        with PeakRSS() as mem:
            t = time.time()
            with Runner(ClusterConfig(n_workers=args.workers), log=lambda m: None) as runner:
                doc = subset(recipe, pool, os.path.join(root, "out", name), runner, log=lambda m: None)
            ours = time.time() - t
        with PeakRSS() as base_mem:
            t = time.time()
            base_kept = baseline(pool, name)
            base = time.time() - t
        assert base_kept == doc["kept"], (name, base_kept, doc["kept"])
        results.append((name, doc["kept"], ours, mem.peak, base, base_mem.peak))
        print(f"bench: {name}: winnow {ours:.1f} s, baseline {base:.1f} s", flush=True)

    from filters import build

    sample = pd.read_parquet(os.path.join(pool, sorted(os.listdir(pool))[0]), columns=["text"]).iloc[:20_000]
    t = time.time()
    build({"key": "english"})(sample.rename(columns={"text": "caption"}))
    per_row = (time.time() - t) / len(sample)

    print()
    print(f"filter + select over {args.rows:,} rows ({args.files} parquet files), {args.workers} workers, cold cache")
    print(f"{'recipe':<16} {'kept':>11} {'winnow s':>9} {'peak GiB':>9} {'baseline s':>11} {'peak GiB':>9} "
          f"{'ratio':>6}")
    for name, kept, ours, peak, base, base_peak in results:
        print(f"{name:<16} {kept:>11,} {ours:>9.1f} {peak / 2**30:>9.2f} {base:>11.1f} {base_peak / 2**30:>9.2f} "
              f"{ours / base:>6.2f}")
    print("target: < 60 s and < 4 GiB per recipe")
    print(f"english (py3langid): {per_row * 1e6:.1f} us/caption on one core -> {per_row * args.rows / args.workers:.0f} s "
          f"for {args.rows:,} captions on {args.workers} cores")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
