"""The download process: img2dataset's own per-shard machinery, driven over a pipe.

One such process runs beside each Dask worker (see :mod:`winnow.pipeline.stages.ingest`). It reads one JSON job per
line on
stdin, runs ``img2dataset.downloader.Downloader.download_shard`` for it (its thread pool, hashing, EXIF and
resizer), and answers one JSON line. Four things are Winnow's:

- each row's whole work runs in its download thread: the fetch (:func:`winnow.pipeline.web.fetch.fetch`: URL policy,
  per-URL deadline, byte cap, replacing img2dataset's urllib download), then :func:`_prepare`: the checks of
  :func:`winnow.pipeline.data.images.inspect_image` (non-images, truncation, decompression bombs), 16-bit images
  converted to 8 bits (OpenCV would clip them), the EXIF orientation applied, img2dataset's own resizer (and
  blurrer), EXIF read from the Exif segment alone. Decoding holds one of ``decode_threads`` slots (pixels in
  memory at once) and runs under a CPU budget (``cpu_seconds``, :mod:`winnow.pipeline.core.budget`), so one costly
  image ends as ``over_budget`` instead of holding up its neighbours; any exception becomes the row's state.
  img2dataset's single sample loop then only hashes and writes what the threads prepared. Rows the parent marks
  as skipped (bad or duplicate uid, abandoned earlier) are answered at once without a request;
- a progress file: per row ``+`` (download started), ``~`` (downloaded, waiting for a decode slot), ``*``
  (decoding), ``=`` (prepared) and ``-`` (written), each followed by the row's index, so the parent knows exactly
  which rows were at work (``+`` or ``*``) if this process stalls or dies; rows that were only waiting are
  downloaded again;
- the sample writer (:class:`ShardWriter`): the tar webdataset's ``TarWriter`` would write (members in extension
  order, mode 0444) with a fixed mtime and the samples in key order, so a shard's bytes depend only on its
  samples, not on the order the downloads finished in; and one parquet.

A write that fails with an OS error (disk full, read-only folder) ends the shard at once with one message,
instead of one traceback per remaining sample. img2dataset's package ``__init__`` imports its command line and,
through webdataset, torch (about 500 MB and seconds per process) for code this process never runs, so only the
two modules it uses are loaded (:func:`_img2dataset`): the process stays near 150 MB.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import sys
import threading
import types
from collections import Counter

import numpy as np


class _WriteFailed(BaseException):
    """Raised through img2dataset's per-sample ``except Exception``: a failed write ends the shard."""


class _Progress:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def mark(self, sign: str, index: int) -> None:
        with self._lock:
            self._file.write(f"{sign}{index}\n")

    def close(self) -> None:
        self._file.close()


def _img2dataset():
    """img2dataset's ``downloader`` and ``resizer`` modules, loaded without the package ``__init__`` (they import
    only their siblings, relatively, so a bare package object over the same folder serves them)."""
    if "img2dataset" not in sys.modules:
        spec = importlib.util.find_spec("img2dataset")
        package = types.ModuleType("img2dataset")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["img2dataset"] = package
    import img2dataset.downloader
    import img2dataset.resizer

    return img2dataset.downloader, img2dataset.resizer


class ShardWriter:
    """img2dataset's sample-writer interface: ``{shard}.tar`` (image, ``.txt``, ``.json`` per written sample) and
    ``{shard}.parquet`` (one row per input row), both in the job's scratch folder."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        from winnow.pipeline.data.shards import TarWriter

        name = f"{shard_id:0{oom_shard_count}d}"
        self.tar_path = os.path.join(output_folder, f"{name}.tar")
        self.tar = TarWriter(self.tar_path)
        self.parquet = os.path.join(output_folder, f"{name}.parquet")
        self.schema, self.rows = schema, []
        self.save_caption, self.ext = save_caption, encode_format

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            meta_json = {k: v.tolist() if hasattr(v, "tolist") and not isinstance(v, (int, float)) else v
                         for k, v in meta.items()}
            members = {self.ext: img_str, "json": json.dumps(meta_json, indent=4).encode()}
            if self.save_caption:
                members["txt"] = ("" if caption is None else str(caption)).encode()
            self.tar.sample(key, {ext: members[ext] for ext in sorted(members)})
        self.rows.append(meta)

    def close(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from winnow.pipeline.data.shards import sort_tar

        self.tar.__exit__(None, None, None)
        sort_tar(self.tar_path)  # samples in key order, whatever order the downloads finished in
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), self.parquet)


class _Fetched(io.BytesIO):
    """A row's original image bytes with the outcome of :func:`_prepare` attached: img2dataset's loop hashes the
    bytes, and asks the resizer and exifread for what the download thread already computed."""

    def __init__(self, data: bytes, resized: tuple, exif: dict | None):
        super().__init__(data)
        self.resized, self.exif = resized, exif


class _Precomputed:
    """Stands in for img2dataset's resizer and its ``exifread`` module in its single sample loop."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        return img_stream.resized

    @staticmethod
    def process_file(img_stream, details=False):
        return img_stream.exif or {}


def _exif_segment(data: bytes) -> bytes | None:
    """A JPEG's first APP1 Exif segment on its own (SOI + segment, at most 64 KiB): exifread follows offsets
    anywhere in the file it is given, so it is given no more than the segment the EXIF standard allows."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            return data[:2] + data[pos:pos + 2 + length]
        if marker in (0xDA, 0xD9) or length < 2:  # image data or the end: no EXIF
            return None
        pos += 2 + length
    return None


def _prepare(data: bytes, cfg: dict, resizer, bbox, exifread, blocked=None, spot=None,
             counts=None) -> tuple[tuple, dict | None]:
    """Everything done to one downloaded image, in its download thread: checks, 16-bit and orientation fixes,
    the PDQ blocklist and the detectors (one small decode for both), img2dataset's resize (and blur), EXIF.
    Returns the resizer's tuple (its last item the error message) and the EXIF tags as strings."""
    from winnow.pipeline.data.images import inspect_image, reencode_high_depth, sniff_format, upright
    from winnow.pipeline.web.blocklist import image_for_pdq

    problem = inspect_image(data, cfg["max_pixels"], cfg["check_truncation"])
    if problem is not None:
        return (None, None, None, None, None, problem), None
    try:
        fixed = upright(data)
        fixed = reencode_high_depth(fixed or data) or fixed
        small = image_for_pdq(fixed or data) if (blocked and blocked.has_pdq) or spot else None
        refusal = blocked.match_image(small) if blocked and blocked.has_pdq else None
        found = spot(np.asarray(small)) if spot and not refusal else {}
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        return (None, None, None, None, None, f"decode_error: {type(exc).__name__} while decoding"), None
    limit = cfg.get("nsfw_max", 1.0)
    if not refusal and found.get("nsfw", 0.0) > limit:
        refusal = f"nsfw: NudeNet's exposed-class confidence {found['nsfw']:.2f} > ingest.nsfw_max {limit:g}"
    if refusal:
        return (None, None, None, None, None, refusal), None
    if found.get("face_bboxes"):
        bbox = [*(bbox or []), *found["face_bboxes"]]
        if counts is not None:
            counts["images_with_faces_blurred"] += 1
            counts["faces_blurred"] += len(found["face_bboxes"])
    resized = resizer(io.BytesIO(fixed or data), bbox)
    exif = None
    if cfg["extract_exif"] and resized[-1] is None:
        source = _exif_segment(data) if sniff_format(data) == "jpeg" else data
        try:
            tags = exifread.process_file(io.BytesIO(source), details=False) if source else {}
            exif = {k: str(v) for k, v in tags.items() if v is not None}
        except Exception:  # noqa: BLE001 - as img2dataset: unreadable EXIF is no EXIF
            exif = None
    return resized, exif


_SITES: dict = {}  # (the config's site settings) -> (OptOuts, Pace): kept across the shards of the run
_DETECTED = Counter()  # images whose detected faces were blurred, and the faces


def user_agent_of(cfg: dict) -> str:
    """The User-Agent: ``ingest.user_agent``, else one naming the crawler, its version and its contact page."""
    from winnow.pipeline import __version__

    if cfg.get("user_agent"):
        return cfg["user_agent"]
    contact = f"; +{cfg['contact_url']}" if cfg.get("contact_url") else ""
    return f"Mozilla/5.0 (compatible; {cfg['user_agent_token']}/{__version__}{contact})"


def _site_checks(cfg: dict, policy, limits, user_agent: str, shared: str | None):
    """The process's opt-out checks and host pace for this run's settings (made once, reused by every shard)."""
    from winnow.pipeline.web.optout import OptOuts, Pace

    keys = ("user_agent_token", "robots_txt", "tdmrep", "disallowed_header_directives", "host_concurrency",
            "host_interval", "max_crawl_delay", "allow_hosts", "allow_private_networks", "timeout", "deadline")
    key = (json.dumps({k: cfg[k] for k in keys}, sort_keys=True), user_agent, shared)
    if key not in _SITES:
        _SITES.clear()
        pace = Pace(cfg["host_concurrency"], cfg["host_interval"], cfg["max_crawl_delay"],
                    shared=os.path.join(shared, "pace") if shared else None)
        checks = OptOuts(policy, limits, user_agent, cfg["user_agent_token"], robots=cfg["robots_txt"],
                         tdmrep=cfg["tdmrep"], directives=tuple(cfg["disallowed_header_directives"]),
                         shared=os.path.join(shared, "sites") if shared else None, pace=pace)
        pace.delay_of = checks.crawl_delay
        _SITES[key] = (checks, pace)
    return _SITES[key]


def _build(job: dict, progress: _Progress):
    downloader, resizer_module = _img2dataset()
    from urllib.parse import urlsplit

    import pyarrow as pa

    from winnow.pipeline.core.budget import OverBudget, cpu_budget
    from winnow.pipeline.models.detect import detector
    from winnow.pipeline.web import blocklist
    from winnow.pipeline.web.fetch import FetchLimits, UrlPolicy, fetch_image_stream

    cfg = job["config"]
    skip = set(job["skip"])
    policy = UrlPolicy(tuple(cfg["allow_hosts"]), cfg["allow_private_networks"])
    limits = FetchLimits(timeout=cfg["timeout"], deadline=cfg["deadline"], max_bytes=cfg["max_bytes"],
                         retries=cfg["retries"], max_redirects=cfg["max_redirects"])
    token = cfg["user_agent_token"]
    user_agent = user_agent_of(cfg)
    checks, pace = _site_checks(cfg, policy, limits, user_agent, job.get("shared"))
    blocked = blocklist.load(cfg["blocklists"], cfg["pdq_threshold"])
    modulus = 10 ** math.ceil(math.log10(cfg["shard_size"]))  # a key ends with the row in this many digits
    bboxes = None
    from img2dataset.blurrer import BoundingBoxBlurrer

    if cfg["blur_bbox_col"]:
        with pa.memory_map(job["feather"]) as f:
            bboxes = pa.ipc.open_file(f).read_all().column(cfg["blur_bbox_col"]).to_pylist()
    spot = detector((["faces"] if cfg["blur_faces"] else []) + (["nsfw"] if cfg["nsfw_max"] < 1 else []))
    resizer = resizer_module.Resizer(
        image_size=cfg["image_size"], resize_mode=cfg["resize_mode"],
        resize_only_if_bigger=cfg["resize_only_if_bigger"], encode_quality=cfg["encode_quality"],
        encode_format=cfg["encode_format"], min_image_size=cfg["min_image_size"],
        max_aspect_ratio=cfg["max_aspect_ratio"],
        blurrer=BoundingBoxBlurrer() if bboxes is not None or cfg["blur_faces"] else None,
    )
    import exifread

    decoding = threading.BoundedSemaphore(cfg["decode_threads"])  # decoded pixels in memory at once

    def fetch_and_prepare(index: int, url: str) -> tuple[io.BytesIO | None, str | None]:
        refusal = checks.check(url)  # robots.txt and tdmrep.json: a refused row is never requested
        if refusal:
            return None, refusal
        progress.mark("~", index)  # waiting for the host's turn is not work in flight
        with pace.turn(urlsplit(url).hostname or "", url):
            progress.mark("+", index)
            stream, _, error = fetch_image_stream(url, policy, limits, user_agent, gate=checks)
        if stream is None:
            return None, error
        data = stream.getvalue()
        refusal = blocked.match_bytes(data) if blocked is not None else None
        if refusal:
            return None, refusal
        progress.mark("~", index)  # downloaded; waiting for a decode slot is not work in flight
        with decoding:
            progress.mark("*", index)
            try:
                with cpu_budget(cfg["cpu_seconds"]):
                    resized, exif = _prepare(data, cfg, resizer, bboxes[index] if bboxes is not None else None,
                                             exifread, blocked, spot, _DETECTED)
            except OverBudget:
                return None, (f"over_budget: decoding and metadata parsing took more than {cfg['cpu_seconds']:g} s "
                              "of CPU")
        return _Fetched(data, resized, exif), None

    def download(row, timeout, retries, user_agent_token, disallowed_header_directives):
        index, url = row
        if index in skip:
            return index, None, "skipped"
        progress.mark("+", index)
        try:
            stream, error = fetch_and_prepare(index, url)
        except Exception as exc:  # noqa: BLE001 - one row's failure is that row's state, never the shard's
            stream, error = None, f"error: unexpected {type(exc).__name__} while downloading or decoding"
        progress.mark("=", index)
        return index, stream, error

    downloader.download_image_with_retry = download  # the module global that Downloader.download_shard calls
    downloader.exifread = _Precomputed  # its loop asks exifread for the tags; they were read in the thread

    class ProgressWriter(ShardWriter):
        def write(self, img_str, key, caption, meta):
            try:
                super().write(img_str, key, caption, meta)
            except OSError as exc:
                raise _WriteFailed(exc) from None
            progress.mark("-", int(key) % modulus)

    return downloader.Downloader(
        sample_writer_class=ProgressWriter, resizer=_Precomputed(), thread_count=cfg["thread_count"],
        save_caption=True, extract_exif=cfg["extract_exif"], output_folder=job["out_dir"], column_list=job["columns"],
        timeout=cfg["timeout"], number_sample_per_shard=cfg["shard_size"], oom_shard_count=8,
        compute_hash="sha256", verify_hash_type=None, encode_format=cfg["encode_format"], retries=cfg["retries"],
        user_agent_token=token, disallowed_header_directives=cfg["disallowed_header_directives"],
        blurring_bbox_col=cfg["blur_bbox_col"] or None,
    )


def _site_counts():
    """The robots.txt and tdmrep.json outcomes counted so far by this process."""
    return sum((checks.counts for checks, _ in _SITES.values()), Counter())


def _failure(exc: BaseException) -> dict:
    """A reply describing ``exc`` in one line (OS errors keep errno and file name for the parent)."""
    cause = exc.args[0] if isinstance(exc, _WriteFailed) else exc
    reply = {"ok": False, "error": f"{type(cause).__name__}: {cause}".splitlines()[0][:500]}
    if isinstance(cause, OSError):
        reply |= {"errno": cause.errno, "strerror": cause.strerror, "filename": cause.filename}
    return reply


def main() -> None:
    # Replies go to the original stdout; anything the libraries print goes to stderr.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _img2dataset()  # the slow imports, done before saying ready

    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        progress = _Progress(job["progress"])
        try:
            downloader = _build(job, progress)
            before, detected = _site_counts(), Counter(_DETECTED)
            downloader.download_shard((job["shard_id"], job["feather"]))
            answer = {"ok": True, "sites": dict(_site_counts() - before), "blurred": dict(_DETECTED - detected)}
        except (Exception, _WriteFailed) as exc:  # noqa: BLE001 - reported to the parent, which fails the task
            answer = _failure(exc)
        finally:
            progress.close()
        reply.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
