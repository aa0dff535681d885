"""The download process: img2dataset's own per-shard machinery, driven over a pipe.

One such process runs beside each Dask worker (see :mod:`pipeline.stages.ingest`). It reads one JSON job per line on
stdin, runs ``img2dataset.downloader.Downloader.download_shard`` for it (its thread pool, hashing, EXIF and
resizer), and answers one JSON line. Four things are Winnow's:

- the network fetch: img2dataset's urllib download is replaced by :func:`pipeline.stages.fetch.fetch` (URL policy,
  per-URL deadline, byte cap); rows the parent marks as skipped (bad or duplicate uid, abandoned earlier) are
  answered at once without a request;
- a progress file: ``+<index>`` when a row's download starts and ``-<index>`` when its sample is written, so the
  parent knows exactly which rows were in flight if this process stalls or dies;
- the resizer first runs :func:`pipeline.data.images.inspect_image` (non-images, truncation, decompression bombs) and
  converts 16-bit images to 8 bits, which OpenCV would clip;
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
        from pipeline.data.shards import TarWriter

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

        from pipeline.data.shards import sort_tar

        self.tar.__exit__(None, None, None)
        sort_tar(self.tar_path)  # samples in key order, whatever order the downloads finished in
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), self.parquet)


def _build(job: dict, progress: _Progress):
    downloader, resizer_module = _img2dataset()
    Resizer = resizer_module.Resizer

    from pipeline.stages.fetch import USER_AGENT, FetchLimits, UrlPolicy, fetch_image_stream
    from pipeline.data.images import inspect_image, reencode_high_depth

    cfg = job["config"]
    skip = set(job["skip"])
    policy = UrlPolicy(tuple(cfg["allow_hosts"]), cfg["allow_private_networks"])
    limits = FetchLimits(timeout=cfg["timeout"], deadline=cfg["deadline"], max_bytes=cfg["max_bytes"],
                         retries=cfg["retries"], max_redirects=cfg["max_redirects"])
    token = (cfg["user_agent_token"] or "").strip().lower()
    user_agent = f"{USER_AGENT} (compatible; {token})" if token else USER_AGENT
    modulus = 10 ** math.ceil(math.log10(cfg["shard_size"])) if cfg["shard_size"] > 1 else 10

    def download(row, timeout, retries, user_agent_token, disallowed_header_directives):
        index, url = row
        if index in skip:
            return index, None, "skipped"
        progress.mark("+", index)
        stream, headers, error = fetch_image_stream(url, policy, limits, user_agent)
        if stream is not None and disallowed_header_directives and downloader.is_disallowed(
                headers, user_agent_token, disallowed_header_directives):
            return index, None, "disallowed: Use of image disallowed by X-Robots-Tag directive"
        return index, stream, error

    downloader.download_image_with_retry = download  # the module global that Downloader.download_shard calls

    class ProgressWriter(ShardWriter):
        def write(self, img_str, key, caption, meta):
            try:
                super().write(img_str, key, caption, meta)
            except OSError as exc:
                raise _WriteFailed(exc) from None
            progress.mark("-", int(key) % modulus)

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            data = img_stream.getvalue()
            problem = inspect_image(data, cfg["max_pixels"], cfg["check_truncation"])
            if problem is not None:
                return None, None, None, None, None, problem
            try:
                eight_bit = reencode_high_depth(data)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                return None, None, None, None, None, f"decode_error: {type(exc).__name__}"
            return super().__call__(io.BytesIO(eight_bit) if eight_bit else img_stream, blurring_bbox_list)

    blurrer = None
    if cfg["blur_bbox_col"]:
        from img2dataset.blurrer import BoundingBoxBlurrer

        blurrer = BoundingBoxBlurrer()
    resizer = GuardedResizer(
        image_size=cfg["image_size"], resize_mode=cfg["resize_mode"],
        resize_only_if_bigger=cfg["resize_only_if_bigger"], encode_quality=cfg["encode_quality"],
        encode_format=cfg["encode_format"], min_image_size=cfg["min_image_size"],
        max_aspect_ratio=cfg["max_aspect_ratio"], blurrer=blurrer,
    )
    return downloader.Downloader(
        sample_writer_class=ProgressWriter, resizer=resizer, thread_count=cfg["thread_count"], save_caption=True,
        extract_exif=cfg["extract_exif"], output_folder=job["out_dir"], column_list=job["columns"],
        timeout=cfg["timeout"], number_sample_per_shard=cfg["shard_size"], oom_shard_count=8,
        compute_hash="sha256", verify_hash_type=None, encode_format=cfg["encode_format"], retries=cfg["retries"],
        user_agent_token=token or None, disallowed_header_directives=cfg["disallowed_header_directives"],
        blurring_bbox_col=cfg["blur_bbox_col"] or None,
    )


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
            _build(job, progress).download_shard((job["shard_id"], job["feather"]))
            answer = {"ok": True}
        except (Exception, _WriteFailed) as exc:  # noqa: BLE001 - reported to the parent, which fails the task
            answer = _failure(exc)
        finally:
            progress.close()
        reply.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
