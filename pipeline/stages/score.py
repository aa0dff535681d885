"""Scoring: run filters over every part of a pool and store one score column per filter.

A *part* is a parquet table with its row-aligned embeddings: the shards of a Winnow/img2dataset pool
(``{id:08d}.parquet``, embeddings in ``<pool>/embeddings/<tag>/``), or the files of DataComp's metadata folder
(``<hex>.parquet`` beside ``<hex>.npz``). Each filter's scores are cached in
``<pool>/scores/<column>-<hash of params>/`` (one parquet per part: uid + the column, plus a manifest), so
choosing another subset from the same scores re-reads no image and recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.core import fsio
from pipeline.data import manifest, shards
from pipeline.data.parts import Part, arrow_strings, list_parts, load_embeddings, part_rows, read_part
from pipeline.run.stage import Stage


def spec_hash(filt) -> str:
    blob = json.dumps({"key": filt.key, "params": filt.params()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def cache_dir(pool: str, filt) -> str:
    return fsio.join(pool, "scores", f"{filt.column}-{spec_hash(filt)}")


class PoolContext:
    """What ``Filter.prepare`` may use: the pool's embeddings, a place to save state, the log."""

    def __init__(self, pool: str, parts: list[Part], dirs: dict[str, str] | None, out: str, log):
        self.pool, self.parts, self.dirs, self.out, self.log = pool, parts, dirs, out, log

    def sample(self, tag: str, kind: str, max_rows: int, seed: int = 0) -> np.ndarray:
        """At most about ``max_rows`` finite embeddings of the pool, float32, read part by part (memory: the sample
        and one part): every finite row when the pool has no more rows than that, else each row with
        probability max_rows / rows, drawn from ``seed`` and the part's position."""
        rate = max_rows / max(1, sum(part_rows(p) for p in self.parts))
        out = []
        for i, part in enumerate(self.parts):
            x = load_embeddings(self.pool, part, (tag,), self.dirs)[tag][kind]
            x = x[np.isfinite(x).all(axis=1)]
            if rate < 1:
                x = x[np.random.default_rng([seed, i]).random(len(x)) < rate]
            out.append(np.ascontiguousarray(x, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def save(self, name: str, array: np.ndarray) -> str:
        path = fsio.join(self.out, name)
        with fsio.atomic_open(path, "wb") as f:
            np.save(f, array)
        return path


@dataclass(frozen=True)
class ScoreTask:
    pool: str
    part: Part
    spec: dict  # {"key", "params"} including any state set by prepare
    out: str
    dirs: dict | None

    @property
    def marker(self) -> str:
        return fsio.join(self.out, f"{self.part.stem}_stats.json")


def score_part(task: ScoreTask) -> dict:
    from filters import REGISTRY

    from pipeline.core.errors import UserError
    from pipeline.data.uid import uids_to_array

    filt = REGISTRY[task.spec["key"]](**task.spec["params"])
    table = read_part(task.part, list(filt.columns()))
    try:
        uids_to_array(table["uid"].array, sort=False)
    except UserError as exc:
        raise UserError(f"{task.part.parquet}: {exc}") from None
    embeddings = load_embeddings(task.pool, task.part, filt.tags_for(table.columns), task.dirs)
    scored = filt(table, embeddings)
    shards.write_table(fsio.join(task.out, f"{task.part.stem}.parquet"), scored[["uid", filt.column]])
    stats = {"rows": int(len(scored))}
    fsio.write_json(task.marker, stats)  # the commit marker, written last
    return stats


def check_parts(parts: list[Part], filters) -> None:
    """Every part readable as parquet, with a uid column and the columns the filters need, before any work:
    each problem is one line naming the file."""
    from pipeline.core.errors import UserError, describe

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


def score(pool: str, specs: list[dict], runner, dirs: dict[str, str] | None = None, log=print) -> dict[str, str]:
    """Compute (or reuse) each filter's scores over the pool; return ``{column: cache folder}``."""
    from dataclasses import asdict

    from filters import build

    parts = list_parts(pool)
    filters = [build(spec) for spec in specs]
    check_parts(parts, filters)
    layout = "".join(f"{p.stem}:{fsio.size(p.parquet)}\n" for p in parts)
    layout = hashlib.sha256(layout.encode()).hexdigest()[:16]
    done: dict[str, str] = {}
    for filt in filters:
        out = cache_dir(pool, filt)
        upstream = [fsio.join(pool, manifest.MANIFEST)] + [
            fsio.join((dirs or {}).get(tag) or fsio.join(pool, "embeddings", tag), manifest.MANIFEST)
            for tag in filt.tags()]
        # a cache: replaced whenever its parameters or inputs changed (a metadata folder has no manifest: the
        # names and sizes of its parts stand for it)
        stage = Stage("score", out, {"key": filt.key, "params": filt.params(), "parts": layout},
                      inputs=[u for u in upstream if fsio.exists(u)], runner=runner, overwrite=True, log=lambda m: None)
        if not stage.done:
            filt.prepare(PoolContext(pool, parts, dirs, out, log))
            full = {"key": filt.key, "params": asdict(filt)}
            stats = stage.map(score_part, [ScoreTask(pool, p, full, out, dirs) for p in parts],
                              label=f"score {filt.column}", unit="parts")
            stage.finish(rows={"parts": len(parts), "rows": sum(s["rows"] for s in stats)}, column=filt.column)
        done[filt.column] = out
    return done


def read_scores(pool: str, columns: dict[str, str]) -> pd.DataFrame:
    """One frame over the whole pool: uid, state, and every requested score column (row order = pool order)."""
    parts = list_parts(pool)
    frames = []
    for part in parts:
        base = read_part(part, [])[["uid", "state"]]
        for column, folder in columns.items():
            fs, p = fsio.get_fs(fsio.join(folder, f"{part.stem}.parquet"))
            with fs.open(p, "rb") as f:
                col = pq.read_table(f, columns=["uid", column]).to_pandas(types_mapper=arrow_strings)
            if not col["uid"].equals(base["uid"]):
                raise RuntimeError(f"scores in {folder} are not row-aligned with {part.parquet}; delete the folder")
            base[column] = col[column].to_numpy()
        frames.append(base)
    return pd.concat(frames, ignore_index=True)

