"""Reading a pool as a whole: its ledger (counts per state, every row's state) and whether its ingest finished."""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest, shards
from winnow.pipeline.data.ledger import states_of


def ledger(pool: str) -> tuple[dict[str, int], int | None]:
    """Counts per state over every shard's parquet, and the input row count from the manifest (if any)."""
    ids = shards.list_shards(pool)
    if not ids:
        unfinished = unfinished_ingest(pool)
        if unfinished:
            raise UserError(f"{pool}: {unfinished}; {_what_to_do(pool)}")
        raise UserError(f"{pool} holds no shards; pass a pool folder (the output of `winnow ingest`)")
    counts: Counter = Counter()
    for df in _state_tables(pool, ["key"]):
        counts.update(df["state"])
    doc = manifest.read_manifest(pool)
    total = doc.get("rows", {}).get("input") if doc else None
    return dict(counts), total


def unfinished_ingest(pool: str) -> str | None:
    """"ingest unfinished: N of M shards done" (plus "its command is still running: process P on H" while it runs
    on this machine) when ``pool`` is a Winnow ingest that has not finished, else None.

    A Winnow ingest leaves a run record (``_run.json``) and its split input (``_inputs/``) until it has finished;
    pools that Winnow did not ingest (img2dataset or DataComp output, metadata folders) have neither and count as
    finished.
    """
    if manifest.read_manifest(pool) is not None:
        return None
    run = fsio.join(pool, manifest.RUN)
    try:
        stage = fsio.read_json(run).get("stage") if fsio.exists(run) else None
    except (ValueError, OSError, AttributeError):
        stage = "?"  # unreadable: not known to be finished
    if stage != "ingest" and not (stage in (None, "?") and fsio.exists(fsio.join(pool, shards.INPUTS))):
        return None
    split = fsio.join(pool, shards.INPUTS, "_split.json")
    planned = fsio.read_json(split)["shards"] if fsio.exists(split) else "?"
    running = manifest.driver_alive(pool)
    busy = f" (its command is still running: {running})" if running else ""
    return f"ingest unfinished: {len(shards.list_shards(pool))} of {planned} shards done{busy}"


def _what_to_do(pool: str) -> str:
    if manifest.driver_alive(pool):
        return "wait until it has finished"
    return "rerun the same `winnow ingest` to finish it"


def require_finished(pool: str, allow_partial: bool, command: str, log=print) -> None:
    """Refuse a pool whose ingest has not finished (or is still running), unless ``allow_partial`` (then say what
    is used)."""
    problem = unfinished_ingest(pool)
    if problem and not allow_partial:
        raise UserError(f"{pool}: {problem}; {_what_to_do(pool)}, or pass --allow-partial to {command} the finished "
                        "shards only")
    if problem:
        log(f"{command}: {problem}; using the finished shards only (--allow-partial)")


def _state_tables(pool: str, columns: list[str]):
    """Per shard: ``columns`` plus ``state`` (read, or derived from status/error_message for img2dataset pools)."""

    digits = shards.name_digits(pool)
    for i in shards.list_shards(pool):
        fs, p = fsio.get_fs(shards.paths(pool, i, digits)["parquet"])
        with fs.open(p, "rb") as f:
            has_state = "state" in pq.read_schema(f).names
        extra = ["state"] if has_state else ["status", "error_message"]
        df = shards.read_table(pool, i, columns=[*columns, *extra], digits=digits)
        yield df.assign(state=states_of(df))[[*columns, "state"]]


def read_states(pool: str) -> pd.DataFrame:
    """uid, key and state of every row of a pool."""
    frames = list(_state_tables(pool, ["uid", "key"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["uid", "key", "state"])


def refused_host(pool: str, shards_read: int = 3) -> str | None:
    """The host (or address) most often refused by the URL policy in the first shards of ``pool``, if any."""

    seen: Counter = Counter()
    for shard_id in shards.list_shards(pool)[:shards_read]:
        table = shards.read_table(pool, shard_id, columns=["url", "state"])
        for url in table.loc[table["state"] == "refused_url", "url"]:
            try:
                host = urlsplit(str(url)).hostname
            except ValueError:
                continue
            if host and urlsplit(str(url)).scheme in ("http", "https"):
                seen[host] += 1
    return seen.most_common(1)[0][0] if seen else None
