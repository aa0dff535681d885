"""Parts and their embeddings: how every stage after ``embed`` reads a pool, or DataComp's metadata folder.

A *part* is a parquet table with its row-aligned embeddings: a shard of a Winnow/img2dataset pool
(``{id:08d}.parquet``, embeddings in ``<pool>/embeddings/<tag>/{id:08d}.npz``), or a file of DataComp's metadata
folder (``<hex>.parquet`` beside ``<hex>.npz``). Embeddings are DataComp's ``.npz`` layout: ``<tag>_img`` and
``<tag>_txt``, float16, L2-normalised, row i = parquet row i, NaN where a row has no image or caption.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import shards
from winnow.pipeline.data.ledger import OK, states_of


@dataclass(frozen=True)
class Part:
    stem: str
    parquet: str


def list_parts(pool: str) -> list[Part]:
    """The tables of a pool: shards when it has tars, else every parquet file (DataComp metadata)."""
    if not fsio.exists(pool):
        raise UserError(f"pool not found: {pool}")
    ids = shards.list_shards(pool)
    if ids:
        digits = shards.name_digits(pool)
        return [Part(shards.shard_name(i, digits), shards.paths(pool, i, digits)["parquet"]) for i in ids]
    names = [n for n in fsio.listdir(pool) if n.endswith(".parquet")]
    if not names:
        raise UserError(f"{pool} holds neither shards nor parquet files; pass a pool or a metadata folder")
    return [Part(n[: -len(".parquet")], fsio.join(pool, n)) for n in names]


def part_rows(part: Part) -> int:
    """The part's row count, from its parquet footer (no column is read)."""
    with fsio.open_read(part.parquet) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def embedding_path(pool: str, part: Part, tag: str, dirs: dict[str, str] | None) -> str:
    """Where a part's embeddings for ``tag`` live: an explicit folder, ``<pool>/embeddings/<tag>``, or beside it."""
    candidates = [fsio.join(dirs[tag], f"{part.stem}.npz")] if dirs and tag in dirs else []
    candidates += [fsio.join(pool, "embeddings", tag, f"{part.stem}.npz"), fsio.join(pool, f"{part.stem}.npz")]
    for c in candidates:
        if fsio.exists(c):
            return c
    raise UserError(f"no embeddings with tag {tag!r} for {part.stem} (looked in {', '.join(candidates)}); "
                    f"run `winnow embed --tag {tag}` first")


def arrow_strings(dtype: pa.DataType):
    """``types_mapper`` keeping strings in Arrow: no Python object per uid or caption (12.8M of each at small)."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return pd.ArrowDtype(dtype)
    return None


def read_part(part: Part, columns: list[str] | None = None, uid: bool = True) -> pd.DataFrame:
    """The part's table with ``caption`` (DataComp metadata calls it ``text``) and ``state`` columns (and
    ``uid`` unless ``uid=False`` with ``columns`` given)."""
    fs, p = fsio.get_fs(part.parquet)
    local = fsio.is_local(part.parquet)
    with contextlib.nullcontext(p) if local else fs.open(p, "rb") as f:
        names = pq.read_schema(f).names
        wanted = None
        if columns is not None:
            extra = {"caption": "text"} if "caption" not in names else {}
            status = ["state"] if "state" in names else [c for c in ("status", "error_message") if c in names]
            wanted = sorted({c if c in names else extra.get(c, c) for c in columns if
                             c in names or extra.get(c) in names} | {*(["uid"] if uid else []), *status}) or ["uid"]
        # one thread: a worker process is one of several on the machine (Arrow's pool would oversubscribe it)
        table = pq.read_table(f, columns=wanted, use_threads=False, memory_map=local)
        table = table.to_pandas(types_mapper=arrow_strings)
    if "caption" not in table.columns and "text" in table.columns:
        table = table.rename(columns={"text": "caption"})
    if "state" not in table.columns:
        table["state"] = states_of(table) if "status" in table.columns else OK  # metadata rows are candidates
        table.attrs["all_ok"] = "status" not in table.columns
    return table


def load_embeddings(pool: str, part: Part, tags: tuple[str, ...], dirs: dict[str, str] | None,
                    arrays: dict[str, tuple[str, ...]] | None = None) -> dict:
    """``{tag: {name: array}}`` of one part: each tag's ``arrays[tag]`` (default its ``img`` and ``txt``)."""
    return {tag: load_npz(embedding_path(pool, part, tag, dirs), tag, (arrays or {}).get(tag, ("img", "txt")))
            for tag in tags}


def load_npz(path: str, tag: str, names: tuple[str, ...] = ("img", "txt")) -> dict[str, np.ndarray]:
    """The arrays ``<tag>_<name>`` of a Winnow or DataComp ``.npz`` that exist (float32 for the embeddings
    ``img`` and ``txt``, as stored for others)."""
    fs, p = fsio.get_fs(path)
    with fs.open(p, "rb") as f, np.load(f, allow_pickle=False) as z:
        out = {n: z[f"{tag}_{n}"] for n in names if f"{tag}_{n}" in z.files}
    out = {n: a.astype(np.float32) if n in ("img", "txt") else a for n, a in out.items()}
    if not out:
        raise UserError(f"{path} has no array {', '.join(f'{tag}_{n}' for n in names)}; check the tag and names")
    return out
