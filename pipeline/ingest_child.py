"""The download process: img2dataset's own per-shard machinery, driven over a pipe.

One such process runs beside each Dask worker (see :mod:`pipeline.ingest`). It reads one JSON job per line on
stdin, runs ``img2dataset.downloader.Downloader.download_shard`` for it (img2dataset's urllib download with
timeout and retries, its resizer and its WebDataset writer), and answers one JSON line. Two additions:

- the writer appends each finished sample's key to a progress file, so the parent can see a stalled shard and
  kill this process (a server that trickles bytes defeats a socket timeout);
- the resizer first runs :func:`pipeline.images.inspect_image`, refusing non-images, truncated files and
  decompression bombs before decoding.

Import is slow (img2dataset pulls in torch through webdataset), which is why the process is kept alive.
"""

from __future__ import annotations

import json
import os
import sys


def _build(job: dict):
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from pipeline.images import inspect_image

    cfg = job["config"]
    progress_path = job["progress"]

    class ProgressWriter(WebDatasetSampleWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._progress = open(progress_path, "a", buffering=1)

        def write(self, img_str, key, caption, meta):
            super().write(img_str, key, caption, meta)
            self._progress.write(f"{key}\n")

        def close(self):
            super().close()
            self._progress.close()

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            problem = inspect_image(img_stream.getvalue(), cfg["max_pixels"], cfg["check_truncation"])
            if problem is not None:
                return None, None, None, None, None, problem
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

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
    return Downloader(
        sample_writer_class=ProgressWriter, resizer=resizer, thread_count=cfg["thread_count"], save_caption=True,
        extract_exif=cfg["extract_exif"], output_folder=job["out_dir"], column_list=job["columns"],
        timeout=cfg["timeout"], number_sample_per_shard=cfg["shard_size"], oom_shard_count=8,
        compute_hash="sha256", verify_hash_type=None, encode_format=cfg["encode_format"], retries=cfg["retries"],
        user_agent_token=cfg["user_agent_token"] or None,
        disallowed_header_directives=cfg["disallowed_header_directives"],
        blurring_bbox_col=cfg["blur_bbox_col"] or None,
    )


def main() -> None:
    # Replies go to the original stdout; anything the libraries print goes to stderr.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import img2dataset.downloader  # noqa: F401 - the slow import, done before saying ready

    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            downloader = _build(job)
            downloader.download_shard((job["shard_id"], job["feather"]))
            reply.write(json.dumps({"ok": True}) + "\n")
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the task
            reply.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")


if __name__ == "__main__":
    main()
