"""Safety at ingest: what opt-outs, hashing and personal-data masking cost, and what the detectors cost and find.

1. Ingest of the same loopback world (no planted opt-outs, so every variant downloads the same URLs) by plain
   img2dataset (the baseline), ``winnow ingest`` with every safety step off (robots.txt, TDMRep, personal data,
   blocklists), with them on but a blocklist of sha256 entries only (``--entries``), and with them all on
   (robots.txt and tdmrep.json per site, ``--entries`` sha256 and as many PDQ hashes, captions masked): best wall
   time of ``--repeats``, the ratio to img2dataset, and the peak memory of every process. Target: safety on
   <= 15% over img2dataset. PDQ needs the decoded pixels (a second decode beside img2dataset's resizer).
2. The detectors alone, per image on one core: OpenCV's face cascade, NudeNet (NSFW and faces), PDQ hashing.
3. Face recall on real photographs: scikit-image's Labeled Faces in the Wild sample (100 faces, 100 non-faces;
   25 px crops upscaled to 100 px on a 200 px canvas), for the cascade and for NudeNet's face classes.

    python benchmarks/bench_safety.py [--n 4000] [--repeats 2] [--workers 2] [--entries 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import yaml
from bench_ingest import _count_ok, build_bench_world
from bench_select import measured

from winnow.pipeline.models.detect import Detector
from winnow.pipeline.stages.ingest import IngestConfig
from winnow.pipeline.web.blocklist import image_for_pdq, pdq_of


def img2dataset_cmd(urls: str, out: str, cfg: IngestConfig, workers: int) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "img2dataset"), f"--url_list={urls}",
            f"--output_folder={out}", "--input_format=parquet", "--url_col=url", "--caption_col=text",
            "--save_additional_columns=['uid']", "--output_format=webdataset", f"--processes_count={workers}",
            f"--thread_count={cfg.thread_count}", f"--number_sample_per_shard={cfg.shard_size}",
            f"--image_size={cfg.image_size}", f"--resize_mode={cfg.resize_mode}",
            f"--resize_only_if_bigger={cfg.resize_only_if_bigger}", f"--encode_quality={cfg.encode_quality}",
            f"--timeout={cfg.timeout}", f"--retries={cfg.retries}", "--oom_shard_count=8",
            "--distributor=multiprocessing", "--enable_wandb=False"]


def winnow_cmd(urls: str, out: str, cfg: IngestConfig, root: str, name: str, workers: int) -> list[str]:
    config = os.path.join(root, f"{name}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"ingest": asdict(cfg)}, f)
    return [os.path.join(os.path.dirname(sys.executable), "winnow"), "ingest", urls, out, "--config", config,
            "--workers", str(workers)]


def blocklist(path: str, entries: int, pdq: bool = True) -> None:
    """``entries`` sha256 (and as many PDQ) lines that match nothing of the world (random hashes)."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(entries):
            f.write(f"sha256:{rng.bytes(32).hex()}\n" + (f"pdq:{rng.bytes(32).hex()}\n" if pdq else ""))


def per_image(fn, images: list, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for img in images:
            fn(img)
    return (time.perf_counter() - start) / (len(images) * repeat)


def detectors(world: str) -> None:
    import cv2
    import skimage.data


    files = sorted(os.listdir(os.path.join(world, "site", "img")))[:80]
    data, rgb = [], []
    for name in files:  # the world's corrupt and truncated files are left out
        blob = open(os.path.join(world, "site", "img", name), "rb").read()
        try:
            rgb.append(np.asarray(image_for_pdq(blob)))
            data.append(blob)
        except Exception:  # noqa: BLE001
            continue
    faces, nudenet = Detector(("faces",)), Detector(("nsfw",))
    print("\ndetectors per image, one core (synthetic 290-600 px images, decoded once beforehand):")
    print(f"  face cascade (OpenCV)   {per_image(faces, rgb) * 1e3:7.1f} ms")
    print(f"  NudeNet (NSFW + faces)  {per_image(nudenet, rgb) * 1e3:7.1f} ms")
    print(f"  PDQ hash (decode incl.) {per_image(lambda d: pdq_of(image_for_pdq(d)), data) * 1e3:7.1f} ms")
    print(f"  sha256 of the bytes     {per_image(lambda d: hashlib.sha256(d).digest(), data, 20) * 1e3:7.3f} ms")

    lfw = skimage.data.lfw_subset()

    def canvas(crop):
        face = cv2.resize((np.clip(crop, 0, 1) * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
        c = np.full((200, 200), 128, np.uint8)
        c[50:150, 50:150] = face
        return cv2.cvtColor(c, cv2.COLOR_GRAY2RGB)

    print("\nface recall, scikit-image's LFW sample (100 faces, 100 non-faces):")
    for name, det in (("haar", faces), ("nudenet", Detector(("faces",), "nudenet"))):
        found = [bool(det(canvas(x))["face_bboxes"]) for x in lfw]
        print(f"  {name:<8} faces found {sum(found[:100]):>3}/100, non-faces flagged {sum(found[100:]):>3}/100")
    portrait = skimage.data.astronaut()
    print(f"  astronaut portrait: cascade {len(faces(portrait)['face_bboxes'])} face(s), NudeNet NSFW "
          f"{nudenet(portrait)['nsfw']:.2f}; coffee NSFW {nudenet(skimage.data.coffee())['nsfw']:.2f}; synthetic "
          f"shapes max NSFW {max(nudenet(x)['nsfw'] for x in rgb):.2f}")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="URLs in the list")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--entries", type=int, default=10_000, help="sha256 and PDQ entries each in the blocklist")
    args = ap.parse_args()
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    root = tempfile.mkdtemp(prefix="winnow-bench-safety-")
    world, port = build_bench_world(root, args.n, args.workers)
    listed, exact = os.path.join(root, "blocklist.txt"), os.path.join(root, "sha256.txt")
    blocklist(listed, args.entries)
    blocklist(exact, args.entries, pdq=False)
    base = IngestConfig(shard_size=500, timeout=5, retries=1, stall_seconds=60, thread_count=32,
                        allow_hosts=["127.0.0.1"])
    off = replace(base, robots_txt=False, tdmrep=False, personal_data="keep")
    on = replace(base, blocklists=[listed])
    no_pdq = replace(base, blocklists=[exact])
    urls = os.path.join(world, "urls.parquet")
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "winnow"), "serve", world, "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    variants = {"img2dataset": None, "winnow, safety off": off, "winnow, on, no PDQ": no_pdq,
                "winnow, safety on": on}
    results = {}
    try:
        time.sleep(2)
        for name, cfg in variants.items():
            out = os.path.join(root, name.replace(",", "").replace(" ", "-"))
            cmd = img2dataset_cmd(urls, out, base, args.workers) if cfg is None else \
                winnow_cmd(urls, out, cfg, root, name.split(",")[-1].strip().replace(" ", "-"), args.workers)
            wall, mem = measured(cmd, args.repeats, before=lambda out=out: shutil.rmtree(out, ignore_errors=True))
            results[name] = (wall, mem, _count_ok(out))
            print(f"bench: {name}: {wall:.1f} s, {results[name][2]:,} ok", flush=True)
    finally:
        server.terminate()
        server.wait()
    ref = results["img2dataset"][0]
    print(f"\ningest of {args.n:,} URLs, {args.workers} processes, best of {args.repeats}; blocklist of "
          f"{args.entries:,} sha256 + {args.entries:,} PDQ entries")
    print(f"{'variant':<20} {'wall s':>7} {'ratio':>6} {'ok':>6} {'tree GiB':>9} {'largest GiB':>11}")
    for name, (wall, mem, ok) in results.items():
        print(f"{name:<20} {wall:>7.1f} {wall / ref:>6.2f} {ok:>6,} {mem.peak / 2**30:>9.2f} "
              f"{mem.largest / 2**30:>11.2f}")
    print("target: safety on <= 1.15 x img2dataset")
    print("\npeak memory per process (GiB):")
    for name, (_, mem, _) in results.items():
        procs = sorted(mem.processes.values(), key=lambda p: -p[1])
        print(f"  {name}: " + "; ".join(f"{label or '?'} {rss / 2**30:.2f}" for label, rss in procs[:6]))
    detectors(world)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
