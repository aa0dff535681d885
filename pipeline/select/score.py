"""Scoring: run filters over every part of a pool and cache one compact score array per filter and part.

A *part* is a parquet table with its row-aligned embeddings: the shards of a Winnow/img2dataset pool
(``{id:08d}.parquet``, embeddings in ``<pool>/embeddings/<tag>/``), or the files of DataComp's metadata folder
(``<hex>.parquet`` beside ``<hex>.npz``).

The cache lives outside the pool: ``<cache>/scores/<pool key>/`` where ``<cache>`` is ``--cache``,
``$WINNOW_CACHE`` or ``~/.cache/winnow`` and the key is a digest of the pool's absolute path. In it:

- ``rows/<part>.uid.npy``: the part's uids packed as DataComp's ``u8,u8``, sorted; ``<part>.order.npy``: the
  row of each (int32), so a row mask selects sorted uids as ``uid[mask[order]]``; ``<part>.ok.npy``: which rows
  are candidates (ledger state ok; every row of a metadata file);
- ``<column>-<hash of the filter's params>/<part>.npy``: the filter's scores, row-aligned, float32 where that
  holds every value exactly, else float64.

Each folder is a stage: replaced when its parameters, the pool's manifest, or the parts' names and sizes change.
Every part is read once by one worker task that writes the rows and every missing filter's scores; choosing
another subset from the same filters reads only these arrays (no parquet, no string).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from winnow.filters import REGISTRY, build, code_version
from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError, describe
from winnow.pipeline.data import manifest
from winnow.pipeline.data.ledger import OK
from winnow.pipeline.data.parts import Part, embedding_path, list_parts, load_embeddings, part_rows, read_part
from winnow.pipeline.data.uid import sort_order, uids_to_array
from winnow.pipeline.run.stage import Stage


def spec_hash(filt) -> str:
    """The cache name of a filter: its key, parameters and code version."""
    blob = json.dumps({"key": filt.key, "params": filt.params(), "code": code_version(type(filt))}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def cache_root(pool: str, cache: str = "") -> str:
    """Where the score cache of ``pool`` lives (never inside the pool unless ``cache`` says so)."""
    base = cache or os.environ.get("WINNOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "winnow")
    key = hashlib.sha256(fsio.absolute(str(pool)).rstrip("/").encode()).hexdigest()[:16]
    return fsio.join(fsio.absolute(base), "scores", key)


class PoolContext:
    """What ``Filter.prepare`` may use: the pool's embeddings, a place to save state, the log."""

    def __init__(self, pool: str, parts: list[Part], dirs: dict[str, str] | None, out: str, log):
        self.pool, self.parts, self.dirs, self.out, self.log = pool, parts, dirs, out, log

    def sample(self, tag: str, kind: str, max_rows: int, seed: int = 0, keep=None, dtype=np.float32) -> np.ndarray:
        """At most about ``max_rows`` finite embeddings of the pool as ``dtype``, read part by part into one array
        allocated up front (memory: the sample and one part): every finite row when the pool has no more rows than
        that, else each row with probability max_rows / rows, drawn from ``seed`` and the part's position.
        ``keep(part)``, when given, returns a boolean row mask of the part: only those rows are sampled (the rate
        is computed over all rows, so the sample is smaller when the mask drops many)."""
        total = sum(part_rows(p) for p in self.parts)
        rate = max_rows / max(1, total)
        # the draw is binomial: its mean plus 8 standard deviations is exceeded with probability below 1e-15
        capacity = total if rate >= 1 else min(total, int(max_rows + 8 * np.sqrt(max_rows) + 64))
        out, n = None, 0
        for i, part in enumerate(self.parts):
            x = load_embeddings(self.pool, part, (tag,), self.dirs, {tag: (kind,)})[tag][kind]
            draw = np.random.default_rng([seed, i]).random(len(x)) < rate if rate < 1 else np.ones(len(x), bool)
            mask = np.isfinite(x).all(axis=1) & draw
            if keep is not None:
                mask &= keep(part)
            rows = x[mask]
            if out is None:
                out = np.empty((capacity, x.shape[1]), dtype)
            if n + len(rows) > len(out):  # beyond the bound above: grow (a copy) rather than fail
                out = np.concatenate([out, np.empty((n + len(rows), out.shape[1]), dtype)])
            out[n: n + len(rows)] = rows
            n += len(rows)
            del x, rows
        return out[:n] if out is not None else np.zeros((0, 0), dtype)

    def each_part(self, tag: str, kind: str):
        """The pool's ``kind`` embeddings one part at a time (memory: one part): ``(part, float32 array)``,
        row-aligned with the part's table."""
        for part in self.parts:
            arrays = load_embeddings(self.pool, part, (tag,), self.dirs, {tag: (kind,)})[tag]
            if kind not in arrays:
                raise UserError(f"no '{tag}_{kind}' embeddings for {part.stem}; run `winnow embed --tag {tag}`")
            yield part, arrays[kind]

    def each_table(self, columns):
        """The pool's tables one part at a time (memory: one part), only ``columns`` plus ``state``:
        ``(part, DataFrame)``."""
        for part in self.parts:
            yield part, read_part(part, list(columns), uid=False)

    def uids(self, part: Part) -> np.ndarray:
        """The part's uids (``u8,u8``) in row order."""
        return uids_to_array(read_part(part, ["uid"])["uid"].array, sort=False)

    def save(self, name: str, array: np.ndarray) -> str:
        path = fsio.join(self.out, name)
        with fsio.atomic_open(path, "wb") as f:
            np.save(f, array)
        return path

    def save_blocks(self, name: str, blocks) -> tuple[str, tuple[int, int]]:
        """One float32 ``.npy`` of the rows of ``blocks()`` (a function returning an iterator of 2-d blocks with
        equal columns), written a block at a time: memory is one block, not the array. ``blocks`` is called
        twice (rows counted, then written). Returns the path and the array's shape."""
        rows, dims = 0, 0
        for block in blocks():
            rows, dims = rows + len(block), block.shape[1]
        path = fsio.join(self.out, name)
        with fsio.atomic_open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": (rows, dims)})
            written = 0
            for block in blocks():
                f.write(np.ascontiguousarray(block, np.float32).tobytes())
                written += len(block)
        if written != rows:
            raise ValueError(f"{name}: the blocks changed between the two passes ({rows} then {written} rows)")
        return path, (rows, dims)


def _npz_files(pool: str, parts: list[Part], tag: str, dirs) -> list[str]:
    """The ``.npz`` files of ``tag`` that exist (none when the table holds precomputed scores instead)."""
    out = []
    for part in parts:
        try:
            out.append(embedding_path(pool, part, tag, dirs))
        except UserError:
            continue
    return out


def _layout(pool: str, files: list[str]) -> str:
    """A digest of files' names, sizes and modification times (a pool with a manifest changes it when its files
    change; a metadata folder has none, so its parquet and .npz files stand for it). "" for no file."""
    if not files:
        return ""
    fs, _ = fsio.get_fs(files[0])
    lines = []
    for f in files:
        info = fs.info(fsio.get_fs(f)[1])
        lines.append(f"{f.rsplit('/', 1)[-1]}:{info.get('size')}:{info.get('mtime') or info.get('LastModified') or ''}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def compact(values: np.ndarray) -> np.ndarray:
    """float32 when it holds every value exactly (NaN included), else float64."""
    values = np.asarray(values, dtype=np.float64)
    narrow = values.astype(np.float32)
    return narrow if np.array_equal(narrow.astype(np.float64), values, equal_nan=True) else values


def save_array(path: str, array: np.ndarray) -> None:
    """One ``.npy``, written atomically (a regenerable cache file: no fsync)."""
    with fsio.atomic_open(path, "wb", fsync=False) as f:
        np.save(f, array)


def load_array(path: str) -> np.ndarray:
    """A cached ``.npy`` (read straight from a local disk; fetched whole from an object store)."""
    if "://" not in path or path.startswith("file://"):
        return np.load(path.removeprefix("file://"), allow_pickle=False)
    fs, p = fsio.get_fs(path)
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


@dataclass(frozen=True)
class ScoreTask:
    """One part: the rows file to write (or "") and the filters (spec, cache folder) whose scores it lacks."""

    pool: str
    part: Part
    rows_out: str
    filters: tuple  # ((spec, out), ...), spec = {"key", "params"} including any state set by prepare
    dirs: dict | None


def score_part(task: ScoreTask) -> int:
    """Read the part once, write its rows file and each filter's scores; return its row count."""
    filters = [((spec.get("cls") or REGISTRY[spec["key"]])(**spec["params"]), out) for spec, out in task.filters]
    wanted = sorted({c for filt, _ in filters for c in filt.columns()})
    table = read_part(task.part, wanted, uid=bool(task.rows_out))
    if task.rows_out:
        try:
            uids = uids_to_array(table["uid"].array, sort=False)
        except UserError as exc:
            raise UserError(f"{task.part.parquet}: {exc}") from None
        order = sort_order(uids).astype(np.int32)
        stem = fsio.join(task.rows_out, task.part.stem)
        ok = np.ones(len(table), bool) if table.attrs.get("all_ok") else np.asarray(table["state"].to_numpy() == OK,
                                                                                   bool)
        save_array(f"{stem}.ok.npy", ok)
        save_array(f"{stem}.order.npy", order)
        save_array(f"{stem}.uid.npy", uids[order])  # written last: the part's rows are cached
    tags = tuple(sorted({t for filt, _ in filters for t in filt.tags_for(table.columns)}))
    names = {t: tuple(sorted({n for filt, _ in filters if t in filt.tags_for(table.columns) for n in filt.arrays()}))
             for t in tags}
    embeddings = load_embeddings(task.pool, task.part, tags, task.dirs, names)
    for filt, out in filters:
        values = filt(table, embeddings)[filt.column].to_numpy(dtype=np.float64)
        save_array(fsio.join(out, f"{task.part.stem}.npy"), compact(values))
    return len(table)


def check_parts(parts: list[Part], filters) -> None:
    """Every part readable as parquet, with a uid column and the columns the filters need, before any work:
    each problem is one line naming the file."""

    for part in parts:
        try:
            with fsio.open_read(part.parquet) as f:
                names = set(pq.read_schema(f).names)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"{part.parquet} is not a readable parquet file ({describe(exc)}); replace or remove "
                            "it") from None
        if "text" in names:
            names.add("caption")  # DataComp's metadata calls the caption text
        for filt in filters:
            missing = [c for c in ("uid", *filt.requires) if c not in names]
            if missing:
                raise UserError(f"{part.parquet} has no column {missing[0]!r}, which {filt.key!r} needs (it has: "
                                f"{', '.join(sorted(names))})")


@dataclass
class Scores:
    """Where the cached arrays of a pool are: ``ok(part)``, ``sorted_uids(part)`` and ``column(name, part)``."""

    parts: list[Part]
    rows_dir: str
    folders: dict[str, str]  # column -> cache folder

    def ok(self, part: Part) -> np.ndarray:
        return load_array(fsio.join(self.rows_dir, f"{part.stem}.ok.npy"))

    def sorted_uids(self, part: Part) -> tuple[np.ndarray, np.ndarray]:
        """The part's uids in sorted order and the row of each."""
        stem = fsio.join(self.rows_dir, part.stem)
        return load_array(f"{stem}.uid.npy"), load_array(f"{stem}.order.npy")

    def column(self, name: str, part: Part) -> np.ndarray:
        if name not in self.folders:
            raise UserError(f"no score column {name!r}; the recipe's filters produce: {', '.join(self.folders)}")
        return load_array(fsio.join(self.folders[name], f"{part.stem}.npy"))


def score(pool: str, specs: list[dict], runner, dirs: dict[str, str] | None = None, cache: str = "",
          log=print) -> Scores:
    """Compute (or reuse) the rows and each filter's scores over the pool, in one pass over its parts."""
    parts = list_parts(pool)
    filters = [build(spec) for spec in specs]
    classes = {id(f): spec.get("cls") if isinstance(spec, dict) else None for f, spec in zip(filters, specs)}
    root = cache_root(pool, cache)
    layout = _layout(pool, [p.parquet for p in parts])
    pool_manifest = [m for m in [fsio.join(pool, manifest.MANIFEST)] if fsio.exists(m)]
    quiet = lambda m: None  # noqa: E731 - a cache's stages say nothing

    # a cache: replaced whenever its parameters or inputs changed (a metadata folder has no manifest: the names
    # and sizes of its parts stand for it)
    rows = Stage("rows", fsio.join(root, "rows"), {"pool": fsio.absolute(str(pool)), "parts": layout},
                 inputs=pool_manifest, overwrite=True, log=quiet)
    todo: list[tuple] = []  # (filter, stage) still to compute
    folders: dict[str, str] = {}
    for filt in filters:
        out = fsio.join(root, f"{filt.column}-{spec_hash(filt)}")
        upstream = [fsio.join((dirs or {}).get(tag) or fsio.join(pool, "embeddings", tag), manifest.MANIFEST)
                    for tag in filt.tags()]
        arrays = _layout(pool, [p for tag in filt.tags() if not fsio.exists(
            fsio.join((dirs or {}).get(tag) or fsio.join(pool, "embeddings", tag), manifest.MANIFEST))
            for p in _npz_files(pool, parts, tag, dirs)])
        stage = Stage("score", out, {"key": filt.key, "params": filt.params(), "code": code_version(type(filt)),
                                     "parts": layout, "arrays": arrays},
                      inputs=pool_manifest + [u for u in upstream if fsio.exists(u)] + list(filt.files()),
                      overwrite=True, log=quiet)
        folders[filt.column] = out
        if not stage.done:
            todo.append((filt, stage))
    # numpy-only filters run on the driver's threads when no cluster is up (no start and stop to pay for)
    threads = all(type(filt).vectorized for filt, _ in todo)
    if todo or not rows.done:  # parts will be read: start the workers while the driver checks and prepares
        if runner is not None and not (threads and runner.in_driver()):
            runner.prestart()
        check_parts(parts, filters)
        for filt, stage in todo:
            filt.prepare(PoolContext(pool, parts, dirs, stage.out, log))
    todo = [(filt, stage, {"key": filt.key, "params": asdict(filt)} | ({"cls": classes[id(filt)]}
                                                                       if classes[id(filt)] else {}))
            for filt, stage in todo]
    tasks = []
    for part in parts:
        missing = tuple((spec, stage.out) for filt, stage, spec in todo
                        if not fsio.exists(fsio.join(stage.out, f"{part.stem}.npy")))
        rows_out = "" if rows.done or fsio.exists(fsio.join(rows.out, f"{part.stem}.uid.npy")) else rows.out
        if missing or rows_out:
            tasks.append(ScoreTask(pool, part, rows_out, missing, dirs))
    if tasks:
        names = ", ".join(filt.column for filt, _, _ in todo) or "uids"
        if runner is None:
            counts = [score_part(task) for task in tasks]
        else:
            counts = runner.map(score_part, tasks, label=f"score {names}", threads=threads)
        lost = [t.part.stem for t in tasks if not fsio.exists(fsio.join(rows.out, f"{t.part.stem}.uid.npy"))]
        if lost:
            raise UserError(f"the workers' score cache files are not in {root} ({lost[0]}...): they wrote them on "
                            "their own machines; pass --cache a folder (or object-store URL) every machine sees")
    n = sum(counts) if tasks and len(tasks) == len(parts) else None
    if not rows.done:
        n = n if n is not None else sum(part_rows(p) for p in parts)
        rows.finish(rows={"parts": len(parts), "rows": n})
    for filt, stage, _ in todo:
        n = n if n is not None else sum(part_rows(p) for p in parts)
        stage.finish(rows={"parts": len(parts), "rows": n}, column=filt.column)
    return Scores(parts, rows.out, folders)
