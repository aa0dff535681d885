"""The hostile web benchmark: plain img2dataset vs `winnow ingest` on the same hostile URL list, same server.

The list (:func:`winnow.pipeline.synth.hostile.hostile_rows`: 65 rows) has trickled headers and bodies, endless and
falsely announced bodies, chunked bodies cut short or with a bad chunk-size line, protocol junk, gzip, pixel and
EXIF bombs (24,000 RATIONAL tags: minutes of exifread), redirects to private and metadata addresses, to other
schemes and to unparseable targets, and good images in odd modes (an EXIF-rotated one among them); the server
gives up on a trickle after 150 s and on an endless body after 1 GiB, so a downloader without limits still ends. Both
tools run as commands with their default time and byte limits
(Winnow's list allows only its loopback server, 127.0.0.1), one after the other. Reported per tool: wall time,
peak memory of the whole process tree (children included, summed RSS sampled every 0.2 s) and of its largest
process, rows downloaded, and connections to the canary (a listener on 127.0.0.2, which no row may reach).
Targets: winnow <= 30 s and peak < 1 GiB while img2dataset takes > 120 s.

    python benchmarks/bench_hostile.py [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_select import PeakRSS  # noqa: E402

from winnow.pipeline.synth.hostile import Canary, HostileServer, hostile_rows  # noqa: E402


def run(cmd: list[str]) -> tuple[float, PeakRSS, int]:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as mem:
        _, err = proc.communicate()
    return time.monotonic() - start, mem, proc.returncode


def ok_rows(out: str) -> int:
    return sum(json.load(open(os.path.join(out, f)))["successes"] for f in os.listdir(out) if f.endswith("_stats.json"))


def good_rows_ok(out: str, rows: list[dict]) -> int:
    """How many of the rows that deserve ``ok`` the tool wrote (by uid; img2dataset's status is success)."""
    good = {r["uid"] for r in rows if r["expected"] == "ok"}
    tables = [pd.read_parquet(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".parquet")]
    if not tables:
        return 0
    table = pd.concat(tables)
    return int(((table["status"] == "success") & table["uid"].isin(good)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="download processes (img2dataset) / Dask workers")
    args = ap.parse_args()
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    root = tempfile.mkdtemp(prefix="winnow-hostile-")
    bindir = os.path.dirname(sys.executable)
    results = []
    with Canary() as canary, HostileServer(canary_url=canary.url) as server:
        rows = hostile_rows(server.url, canary)
        urls = os.path.join(root, "urls.csv")
        pd.DataFrame(rows)[["url", "caption", "uid"]].to_csv(urls, index=False)
        expected_ok = sum(r["expected"] == "ok" for r in rows)
        tools = {
            "img2dataset": [os.path.join(bindir, "img2dataset"), f"--url_list={urls}", "--input_format=csv",
                            f"--output_folder={root}/img2dataset", "--url_col=url", "--caption_col=caption",
                            "--save_additional_columns=['uid']", "--output_format=webdataset",
                            f"--processes_count={args.workers}", "--distributor=multiprocessing",
                            "--enable_wandb=False"],
            "winnow ingest": [os.path.join(bindir, "winnow"), "ingest", urls, f"{root}/winnow", "--workers",
                              str(args.workers), "--set", "ingest.allow_hosts=[127.0.0.1]"],
        }
        for name, cmd in tools.items():
            before = canary.connections
            print(f"bench: {name} on {len(rows)} hostile rows ...", flush=True)
            wall, mem, code = run(cmd)
            out = f"{root}/{name.split()[0]}"
            largest = max(mem.processes.values(), key=lambda v: v[1])
            results.append((name, wall, mem.peak, largest, good_rows_ok(out, rows) if os.path.isdir(out) else 0,
                            canary.connections - before, code))
            print(f"bench: {name}: {wall:.1f} s, exit {code}, peak tree {mem.peak / 2**30:.2f} GiB "
                  f"({len(mem.processes)} processes)", flush=True)
            for pid, (label, peak) in sorted(mem.processes.items(), key=lambda kv: -kv[1][1]):
                print(f"    {peak / 2**20:8.0f} MiB  pid {pid}  {label}")
    print()
    print(f"hostile list of {len(rows)} rows ({expected_ok} good images), {args.workers} processes, one run each")
    print(f"{'tool':<14} {'wall s':>7} {'peak tree GiB':>14} {'largest GiB':>12} {'good ok':>8} {'canary':>7} "
          f"{'exit':>5}")
    for name, wall, peak, largest, ok, hits, code in results:
        print(f"{name:<14} {wall:>7.1f} {peak / 2**30:>14.2f} {largest[1] / 2**30:>12.2f} {ok:>4}/{expected_ok:<3} "
              f"{hits:>7} {code:>5}")
    (_, base, base_peak, *_), (_, ours, our_peak, *_) = results
    print(f"ratio winnow/img2dataset: wall {ours / base:.3f}, peak memory {our_peak / base_peak:.3f}")
    print(f"targets: winnow <= 30 s ({'met' if ours <= 30 else 'MISSED'}), winnow peak < 1 GiB "
          f"({'met' if our_peak < 2**30 else 'MISSED'}), every good row ok for winnow "
          f"({'met' if results[1][4] == expected_ok else 'MISSED'}), img2dataset > 120 s "
          f"({'yes' if base > 120 else 'no'})")


if __name__ == "__main__":
    main()
