"""Ingest: a URL list (parquet, csv, tsv, jsonl; a file or a folder of them) becomes a pool.

Flow (``ingest``, on the driver):

1. The input is streamed once and split into input shards of ``shard_size`` rows (``_inputs/{id:08d}.feather``):
   row ``r`` of the input always lands in shard ``r // shard_size``, so shard ids are stable across runs.
   Captions are read from ``caption_col``; uids are carried from ``uid_col`` or derived (:mod:`pipeline.uid`).
2. ``ingest_shard`` runs once per shard on the cluster. It drives a long-lived download process (one per Dask
   worker, :mod:`pipeline.ingest_child`) that runs img2dataset's own per-shard downloader into a private
   temporary folder, then adds the ledger ``state`` column and moves tar, parquet and finally ``_stats.json`` (the
   commit marker) into the pool, each atomically.
3. A shard with a ``_stats.json`` is complete and is not redone when an interrupted run is resumed.

Stall limit: when no sample of a shard finishes for ``stall_seconds``, the download process is killed, the
samples that were in flight are recorded as ``stalled``, and the shard is downloaded again without them.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather

from . import fsio, manifest, shards
from .errors import UserError
from .ledger import OK, classify
from .pool import ledger
from .uid import derive_uid, normalize_uid

INPUTS = "_inputs"
TMP = "_tmp"
STARTUP_SECONDS = 300.0
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json"}


@dataclass
class IngestConfig:
    """How a URL list is downloaded. Defaults follow DataComp's ``download_upstream.py``.

    Args:
        shard_size: input rows per shard (DataComp: 10,000).
        image_size / resize_mode / resize_only_if_bigger: img2dataset resizing (DataComp: longest side <= 512,
            never upscale).
        encode_format / encode_quality: output encoding (DataComp: jpg, quality 95).
        timeout: seconds per HTTP request; retries: extra attempts per URL.
        stall_seconds: a shard in which no sample finishes for this long has its in-flight downloads abandoned
            (recorded as ``stalled``); must exceed ``timeout * (retries + 1)``.
        thread_count: concurrent downloads per shard.
        min_image_size: shorter side below this is ``too_small`` (DataComp: 0, the basic filter does it later).
        max_pixels: images with more pixels are refused before decoding (``too_many_pixels``).
        max_aspect_ratio: longer/shorter side above this is ``bad_aspect_ratio`` (DataComp: no limit).
        check_truncation: refuse JPEG/PNG/GIF files whose end marker is missing (``decode_error``).
        url_col / caption_col / uid_col: input column names (``uid_col`` may be absent: uids are then derived).
        extra_columns: more input columns to carry into the parquet and each sample's ``.json``.
        blur_bbox_col: column of normalised face boxes to blur (DataComp: ``face_bboxes``); empty for none.
    """

    shard_size: int = 10_000
    image_size: int = 512
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    timeout: float = 10.0
    retries: int = 2
    stall_seconds: float = 120.0
    thread_count: int = 64
    min_image_size: int = 0
    max_pixels: int = 89_478_485
    max_aspect_ratio: float = float("inf")
    check_truncation: bool = True
    extract_exif: bool = True
    url_col: str = "url"
    caption_col: str = "text"
    uid_col: str = "uid"
    extra_columns: list[str] = field(default_factory=list)
    blur_bbox_col: str = ""
    user_agent_token: str = ""
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.thread_count < 1 or self.retries < 0:
            raise UserError("ingest: shard_size >= 1, thread_count >= 1 and retries >= 0 are required")
        if self.timeout <= 0 or self.max_pixels < 1 or self.image_size < 1:
            raise UserError("ingest: timeout, max_pixels and image_size must be positive")
        if self.stall_seconds <= self.timeout * (self.retries + 1):
            raise UserError(f"ingest: stall_seconds ({self.stall_seconds:g}) must exceed timeout x (retries + 1) "
                            f"= {self.timeout * (self.retries + 1):g}, or slow but live downloads count as stalled")


# --------------------------------------------------------------------------------------------- input splitting
def check_input(path: str, cfg: IngestConfig) -> list[str]:
    """The files of a URL list, after checking that they exist and have the configured columns (schema only)."""
    files = input_files(path)
    names = _dataset(files).schema.names
    needed = [cfg.url_col, *cfg.extra_columns, *([cfg.blur_bbox_col] if cfg.blur_bbox_col else [])]
    missing = [c for c in needed if c not in names]
    if missing:
        raise UserError(f"input has no column {missing[0]!r} (columns: {', '.join(names)}); "
                        f"set ingest.url_col / ingest.extra_columns to the right names")
    return files


def input_files(path: str) -> list[str]:
    """The files of a URL list: the file itself, or the supported files of a folder (sorted)."""
    if not fsio.exists(path):
        raise UserError(f"input not found: {path} (pass a parquet/csv/tsv/jsonl file or a folder of them)")
    fs, p = fsio.get_fs(path)
    if fs.isdir(p):
        files = [fsio.join(path, n) for n in fsio.listdir(path) if os.path.splitext(n)[1] in _FORMATS]
        if not files:
            raise UserError(f"input folder {path} holds no .parquet/.csv/.tsv/.jsonl files")
        exts = {os.path.splitext(f)[1] for f in files}
        if len({_FORMATS[e] for e in exts}) > 1:
            raise UserError(f"input folder {path} mixes formats {sorted(exts)}; keep one format per folder")
        return files
    if os.path.splitext(p)[1] not in _FORMATS:
        raise UserError(f"input {path}: unsupported extension; use .parquet, .csv, .tsv or .jsonl")
    return [path]


def _dataset(files: list[str]):
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    kind = _FORMATS[os.path.splitext(files[0])[1]]
    fs, _ = fsio.get_fs(files[0])
    stripped = [fsio.get_fs(f)[1] for f in files]
    if kind == "tsv":
        fmt = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter="\t"))
    elif kind == "csv":
        fmt = ds.CsvFileFormat()
    else:
        fmt = kind
    try:
        return ds.dataset(stripped, format=fmt, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"cannot read input {files[0]}: {exc}") from None


def _normalise_batch(table: pa.Table, cfg: IngestConfig, first_row: int) -> pd.DataFrame:
    df = table.to_pandas()
    out = pd.DataFrame(index=df.index)
    out["url"] = df[cfg.url_col].astype(object).where(df[cfg.url_col].notna(), "")
    out["url"] = [str(u).strip() for u in out["url"]]
    if cfg.caption_col in df.columns:
        out["caption"] = [None if c is None or (isinstance(c, float) and math.isnan(c)) else str(c)
                          for c in df[cfg.caption_col]]
    else:
        out["caption"] = None
    if cfg.uid_col in df.columns:
        given = list(df[cfg.uid_col])
        normal = [normalize_uid(u) for u in given]
        out["uid"] = [n or derive_uid(u, c) for n, u, c in zip(normal, out["url"], out["caption"])]
        out["_bad_uid"] = [None if n else f"bad_uid: input uid {g!r} is not 1-32 hex characters"
                           for n, g in zip(normal, given)]
    else:
        out["uid"] = [derive_uid(u, c) for u, c in zip(out["url"], out["caption"])]
        out["_bad_uid"] = None
    for col in cfg.extra_columns:
        out[col] = df[col]
    out["input_row"] = range(first_row, first_row + len(df))
    return out.reset_index(drop=True)


def split_input(files: list[str], pool: str, cfg: IngestConfig) -> dict:
    """Stream the URL list into ``_inputs/{id:08d}.feather`` of ``shard_size`` rows; return the split summary."""
    summary_path = fsio.join(pool, INPUTS, "_split.json")
    if fsio.exists(summary_path):
        return fsio.read_json(summary_path)
    dataset = _dataset(files)
    names = dataset.schema.names
    wanted = [c for c in dict.fromkeys([cfg.url_col, cfg.caption_col, cfg.uid_col, *cfg.extra_columns,
                                        *([cfg.blur_bbox_col] if cfg.blur_bbox_col else [])]) if c in names]
    shard_id, rows, buffered = 0, 0, []

    def flush(tables: list[pa.Table]) -> None:
        nonlocal shard_id, rows
        table = pa.concat_tables(tables)
        df = _normalise_batch(table, cfg, rows)
        path = fsio.join(pool, INPUTS, f"{shards.shard_name(shard_id)}.feather")
        with fsio.atomic_open(path, "wb") as f:
            feather.write_feather(pa.Table.from_pandas(df, preserve_index=False), f)
        shard_id += 1
        rows += len(df)

    pending = 0
    try:
        for batch in dataset.to_batches(columns=wanted, batch_size=min(cfg.shard_size, 65_536)):
            table = pa.Table.from_batches([batch])
            while table.num_rows:
                take = min(table.num_rows, cfg.shard_size - pending)
                buffered.append(table.slice(0, take))
                pending += take
                table = table.slice(take)
                if pending == cfg.shard_size:
                    flush(buffered)
                    buffered, pending = [], 0
    except pa.ArrowInvalid as exc:
        raise UserError(f"cannot parse input {files[0]}: {exc}") from None
    if pending:
        flush(buffered)
    summary = {"rows": rows, "shards": shard_id, "shard_size": cfg.shard_size}
    fsio.write_json(summary_path, summary)
    return summary


# ---------------------------------------------------------------------------------------- the download process
class _DownloadProcess:
    """A child process running :mod:`pipeline.ingest_child`, kept alive across the shards of one worker."""

    def __init__(self) -> None:
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.ingest_child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.replies: queue.Queue = queue.Queue()
        self.ready = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)  # EOF: the process ended

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def _reply(self, timeout: float | None) -> dict:
        reply = self.replies.get(timeout=timeout)
        if reply is None:
            raise RuntimeError(f"download process exited with code {self.proc.wait()}")
        return reply

    def run(self, job: dict, progress: str, stall_seconds: float) -> bool:
        """Run one shard job; True when it finished, False when it stalled (the process is then killed)."""
        if not self.ready:  # importing img2dataset takes seconds; the stall clock starts after that
            self.ready = self._reply(timeout=STARTUP_SECONDS)["ready"]
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        last_size, last_change = -1, time.monotonic()
        while True:
            try:
                reply = self._reply(timeout=0.2)
            except queue.Empty:
                size = os.path.getsize(progress) if os.path.exists(progress) else 0
                now = time.monotonic()
                if size != last_size:
                    last_size, last_change = size, now
                elif now - last_change > stall_seconds:
                    self.kill()
                    return False
                continue
            if not reply["ok"]:
                raise RuntimeError(f"download process failed: {reply['error']}")
            return True


_PROCESS: _DownloadProcess | None = None
_PROCESS_LOCK = threading.Lock()


def _download_process() -> _DownloadProcess:
    global _PROCESS
    if _PROCESS is None or not _PROCESS.alive():
        _PROCESS = _DownloadProcess()
    return _PROCESS


# -------------------------------------------------------------------------------------------- the shard stage
@dataclass(frozen=True)
class ShardTask:
    pool: str
    shard_id: int
    config: dict


def _key(index: int, shard_id: int, shard_size: int) -> str:
    """img2dataset's key: shard id (8 digits) then the row's index in the shard."""
    digits = max(1, math.ceil(math.log10(shard_size))) if shard_size > 1 else 1
    return f"{shard_id * 10 ** digits + index:0{8 + digits}d}"


def _work_dir(pool: str, shard_id: int) -> str:
    """A private scratch folder: inside the pool when it is local (so the final moves are renames)."""
    prefix = f"{shards.shard_name(shard_id)}-"
    if fsio.is_local(pool):
        base = os.path.join(fsio.get_fs(pool)[1], TMP)
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=base)
    return tempfile.mkdtemp(prefix=prefix)


def ingest_shard(task: ShardTask) -> dict:
    """Download one input shard into the pool. Pure in the sense the runner needs: same task, same shard."""
    cfg = IngestConfig(**task.config)
    if shards.is_complete(task.pool, task.shard_id):
        return shards.read_stats(task.pool, task.shard_id)
    start = time.time()
    name = shards.shard_name(task.shard_id)
    rows = feather.read_feather(fsio.join(task.pool, INPUTS, f"{name}.feather"))
    blocked = {i: msg for i, msg in enumerate(rows["_bad_uid"]) if isinstance(msg, str)}
    columns = ["uid", "caption", "url", "input_row", *cfg.extra_columns]
    if cfg.blur_bbox_col:
        columns.append(cfg.blur_bbox_col)
    columns = list(dict.fromkeys(columns))
    while True:
        work = _work_dir(task.pool, task.shard_id)
        try:
            done = _download(task, cfg, rows, blocked, columns, work)
            if done:
                return _commit(task, cfg, rows, blocked, work, start)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _download(task: ShardTask, cfg: IngestConfig, rows: pd.DataFrame, blocked: dict[int, str],
              columns: list[str], work: str) -> bool:
    """One attempt. Blocked rows keep their position (so keys stay stable) with an empty url, which fails at once.

    Returns False after a stall, having added the in-flight rows to ``blocked``.
    """
    attempt = rows.copy()
    for i in blocked:
        attempt.at[i, "url"] = ""
    feather_path = os.path.join(work, "input.feather")  # img2dataset deletes its input when done
    feather.write_feather(pa.Table.from_pandas(attempt[columns], preserve_index=False), feather_path)
    progress = os.path.join(work, "progress.log")
    job = {"shard_id": task.shard_id, "feather": feather_path, "out_dir": work, "progress": progress,
           "columns": columns, "config": asdict(cfg)}
    with _PROCESS_LOCK:
        if _download_process().run(job, progress, cfg.stall_seconds):
            return True
    finished = set()
    if os.path.exists(progress):
        with open(progress) as f:
            finished = {line.strip() for line in f if line.strip()}
    pending = [i for i in range(len(rows)) if i not in blocked
               and _key(i, task.shard_id, cfg.shard_size) not in finished]
    if not pending:  # every sample finished yet the process never answered: retrying would not help
        raise RuntimeError(f"shard {task.shard_id}: download process stalled after its last sample")
    # img2dataset hands rows to its threads in order, so the first `thread_count` unfinished rows were in flight.
    for i in pending[: cfg.thread_count]:
        blocked[i] = f"stalled: no sample finished for {cfg.stall_seconds:g}s while this one was downloading"
    return False


def _commit(task: ShardTask, cfg: IngestConfig, rows: pd.DataFrame, blocked: dict[int, str], work: str,
            start: float) -> dict:
    name = shards.shard_name(task.shard_id)
    table = pd.read_parquet(os.path.join(work, f"{name}.parquet"))
    table = table.sort_values("key", kind="stable").reset_index(drop=True)
    if len(table) != len(rows):
        raise RuntimeError(f"shard {name}: img2dataset wrote {len(table)} rows for {len(rows)} inputs")
    table["state"] = [classify(s, e) for s, e in zip(table["status"], table["error_message"])]
    for i, message in blocked.items():  # rows are in key order, i.e. input order
        table.at[i, "status"] = "failed_to_download"
        table.at[i, "error_message"] = message
        table.at[i, "state"] = classify("failed_to_download", message)
    target = shards.paths(task.pool, task.shard_id)
    fsio.atomic_move(os.path.join(work, f"{name}.tar"), target["tar"])
    shards.write_table(target["parquet"], table)
    stats = shards.shard_stats(table, start, time.time())
    fsio.write_json(target["stats"], stats)  # the commit marker, written last
    return stats


# ---------------------------------------------------------------------------------------------------- driver
def ingest(urls: str, pool: str, cfg: IngestConfig, runner, overwrite: bool = False, log=print) -> dict:
    """Turn the URL list ``urls`` into the pool folder ``pool``; return its manifest."""
    files = check_input(urls, cfg)
    run = manifest.StageRun("ingest", pool, params=asdict(cfg), inputs=manifest.describe_inputs(files))
    mode = run.open(overwrite=overwrite)
    if mode == "skip":
        log(f"ingest: {pool} is up to date with {urls}; nothing to do")
        return manifest.read_manifest(pool)
    fsio.remove(fsio.join(pool, TMP))
    split = split_input(files, pool, cfg)
    all_ids = list(range(split["shards"]))
    todo = [i for i in all_ids if not shards.is_complete(pool, i)]
    if mode == "resume":
        log(f"ingest: resuming: {len(all_ids) - len(todo)} of {len(all_ids)} shards already done")
    log(f"ingest: {split['rows']:,} input rows in {split['shards']} shards of {cfg.shard_size:,} -> {pool}")
    tasks = [ShardTask(pool, i, asdict(cfg)) for i in todo]
    runner.map(ingest_shard, tasks, label="ingest")
    states, _ = ledger(pool)
    if sum(states.values()) != split["rows"]:
        raise RuntimeError(f"ledger invariant broken: {split['rows']} input rows, {sum(states.values())} recorded")
    fsio.remove(fsio.join(pool, INPUTS))
    fsio.remove(fsio.join(pool, TMP))
    ok = states.get(OK, 0)
    return run.finish(rows={"input": split["rows"], "ok": ok, "failed": split["rows"] - ok, **states},
                      shards=split["shards"], source=str(urls))

