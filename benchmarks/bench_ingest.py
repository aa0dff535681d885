"""Ingest benchmark: plain img2dataset vs `winnow ingest` on the same URL list from the same local server.

Both tools run as commands (their own start-up included), with the same download and resize settings, one
process per core, alternating, ``--repeats`` times each; the table reports the best wall time of each and the
ratio. The synthetic pool here has no `slow`/`hang`/`bomb` URLs: plain img2dataset has no stall limit and would
decode the bomb, so those would measure the defects rather than the tools. Target: Winnow's overhead <= 10%.

    python benchmarks/bench_ingest.py [--n 6000] [--repeats 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import yaml

from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.ingest import IngestConfig
from winnow.pipeline.synth.world import DefectRates, SynthConfig, build_world


def build_bench_world(root: str, n: int, workers: int) -> tuple[str, int]:
    """``root/world``: a synthetic pool of ``n`` URLs without slow, bomb or hanging rows, to be served on the
    returned free port."""
    port = _free_port()
    synth = SynthConfig(seed=1, n_pool=n, n_clean=1, n_eval_per_class=1, base_url=f"http://127.0.0.1:{port}",
                        rates=DefectRates(slow=0.0, bomb=0, hang=0))
    world = os.path.join(root, "world")
    print(f"bench: building a {n:,}-URL synthetic pool in {world} ...", flush=True)
    with Runner(ClusterConfig(n_workers=workers), log=lambda m: None) as runner:
        build_world(synth, world, runner, log=lambda m: None)
    return world, port


def _free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_ok(pool: str) -> int:
    return sum(json.load(open(os.path.join(pool, f)))["successes"] for f in os.listdir(pool)
               if f.endswith("_stats.json"))


def run_img2dataset(urls: str, out: str, cfg: IngestConfig, workers: int) -> float:
    cmd = ["img2dataset", f"--url_list={urls}", f"--output_folder={out}", "--input_format=parquet",
           "--url_col=url", "--caption_col=text", "--save_additional_columns=['uid']", "--output_format=webdataset",
           f"--processes_count={workers}", f"--thread_count={cfg.thread_count}",
           f"--number_sample_per_shard={cfg.shard_size}", f"--image_size={cfg.image_size}",
           f"--resize_mode={cfg.resize_mode}", f"--resize_only_if_bigger={cfg.resize_only_if_bigger}",
           f"--encode_quality={cfg.encode_quality}", f"--timeout={cfg.timeout}", f"--retries={cfg.retries}",
           "--oom_shard_count=8", "--distributor=multiprocessing", "--enable_wandb=False"]
    start = time.monotonic()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), cmd[0]), *cmd[1:]], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def run_winnow(urls: str, out: str, config_file: str, workers: int) -> float:
    start = time.monotonic()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "winnow"), "ingest", urls, out, "--config",
                    config_file, "--workers", str(workers)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6000, help="URLs in the list")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="download processes (img2dataset) / Dask workers")
    ap.add_argument("--keep", help="keep the world and outputs in this folder")
    args = ap.parse_args()
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

    root = args.keep or tempfile.mkdtemp(prefix="winnow-bench-")
    world, port = build_bench_world(root, args.n, args.workers)
    cfg = IngestConfig(shard_size=1000, timeout=5, retries=1, stall_seconds=60, thread_count=32,
                       allow_hosts=["127.0.0.1"])
    config_file = os.path.join(root, "winnow.yaml")
    with open(config_file, "w") as f:
        yaml.safe_dump({"ingest": asdict(cfg)}, f)
    urls = os.path.join(world, "urls.parquet")

    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "winnow"), "serve", world, "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: dict[str, list[float]] = {"img2dataset": [], "winnow ingest": []}
    oks: dict[str, int] = {}
    try:
        time.sleep(2)
        for r in range(args.repeats):
            for name in times:
                out = os.path.join(root, f"out-{name.split()[0]}-{r}")
                shutil.rmtree(out, ignore_errors=True)
                t = run_img2dataset(urls, out, cfg, args.workers) if name == "img2dataset" else \
                    run_winnow(urls, out, config_file, args.workers)
                times[name].append(t)
                oks[name] = _count_ok(out)
                print(f"bench: {name} run {r + 1}: {t:.1f} s, {oks[name]:,} ok", flush=True)
    finally:
        server.terminate()
        server.wait()
    base, ours = min(times["img2dataset"]), min(times["winnow ingest"])
    print()
    print(f"ingest of {args.n:,} URLs, {args.workers} processes, best of {args.repeats}")
    print(f"{'tool':<16} {'wall s':>8} {'URLs/s':>8} {'ok':>7}")
    for name, t in (("img2dataset", base), ("winnow ingest", ours)):
        print(f"{name:<16} {t:>8.1f} {args.n / t:>8.0f} {oks[name]:>7,}")
    print(f"ratio winnow/img2dataset = {ours / base:.3f} (overhead {ours / base - 1:+.1%}; target <= +10%)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
