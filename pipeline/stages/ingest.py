"""Ingest: a URL list (parquet, csv, tsv, jsonl; a file or a folder of them) becomes a pool.

Flow (``ingest``, on the driver):

1. The input is streamed once and split into input shards of ``shard_size`` rows (``_inputs/{id:08d}.feather``):
   row ``r`` of the input always lands in shard ``r // shard_size``, so shard ids are stable across runs. The
   url and caption columns are found by name (``url``/``URL``; ``text`` as DataComp, ``caption`` as
   img2dataset) or set in the config; text is decoded with ``encoding``, bad bytes replaced. uids are carried
   from ``uid_col`` or derived (:mod:`winnow.pipeline.data.uid`); a uid seen at an earlier input row makes the later
   row a
   ``duplicate_uid`` (``_inputs/_duplicates.parquet``), decided by input order alone.
2. ``ingest_shard`` runs once per shard on the cluster. It drives a long-lived download process (one per Dask
   worker, :mod:`winnow.pipeline.web.ingest_child`) that runs img2dataset's per-shard downloader with Winnow's fetch
   (:mod:`winnow.pipeline.web.fetch`: URL policy, per-URL deadline, byte cap) into a private temporary folder, then
   adds
   the ledger ``state`` column and moves tar, parquet and finally ``_stats.json`` (the commit marker) into the
   pool, each atomically.
3. A shard with a ``_stats.json`` is complete and is not redone when an interrupted run is resumed.

If the download process stalls (no sample finishes for ``stall_seconds``) or dies (killed for memory, a crash),
the rows it had in flight are recorded as ``stalled`` or ``download_killed`` and the shard is downloaded again
without them: no row is ever left without a state.
"""

from __future__ import annotations

import codecs
import collections
import ipaddress
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import path
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import personal, shards
from winnow.pipeline.data.ledger import OK, classify
from winnow.pipeline.data.pool import ledger
from winnow.pipeline.data.uid import DuplicateFinder, derive_uid, normalize_uid, uids_to_array
from winnow.pipeline.run.runner import task_progress
from winnow.pipeline.run.stage import Stage, sum_counts

INPUTS = shards.INPUTS
TMP = "_tmp"
DUPLICATES = "_duplicates.parquet"
STARTUP_SECONDS = 300.0
MESSAGE_CHARS = 240  # error messages are Winnow's own words, and short
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json"}
_CAPTION_NAMES = ("text", "caption")


@dataclass
class IngestConfig:
    """How a URL list is downloaded. Defaults follow DataComp's ``download_upstream.py`` where it has one.

    Args:
        shard_size: input rows per shard (DataComp: 10,000).
        image_size / resize_mode / resize_only_if_bigger: img2dataset resizing (DataComp: longest side <= 512,
            never upscale).
        encode_format / encode_quality: output encoding (DataComp: jpg, quality 95).
        timeout: seconds any one network wait (connect, a read) may take.
        deadline: seconds one URL may take in all: every attempt, redirect, header and body byte. A server that
            trickles its answer ends as ``timeout`` here.
        retries: extra attempts after a failure that may pass (connection error, 429/5xx, read timeout), within
            the deadline.
        max_bytes: the largest image body accepted (16 MiB: a 24-megapixel camera JPEG is 6-12 MB); larger, or
            a larger declared Content-Length, is ``too_large``. Download memory stays below about
            ``thread_count x 3 x max_bytes`` per worker.
        max_redirects: redirect hops followed per URL (each is checked against the URL policy).
        allow_hosts: host names, addresses or networks (``127.0.0.1``, ``10.2.0.0/16``) fetched although they
            are not public internet addresses. Everything else that is loopback, private, link-local (cloud
            metadata), multicast, reserved or unspecified is ``refused_url``, also when reached by a redirect.
        allow_private_networks: fetch every non-public address (for a trusted list on a closed network).
        stall_seconds: a shard in which no sample finishes for this long has its in-flight rows abandoned
            (``stalled``); a safety net behind ``deadline``, so it must exceed it.
        cpu_seconds: CPU seconds one image may spend being checked, decoded, resized and having its EXIF read
            (a 90-megapixel PNG takes about 3); more is ``over_budget``, so a crafted file cannot hold up the
            rows beside it.
        thread_count: concurrent downloads per shard.
        decode_threads: images decoded at once per download process (decoded pixels held in memory).
        min_image_size: shorter side below this is ``too_small`` (DataComp: 0, the basic filter does it later).
        max_pixels: images with more pixels are refused before decoding (``too_many_pixels``).
        max_aspect_ratio: longer/shorter side above this is ``bad_aspect_ratio`` (DataComp: no limit).
        check_truncation: refuse JPEG/PNG/GIF files whose end marker is missing (``decode_error``).
        url_col: the url column (``url``; ``URL`` and other spellings of it are found too).
        caption_col: the caption column; empty: ``text`` (DataComp) or ``caption`` (img2dataset), any case.
        no_captions: the list has no captions on purpose (otherwise a list without a caption column is refused).
        encoding: how text bytes are decoded (invalid bytes become U+FFFD, never a ``b'...'`` repr).
        uid_col: input uid column (may be absent: uids are then derived).
        extra_columns: more input columns to carry into the parquet and each sample's ``.json``.
        blur_bbox_col: column of normalised face boxes to blur (DataComp: ``face_bboxes``); empty for none.
        user_agent_token: the crawler's name: in its User-Agent, and the robots.txt group and X-Robots-Tag
            prefix it obeys (besides ``*``).
        contact_url: a page saying who crawls and how to opt out, put in the User-Agent (site owners look there).
        user_agent: the whole User-Agent header instead (empty: ``Mozilla/5.0 (compatible; TOKEN/VERSION;
            +CONTACT_URL)``).
        robots_txt: obey each site's robots.txt (RFC 9309: a 4xx answer allows all, 5xx, 429 or no answer
            disallows all); refused rows end ``opted_out`` without a request.
        tdmrep: obey TDMRep (``/.well-known/tdmrep.json`` and the ``tdm-reservation`` header): ``opted_out``.
        disallowed_header_directives: X-Robots-Tag values that opt an image out (``disallowed``); empty: ignore
            the header.
        host_concurrency: requests to one host at once, per download process.
        host_interval: seconds between the starts of two requests to one host (across the download processes of
            a machine); a site's robots.txt Crawl-delay raises it, up to ``max_crawl_delay``.
        blocklists: files of image hashes (``sha256:``, ``md5:`` or ``pdq:`` lines, see
            :mod:`winnow.pipeline.web.blocklist`); a match ends ``blocked`` and its bytes are never written.
        pdq_threshold: a PDQ hash within this many bits (of 256) of a listed one matches.
        blur_faces: detect faces while downloading (OpenCV's cascade, :mod:`winnow.pipeline.models.detect`) and
            blur them in the written image, as DataComp's download blurred the boxes it was given.
        nsfw_max: an image whose NSFW score (NudeNet's exposed-class confidence, 0-1) is above this ends ``nsfw``
            and is not written; 1 (the default) runs no detector (score later with ``embed --detect nsfw``).
        personal_data: e-mail addresses, phone, IP and card numbers in captions
            (:mod:`winnow.pipeline.data.personal`): ``mask`` them (``[email]``), ``flag`` them (the caption
            kept) or ``keep`` them unexamined; the kinds found go in the ``caption_pii`` column either way.
    """

    shard_size: int = 10_000
    image_size: int = 512
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    timeout: float = 10.0
    deadline: float = 20.0
    retries: int = 2
    max_bytes: int = 16 << 20
    max_redirects: int = 5
    allow_hosts: list[str] = field(default_factory=list)
    allow_private_networks: bool = False
    stall_seconds: float = 120.0
    cpu_seconds: float = 10.0
    thread_count: int = 64
    decode_threads: int = 2
    min_image_size: int = 0
    max_pixels: int = 89_478_485
    max_aspect_ratio: float = float("inf")
    check_truncation: bool = True
    extract_exif: bool = True
    url_col: str = "url"
    caption_col: str = ""
    no_captions: bool = False
    encoding: str = "utf-8"
    uid_col: str = "uid"
    extra_columns: list[str] = field(default_factory=list)
    blur_bbox_col: str = ""
    user_agent_token: str = "winnow"
    contact_url: str = ""
    user_agent: str = ""
    robots_txt: bool = True
    tdmrep: bool = True
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    host_concurrency: int = 16
    host_interval: float = 0.0
    max_crawl_delay: float = 10.0
    blocklists: list[str] = path([])
    pdq_threshold: int = 31
    blur_faces: bool = False
    nsfw_max: float = 1.0
    personal_data: Literal["mask", "flag", "keep"] = "mask"

    def __post_init__(self) -> None:

        if self.shard_size < 1 or self.thread_count < 1 or self.retries < 0 or self.max_redirects < 0 or \
                self.decode_threads < 1 or self.host_concurrency < 1:
            raise UserError("ingest: shard_size >= 1, thread_count >= 1, decode_threads >= 1, host_concurrency >= 1, "
                            "retries >= 0 and max_redirects >= 0 are required")
        if self.host_interval < 0 or self.max_crawl_delay < 0 or not 0 <= self.pdq_threshold <= 256 or \
                not 0 <= self.nsfw_max <= 1:
            raise UserError("ingest: host_interval and max_crawl_delay must be >= 0, pdq_threshold 0-256, "
                            "nsfw_max 0-1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", self.user_agent_token or ""):
            raise UserError(f"ingest.user_agent_token {self.user_agent_token[:50]!r} must be 1-40 letters, digits, "
                            "'_', '.' or '-' (robots.txt matches it as a product token)")
        if self.timeout <= 0 or self.max_pixels < 1 or self.image_size < 1 or self.max_bytes < 1 or \
                self.cpu_seconds <= 0:
            raise UserError("ingest: timeout, cpu_seconds, max_pixels, max_bytes and image_size must be positive")
        if self.deadline < self.timeout:
            raise UserError(f"ingest: deadline ({self.deadline:g}) must be at least timeout ({self.timeout:g}): "
                            "it bounds a whole URL, timeout one network wait; raise it too, e.g. "
                            f"--set ingest.deadline={2 * self.timeout:g}")
        if self.stall_seconds <= self.deadline:
            raise UserError(f"ingest: stall_seconds ({self.stall_seconds:g}) must exceed deadline "
                            f"({self.deadline:g}), or live downloads count as stalled; e.g. "
                            f"--set ingest.stall_seconds={max(120, 6 * self.deadline):g}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise UserError(f"ingest.encoding {self.encoding!r} is not a known text encoding "
                            "(e.g. utf-8, latin-1, cp1252)") from None
        for entry in self.allow_hosts:
            text = str(entry).strip().strip("[]")
            if not text or ("/" in text and not _is_network(text, ipaddress)):
                raise UserError(f"ingest.allow_hosts entry {entry!r} is not a host name, address or network")


def _is_network(text: str, ipaddress) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------- input splitting
def check_input(path: str, cfg: IngestConfig) -> tuple[list[str], IngestConfig]:
    """The files of a URL list and the config with its column names resolved (schema only, no rows read)."""
    files = input_files(path)
    names = _dataset(files, cfg).schema.names
    url_col = _column(names, cfg.url_col, (cfg.url_col,))
    if url_col is None:
        raise UserError(f"input has no column {cfg.url_col!r} for urls (columns: {', '.join(names)}); "
                        f"name it with --url-col NAME (ingest.url_col)")
    caption_col = ""
    if not cfg.no_captions:
        caption_col = _column(names, cfg.caption_col, _CAPTION_NAMES) or ""
        if not caption_col:
            looked = repr(cfg.caption_col) if cfg.caption_col else "text or caption"
            raise UserError(f"input has no caption column ({looked}; columns: {', '.join(names)}); name it with "
                            "--caption-col NAME (ingest.caption_col), or pass --set ingest.no_captions=true "
                            "if the list has none on purpose")
    missing = [c for c in [*cfg.extra_columns, *([cfg.blur_bbox_col] if cfg.blur_bbox_col else [])]
               if c not in names]
    if missing:
        raise UserError(f"input has no column {missing[0]!r} (columns: {', '.join(names)}); "
                        f"fix ingest.extra_columns / ingest.blur_bbox_col")
    return files, replace(cfg, url_col=url_col, caption_col=caption_col)


def _column(names: list[str], wanted: str, candidates: tuple[str, ...]) -> str | None:
    """``wanted`` if present; else the one column whose name is a candidate, any case (two: ambiguous)."""
    if wanted and wanted in names:
        return wanted
    pool = [wanted] if wanted else list(candidates)
    found = [n for n in names if n.lower() in {c.lower() for c in pool}]
    if len(found) > 1:
        raise UserError(f"input has several possible columns {found}; name one with --url-col or --caption-col")
    return found[0] if found else None


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


def _kind(files: list[str]) -> str:
    return _FORMATS[os.path.splitext(files[0])[1]]


def _dataset(files: list[str], cfg: IngestConfig):
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    kind = _kind(files)
    fs, _ = fsio.get_fs(files[0])
    stripped = [fsio.get_fs(f)[1] for f in files]
    if kind in ("csv", "tsv"):  # csv is transcoded from the configured encoding by the reader itself
        fmt = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                               read_options=pacsv.ReadOptions(encoding=cfg.encoding))
    else:
        fmt = kind
    try:
        return ds.dataset(stripped, format=fmt, filesystem=fs)
    except (pa.ArrowInvalid, OSError, UnicodeError) as exc:
        raise UserError(f"cannot read input {files[0]}: {_one_line(exc)}") from None


def _is_text(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_binary(tp) or \
        pa.types.is_large_binary(tp)


def _text(column: pa.ChunkedArray | pa.Array, encoding: str) -> list[str | None]:
    """Python strings of a column; string and binary bytes are decoded with ``encoding``, bad bytes replaced."""
    if _is_text(column.type):
        raw = column.cast(pa.large_binary()).to_pylist()
        return [None if b is None else b.decode(encoding, "replace") for b in raw]
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in column.to_pylist()]


def _normalise_batch(table: pa.Table, cfg: IngestConfig, first_row: int, encoding: str) -> pd.DataFrame:
    out = pd.DataFrame(index=pd.RangeIndex(table.num_rows))
    out["url"] = [(u or "").strip() for u in _text(table[cfg.url_col], encoding)]
    out["caption"] = _text(table[cfg.caption_col], encoding) if cfg.caption_col else None
    if cfg.uid_col in table.column_names:
        given = _text(table[cfg.uid_col], encoding)
        normal = [normalize_uid(u) for u in given]
        out["uid"] = [n or derive_uid(u, c) for n, u, c in zip(normal, out["url"], out["caption"])]
        out["_bad_uid"] = [None if n else f"bad_uid: input uid {str(g)[:60]!r} is not 1-32 hex characters"
                           for n, g in zip(normal, given)]
    else:
        out["uid"] = [derive_uid(u, c) for u, c in zip(out["url"], out["caption"])]
        out["_bad_uid"] = None
    for col in cfg.extra_columns:
        column = table[col]
        out[col] = _text(column, encoding) if _is_text(column.type) else column.to_pandas()
    _personal_data(out, cfg.personal_data)  # after the uids: a uid never depends on the masking
    out["input_row"] = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    return out


def _personal_data(rows: pd.DataFrame, how: str) -> None:
    """Find personal data in the captions (``caption_pii``: the kinds, comma-separated, or None) and mask it
    when ``how`` is ``mask``."""
    if how == "keep" or rows["caption"].isna().all():
        rows["caption_pii"] = None
        return
    masked, kinds = zip(*(personal.mask(c) if isinstance(c, str) else (c, []) for c in rows["caption"]))
    rows["caption_pii"] = [",".join(dict.fromkeys(k)) or None for k in kinds]
    if how == "mask":
        rows["caption"] = list(masked)


def split_input(files: list[str], pool: str, cfg: IngestConfig) -> dict:
    """Stream the URL list into ``_inputs/{id:08d}.feather`` of ``shard_size`` rows and find duplicate uids;
    return the split summary."""
    summary_path = fsio.join(pool, INPUTS, "_split.json")
    if fsio.exists(summary_path):
        return fsio.read_json(summary_path)
    dataset = _dataset(files, cfg)
    names = dataset.schema.names
    wanted = [c for c in dict.fromkeys([cfg.url_col, cfg.caption_col, cfg.uid_col, *cfg.extra_columns,
                                        *([cfg.blur_bbox_col] if cfg.blur_bbox_col else [])]) if c in names]
    encoding = "utf-8" if _kind(files) in ("csv", "tsv") else cfg.encoding
    shard_id, rows, buffered, pending = 0, 0, [], 0
    scratch = fsio.scratch_dir("uids")
    try:
        finder = DuplicateFinder(scratch)

        def flush(tables: list[pa.Table]) -> None:
            nonlocal shard_id, rows
            df = _normalise_batch(pa.concat_tables(tables), cfg, rows, encoding)
            valid = df["_bad_uid"].isna().to_numpy()
            finder.add(uids_to_array(df["uid"][valid], sort=False), df["input_row"].to_numpy()[valid])
            path = fsio.join(pool, INPUTS, f"{shards.shard_name(shard_id)}.feather")
            with fsio.atomic_open(path, "wb") as f:
                feather.write_feather(pa.Table.from_pandas(df, preserve_index=False), f)
            shard_id += 1
            rows += len(df)

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
        except (pa.ArrowInvalid, UnicodeError) as exc:
            raise UserError(f"cannot parse input {files[0]}: {_one_line(exc)}") from None
        if pending:
            flush(buffered)
        later, first = finder.later()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dup_table = pa.table({"input_row": later, "first_row": first})
    with fsio.atomic_open(fsio.join(pool, INPUTS, DUPLICATES), "wb") as f:
        pq.write_table(dup_table, f)
    summary = {"rows": rows, "shards": shard_id, "shard_size": cfg.shard_size, "duplicate_uids": len(later)}
    fsio.write_json(summary_path, summary)
    return summary


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# ---------------------------------------------------------------------------------------- the download process
class _DownloadProcess:
    """A child process running :mod:`winnow.pipeline.web.ingest_child`, kept alive across the shards of one worker."""

    def __init__(self) -> None:
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "winnow.pipeline.web.ingest_child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     errors="replace")
        self.replies: queue.Queue = queue.Queue()
        self.stderr: collections.deque = collections.deque(maxlen=20)  # the libraries' chatter, kept off the screen
        self.ready = False
        self.sites: dict = {}  # the last shard's robots.txt / tdmrep.json outcomes
        self.blurred: dict = {}  # the last shard's images and faces blurred
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)  # EOF: the process ended

    def _drain(self) -> None:
        for line in self.proc.stderr:
            if line.strip():
                self.stderr.append(line.rstrip()[:300])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def death(self) -> str:
        """How the process ended, in words."""
        code = self.proc.wait()
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            hint = " (the out-of-memory killer sends it)" if -code == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        last = f"; its last words: {self.stderr[-1]}" if self.stderr else ""
        return f"exited with code {code}{last}"

    def run(self, job: dict, progress: str, stall_seconds: float, on_rows=None) -> str:
        """Run one shard job: "done", "stalled" (the process is then killed) or "died". ``on_rows(n)`` is called
        (at most once a second) with the number of rows finished so far, read from the progress file."""
        if not self.ready:  # importing img2dataset takes seconds; the stall clock starts after that
            reply = self.replies.get(timeout=STARTUP_SECONDS)
            if reply is None:
                raise RuntimeError(f"the download process {self.death()} while starting")
            self.ready = True
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died between two shards
            return "died"
        last_size, last_change = -1, time.monotonic()
        rows = _RowsFinished(progress)
        last_report = 0.0
        while True:
            try:
                reply = self.replies.get(timeout=0.2)
            except queue.Empty:
                size = os.path.getsize(progress) if os.path.exists(progress) else 0
                now = time.monotonic()
                if size != last_size:
                    last_size, last_change = size, now
                    if on_rows is not None and now - last_report >= 1.0:
                        last_report = now
                        on_rows(rows.count())
                elif now - last_change > stall_seconds:
                    self.kill()
                    return "stalled"
                continue
            if reply is None:
                return "died"
            if not reply["ok"]:
                if reply.get("errno"):
                    raise OSError(reply["errno"], reply.get("strerror") or reply["error"],
                                  reply.get("filename") or job["out_dir"])
                raise RuntimeError(f"download process failed: {reply['error']}")
            self.sites = reply.get("sites") or {}
            self.blurred = reply.get("blurred") or {}
            return "done"


class _RowsFinished:
    """The rows finished so far (``-row`` lines) of a progress file, read incrementally."""

    def __init__(self, path: str):
        self.path, self.offset, self.finished, self.tail = path, 0, 0, ""

    def count(self) -> int:
        if os.path.exists(self.path):
            with open(self.path) as f:
                f.seek(self.offset)
                text = self.tail + f.read()
                self.offset = f.tell()
            lines = text.split("\n")
            self.tail = lines.pop()  # a line still being written
            self.finished += sum(line.startswith("-") for line in lines)
        return self.finished


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
    sites: str = ""  # a local folder the download processes of a machine share (robots.txt, tdmrep.json, pace)

    @property
    def marker(self) -> str:  # the shard's _stats.json, written last
        return shards.paths(self.pool, self.shard_id)["stats"]


def _work_dir(pool: str, shard_id: int) -> str:
    """A private scratch folder: inside the pool when it is local (so the final moves are renames)."""
    local = fsio.is_local(pool)
    return fsio.scratch_dir(shards.shard_name(shard_id), os.path.join(fsio.get_fs(pool)[1], TMP) if local else None)


def _duplicates(pool: str, shard_id: int, shard_size: int) -> dict[int, str]:
    """Rows of this shard whose uid came earlier in the input: index in shard -> ledger message."""
    fs, path = fsio.get_fs(fsio.join(pool, INPUTS, DUPLICATES))
    if not fs.exists(path):  # a split written before duplicate detection existed
        return {}
    lo, hi = shard_id * shard_size, (shard_id + 1) * shard_size
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, filters=[("input_row", ">=", lo), ("input_row", "<", hi)])
    return {int(r) - lo: f"duplicate_uid: input row {int(first)} has the same uid; only that first row is downloaded"
            for r, first in zip(table["input_row"].to_pylist(), table["first_row"].to_pylist())}


def ingest_shard(task: ShardTask) -> dict:
    """Download one input shard into the pool. Pure in the sense the runner needs: same task, same shard."""
    cfg = IngestConfig(**task.config)
    start = time.time()
    name = shards.shard_name(task.shard_id)
    with fsio.open_read(fsio.join(task.pool, INPUTS, f"{name}.feather")) as f:
        rows = feather.read_feather(f)
    blocked = {i: msg for i, msg in enumerate(rows["_bad_uid"]) if isinstance(msg, str)}
    for i, msg in _duplicates(task.pool, task.shard_id, cfg.shard_size).items():
        blocked.setdefault(i, msg)
    columns = ["uid", "caption", "url", "input_row", *(["caption_pii"] if "caption_pii" in rows else []),
               *cfg.extra_columns]
    if cfg.blur_bbox_col:
        columns.append(cfg.blur_bbox_col)
    columns = list(dict.fromkeys(columns))
    sites: collections.Counter = collections.Counter()  # robots.txt and tdmrep.json outcomes
    faces: collections.Counter = collections.Counter()  # images and faces blurred (ingest.blur_faces)
    while True:
        work = _work_dir(task.pool, task.shard_id)
        try:
            if _download(task, cfg, rows, blocked, columns, work, sites, faces):
                return _commit(task, rows, blocked, work, start, sites, faces)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _download(task: ShardTask, cfg: IngestConfig, rows: pd.DataFrame, blocked: dict[int, str],
              columns: list[str], work: str, sites: collections.Counter, faces: collections.Counter) -> bool:
    """One attempt, skipping the blocked rows (they keep their position, so keys stay stable).

    Returns False after a stall or the death of the download process, having added the rows that were in
    flight to ``blocked``.
    """
    feather_path = os.path.join(work, "input.feather")  # img2dataset deletes its input when done
    feather.write_feather(pa.Table.from_pandas(rows[columns], preserve_index=False), feather_path)
    progress = os.path.join(work, "progress.log")
    shared = task.sites or None
    job = {"shard_id": task.shard_id, "feather": feather_path, "out_dir": work, "progress": progress,
           "columns": columns, "config": asdict(cfg), "skip": sorted(blocked), "shared": shared}
    with _PROCESS_LOCK:
        process = _download_process()
        outcome = process.run(job, progress, cfg.stall_seconds, on_rows=lambda n: task_progress(n, len(rows)))
        if outcome == "done":
            sites.update(process.sites)
            faces.update(process.blurred)
    if outcome == "done":
        return True
    in_flight = _in_flight(progress)
    if not in_flight:  # nothing to blame: retrying would end the same way
        what = "stalled" if outcome == "stalled" else f"{process.death()}"
        raise RuntimeError(f"shard {task.shard_id}: the download process {what} with no download in flight")
    if outcome == "stalled":
        message = f"stalled: no sample finished for {cfg.stall_seconds:g} s while this one was in flight"
    else:
        message = (f"download_killed: the download process {process.death()} while this row was in flight "
                   f"(with {len(in_flight) - 1} other row(s)); the rest of the shard was downloaded again")
    for i in in_flight:
        blocked[i] = message
    return False


def _in_flight(progress: str) -> list[int]:
    """Rows at work when the download process stopped (their last mark in the progress file is ``+``: being
    downloaded, or ``*``: being decoded); rows that were only waiting (``~``, ``=``) are not to blame."""
    last: dict[int, str] = {}
    if os.path.exists(progress):
        with open(progress) as f:
            for line in f:  # a last line without its newline may be cut short ("+1" of "+12"): not read
                if line.endswith("\n") and line[:1] in "+~*=-" and line[1:].strip().isdigit():
                    last[int(line[1:])] = line[0]
    return sorted(i for i, mark in last.items() if mark in "+*")


def _complete(table: pd.DataFrame, rows: pd.DataFrame, shard_id: int, shard_size: int) -> pd.DataFrame:
    """img2dataset's rows in key order, one per input row: a row its sample loop dropped (it logs an exception
    and writes nothing) comes back as a failed row, so no row is ever without a state."""
    digits = math.ceil(math.log10(shard_size))  # img2dataset's key: shard id, then the row in this many digits
    index = pd.to_numeric(table["key"]) % 10 ** digits if len(table) else pd.Series(dtype=int)
    missing = sorted(set(range(len(rows))) - set(index.astype(int)))
    if missing:
        lost = rows.iloc[missing][[c for c in rows.columns if c in table.columns]].copy()
        lost["key"] = [f"{shard_id * 10 ** digits + i:0{8 + digits}d}" for i in missing]
        lost["status"] = "failed_to_download"
        lost["error_message"] = "error: the download loop lost this row (an internal error); retry the shard"
        table = pd.concat([table, lost], ignore_index=True)
    return table.sort_values("key", kind="stable").reset_index(drop=True)


def _commit(task: ShardTask, rows: pd.DataFrame, blocked: dict[int, str], work: str, start: float,
            sites: collections.Counter, faces: collections.Counter) -> dict:
    name = shards.shard_name(task.shard_id)
    table = _complete(pd.read_parquet(os.path.join(work, f"{name}.parquet")), rows, task.shard_id,
                      task.config["shard_size"])
    table["url"] = rows["url"].to_numpy()  # every row keeps its url, whatever its state
    table["state"] = [classify(s, e) for s, e in zip(table["status"], table["error_message"])]
    for i, message in blocked.items():  # rows are in key order, i.e. input order
        table.at[i, "status"] = "failed_to_download"
        table.at[i, "error_message"] = message
        table.at[i, "state"] = classify("failed_to_download", message)
    table["error_message"] = [m[:MESSAGE_CHARS] if isinstance(m, str) else m for m in table["error_message"]]
    target = shards.paths(task.pool, task.shard_id)
    fsio.atomic_move(os.path.join(work, f"{name}.tar"), target["tar"])
    shards.write_table(target["parquet"], table)
    stats = shards.shard_stats(table, start, time.time())  # the stage writes it as _stats.json, the marker
    if "caption_pii" in table.columns:
        kinds = collections.Counter(k for v in table["caption_pii"] if isinstance(v, str) for k in v.split(","))
        stats["personal_data"] = {"captions": int(table["caption_pii"].notna().sum()), **dict(sorted(kinds.items()))}
    stats["sites"] = dict(sorted(sites.items()))
    if faces:
        stats["faces"] = dict(sorted(faces.items()))
    return stats


def sites_folder(pool: str) -> str:
    """Where a run's download processes share the sites' robots.txt and tdmrep.json and the hosts' pace: the
    pool's scratch for a local pool, else a scratch folder of the driver's temporary folder (the processes of
    another machine of a cluster make their own at the same path)."""
    if fsio.is_local(pool):
        return os.path.join(fsio.get_fs(pool)[1], TMP, "_sites")
    return fsio.scratch_dir("sites")  # named after this process: swept once it is gone


# ---------------------------------------------------------------------------------------------------- driver
def ingest(urls: str, pool: str, cfg: IngestConfig, runner, overwrite: bool = False, log=print) -> dict:
    """Turn the URL list ``urls`` into the pool folder ``pool``; return its manifest."""
    files, cfg = check_input(urls, cfg)
    stage = Stage("ingest", pool, asdict(cfg), inputs=files, runner=runner, overwrite=overwrite,
                  protect=[urls, *files], enclosing=[urls], log=log)
    if stage.done:
        return stage.manifest
    fsio.remove(fsio.join(pool, TMP))
    split = split_input(files, pool, cfg)
    dups = f", {split['duplicate_uids']:,} repeat an earlier uid" if split.get("duplicate_uids") else ""
    log(f"ingest: {split['rows']:,} input rows{dups}, in {split['shards']} shards of {cfg.shard_size:,} -> {pool}")
    sizes = [min(cfg.shard_size, split["rows"] - i * cfg.shard_size) for i in range(split["shards"])]
    sites = sites_folder(pool)
    try:
        stats = stage.map(ingest_shard, [ShardTask(pool, i, asdict(cfg), sites) for i in range(split["shards"])],
                          label="ingest", unit="shards", sizes=sizes)
    finally:
        if not fsio.is_local(pool):
            shutil.rmtree(sites, ignore_errors=True)
    states, _ = ledger(pool)
    if sum(states.values()) != split["rows"]:
        raise RuntimeError(f"ledger invariant broken: {split['rows']} input rows, {sum(states.values())} recorded")
    fsio.remove(fsio.join(pool, INPUTS))
    fsio.remove(fsio.join(pool, TMP))
    ok = states.get(OK, 0)
    totals = sum_counts(stats)
    return stage.finish(rows={"input": split["rows"], "ok": ok, "failed": split["rows"] - ok, **states},
                        shards=split["shards"], source=str(urls), sites=totals.get("sites", {}),
                        personal_data=totals.get("personal_data", {}), faces=totals.get("faces", {}))

