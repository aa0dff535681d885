"""The pool layout (DataComp / img2dataset contract).

A pool is a folder of shards. Shard ``i`` is three files:

- ``{i:08d}.tar``: a WebDataset tar with ``<key>.jpg``, ``<key>.txt`` (caption) and ``<key>.json`` (the row's
  metadata, including ``uid``) for every sample that was downloaded and decoded;
- ``{i:08d}.parquet``: one row per input row, ok or failed (uid, key, url, caption, status, error_message,
  width, height, original_width, original_height, sha256, state, ...);
- ``{i:08d}_stats.json``: counts (``count``, ``successes``, ... as img2dataset writes them, plus ``states``).

``_stats.json`` is written last and atomically: it is the shard's commit marker. A shard without it is
incomplete and is redone on resume.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.data.ledger import OK, states_of

INPUTS = "_inputs"  # ingest's split input shards, present while an ingest is unfinished
SHARD_RE = re.compile(r"^(\d+)\.tar$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_name(shard_id: int, digits: int = 8) -> str:
    return f"{shard_id:0{digits}d}"


def paths(pool: str, shard_id: int, digits: int = 8) -> dict[str, str]:
    name = shard_name(shard_id, digits)
    return {
        "tar": fsio.join(pool, f"{name}.tar"),
        "parquet": fsio.join(pool, f"{name}.parquet"),
        "stats": fsio.join(pool, f"{name}_stats.json"),
    }


def is_complete(pool: str, shard_id: int) -> bool:
    p = paths(pool, shard_id)
    return all(fsio.exists(x) for x in p.values())


def list_shards(pool: str, committed: bool = True) -> list[int]:
    """Ids of the shards in ``pool`` that have a tar and (unless ``committed=False``) their ``_stats.json``
    commit marker (sorted). One listing of the folder."""
    names = set(fsio.listdir(pool))
    return sorted(int(m.group(1)) for n in names if (m := SHARD_RE.match(n))
                  and (not committed or f"{m.group(1)}_stats.json" in names))


def name_digits(pool: str) -> int:
    """Zero padding of the pool's shard names: 8 for DataComp and Winnow, 5 for img2dataset's default."""
    names = [m.group(1) for n in fsio.listdir(pool) if (m := SHARD_RE.match(n))]
    return min((len(n) for n in names), default=8)


def read_table(pool: str, shard_id: int, columns: list[str] | None = None, digits: int = 8) -> pd.DataFrame:
    fs, p = fsio.get_fs(paths(pool, shard_id, digits)["parquet"])
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns).to_pandas()


def read_stats(pool: str, shard_id: int) -> dict:
    return fsio.read_json(paths(pool, shard_id)["stats"])


IMAGE_EXTS = ("jpg", "png", "webp", "jpeg")


def image_bytes(sample: dict) -> bytes | None:
    """The encoded image of a sample from :func:`iter_tar` (the first of jpg, png, webp, jpeg), or None."""
    return next((sample[ext] for ext in IMAGE_EXTS if sample.get(ext)), None)


def iter_tar(tar_path: str) -> Iterator[dict]:
    """Samples of a WebDataset tar as dicts ``{"__key__": key, ext: bytes, ...}`` (members grouped by key)."""
    fs, p = fsio.get_fs(tar_path)
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current: dict | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current


class TarWriter:
    """The one tar writer (WebDataset layout: a sample is its members ``<key>.<ext>``, adjacent).

    The tar appears at ``path`` only when the block ends without an error
    (:func:`winnow.pipeline.core.fsio.atomic_open`).
    Members are USTAR entries with mode 0444 and mtime 0 unless given, so a tar's bytes depend only on what is
    written into it.
    """

    def __init__(self, path: str):
        self._file_ctx = fsio.atomic_open(path, "wb")
        self._file = self._file_ctx.__enter__()
        self.tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes, mtime: float = 0.0, mode: int = 0o444) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), mtime, mode
        self.tar.addfile(info, io.BytesIO(data))

    def sample(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``{ext: bytes}`` members, in the order given."""
        for ext, data in members.items():
            self.add(f"{key}.{ext}", data)

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.tar.close()
        finally:
            self._file_ctx.__exit__(*exc)


def sort_tar(path: str) -> None:
    """Rewrite a local WebDataset tar with its samples in key order (a sample's members stay together, in their
    order). Downloads finish in any order; a pool's tars should not depend on it."""
    with tarfile.open(path, "r:") as src:
        members = [m for m in src.getmembers() if m.isfile()]
        order = sorted(range(len(members)), key=lambda i: (members[i].name.partition(".")[0], i))
        with TarWriter(path) as out:  # replaces the file when done; the open source stays readable meanwhile
            for i in order:
                m = members[i]
                out.add(m.name, src.extractfile(m).read(), mtime=m.mtime, mode=m.mode)


def write_shard(pool: str, shard_id: int, rows: list[dict], images: dict[str, bytes], captions_key: str = "caption",
                extra_stats: dict | None = None) -> dict:
    """Write one complete shard (tar, parquet, then stats last), each file atomically.

    ``rows`` hold one dict per input row (must include ``key``, ``status`` and ``state``); ``images`` maps the
    keys of ``ok`` rows to their encoded bytes. Used for sets Winnow makes itself (the synthetic clean set).
    """
    p = paths(pool, shard_id)
    start = time.time()
    with TarWriter(p["tar"]) as tar:
        for row in rows:
            if row["state"] != OK:
                continue
            meta = {k: v for k, v in row.items() if k != "state"}
            tar.sample(row["key"], {"jpg": images[row["key"]], "txt": str(row.get(captions_key) or "").encode(),
                                    "json": json.dumps(meta, indent=4, default=str).encode()})
    write_table(p["parquet"], pd.DataFrame(rows))
    stats = shard_stats(pd.DataFrame(rows), start, time.time()) | (extra_stats or {})
    fsio.write_json(p["stats"], stats)
    return stats


def write_table(path: str, df: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    with fsio.atomic_open(path, "wb") as f:
        pq.write_table(table, f)


def shard_stats(df: pd.DataFrame, start_time: float, end_time: float) -> dict:
    """img2dataset's ``_stats.json`` fields, plus Winnow's per-state counts."""
    states = Counter(states_of(df)) if len(df) else Counter()
    status = Counter(df["status"]) if "status" in df.columns else Counter()
    errors = Counter(e for e in df.get("error_message", pd.Series(dtype=object)) if isinstance(e, str))
    return {
        "count": int(len(df)),
        "successes": int(states.get(OK, 0)),
        "failed_to_download": int(status.get("failed_to_download", 0)),
        "failed_to_resize": int(status.get("failed_to_resize", 0)),
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": dict(errors.most_common(100)) | ({"success": int(states.get(OK, 0))}),
        "states": dict(sorted(states.items())),
    }
