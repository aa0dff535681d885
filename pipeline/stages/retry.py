"""``winnow ingest --retry STATES``: fetch again, into the same pool, only the rows whose state is in STATES.

``transient`` (the default) stands for the failures that may pass: ``timeout``, ``connection_error``, ``stalled``,
``download_killed``, and ``http_error`` rows whose status was 429 or 5xx (``http_5xx`` names those alone). Other
states are named as they are (``http_error`` retries every HTTP error).

The rows are fetched with the settings the pool was downloaded with (its manifest's), by the same download
process. A shard with rows to retry is rewritten whole but atomically, file by file: its tar keeps every member
it had byte for byte and gains the samples that now succeeded (in key order); its parquet keeps every other row
as it was and records, for each retried row, the new outcome and its history: ``attempts``, ``first_attempt``,
``last_attempt`` and ``previous_states``. A recovered row becomes ``ok`` with the same uid and key. Shards
without such rows are not touched. The pool's manifest is rewritten last (its counts, files and a ``retries``
record), so every stage that used the pool sees another input and is redone by its next run, and only those.
"""

from __future__ import annotations

import collections
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest, shards
from winnow.pipeline.data.ledger import OK, STATES, classify, states_of
from winnow.pipeline.data.pool import ledger
from winnow.pipeline.run.runner import task_progress
from winnow.pipeline.stages.ingest import IngestConfig, ShardTask, _complete, _download, _work_dir

TRANSIENT = ("timeout", "connection_error", "stalled", "download_killed", "http_5xx")
HISTORY = ("attempts", "first_attempt", "last_attempt", "previous_states")
_STATUS = re.compile(r"HTTP Error (\d{3})")


def expand(states: list[str] | None) -> tuple[str, ...]:
    """The states to retry: ``transient`` expanded, every name checked."""
    out: list[str] = []
    for name in states or ["transient"]:
        for part in str(name).split(","):
            part = part.strip()
            if part == "transient":
                out += TRANSIENT
            elif part == OK:
                raise UserError("--retry ok: rows that downloaded are not fetched again; name failure states")
            elif part in STATES or part == "http_5xx":
                out.append(part)
            elif part:
                raise UserError(f"--retry {part!r} is not a state; use transient, http_5xx or one of "
                                f"{', '.join(s for s in STATES if s != OK)}")
    return tuple(dict.fromkeys(out))


def wanted(table: pd.DataFrame, states: tuple[str, ...]) -> np.ndarray:
    """Which rows of a shard table the retry fetches again."""
    state = states_of(table).to_numpy()
    mask = np.isin(state, [s for s in states if s != "http_5xx"])
    if "http_5xx" in states and "http_error" not in states:
        codes = [int(m.group(1)) if isinstance(e, str) and (m := _STATUS.search(e)) else 0
                 for e in table.get("error_message", pd.Series([None] * len(table)))]
        mask |= (state == "http_error") & np.isin(codes, [429, *range(500, 600)])
    return mask


@dataclass(frozen=True)
class RetryTask:
    pool: str
    shard_id: int
    config: dict
    states: tuple
    first: str  # when the pool's ingest started: the first attempt of rows never retried before


def retry_shard(task: RetryTask) -> dict:
    """Fetch the shard's wanted rows again and rewrite its tar and parquet; returns the counts."""
    cfg = IngestConfig(**task.config)
    table = shards.read_table(task.pool, task.shard_id)
    again = wanted(table, task.states)
    if not again.any():
        return {"retried": 0, "recovered": 0}
    columns = [c for c in dict.fromkeys(["uid", "caption", "url", "input_row", "caption_pii", *cfg.extra_columns,
                                         *([cfg.blur_bbox_col] if cfg.blur_bbox_col else [])]) if c in table]
    rows = table[columns].reset_index(drop=True)
    skip = {int(i): "skipped: not retried" for i in np.flatnonzero(~again)}
    sites, faces = collections.Counter(), collections.Counter()
    marker = ShardTask(task.pool, task.shard_id, task.config)
    while True:
        work = _work_dir(task.pool, task.shard_id)
        try:
            if _download(marker, cfg, rows, skip, columns, work, sites, faces):
                return _merge(task, table, again, work, skip)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _merge(task: RetryTask, table: pd.DataFrame, again: np.ndarray, work: str, skip: dict) -> dict:
    name = shards.shard_name(task.shard_id)
    fresh = _complete(pd.read_parquet(fsio.join(work, f"{name}.parquet")), table, task.shard_id,
                      task.config["shard_size"])
    for i, message in skip.items():  # rows whose download process died or stalled on this attempt
        if again[i]:
            fresh.at[i, "status"], fresh.at[i, "error_message"] = "failed_to_download", message
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    merged = table.copy()
    for column in HISTORY:
        if column not in merged:
            merged[column] = (1 if column == "attempts" else task.first if column == "first_attempt" else
                              task.first if column == "last_attempt" else None)
    merged["attempts"] = merged["attempts"].astype("int64")
    previous = states_of(table)
    for column in [c for c in fresh.columns if c in merged.columns and c not in ("uid", "key", "url", "caption")]:
        merged[column] = merged[column].astype(object)
        merged.loc[again, column] = fresh.loc[again, column].astype(object).to_numpy()
    merged.loc[again, "state"] = [classify(s, e) for s, e in zip(merged.loc[again, "status"],
                                                                  merged.loc[again, "error_message"])]
    merged.loc[again, "attempts"] += 1
    merged.loc[again, "last_attempt"] = now
    merged.loc[again, "previous_states"] = [",".join(filter(None, [p, s])) for p, s in
                                            zip(merged.loc[again, "previous_states"].fillna(""), previous[again])]
    recovered = int((merged.loc[again, "state"] == OK).sum())
    target = shards.paths(task.pool, task.shard_id)
    if recovered:
        _merge_tar(target["tar"], fsio.join(work, f"{name}.tar"))
    shards.write_table(target["parquet"], _typed(merged))
    stats = shards.shard_stats(merged, time.time(), time.time())
    old = fsio.read_json(target["stats"]) if fsio.exists(target["stats"]) else {}
    fsio.write_json(target["stats"], old | {k: v for k, v in stats.items() if k not in ("duration", "start_time",
                                                                                        "end_time")})
    task_progress(len(table), len(table))
    return {"retried": int(again.sum()), "recovered": recovered}


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Columns made object by the merge back to numbers where they hold numbers (Arrow needs one type)."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object:
            values = out[column].dropna()
            if len(values) and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                                   for v in values):
                out[column] = pd.to_numeric(out[column])
    return out


def _merge_tar(target: str, extra: str) -> None:
    """The shard's tar with the samples of ``extra`` added, in key order; the members it had are copied byte for
    byte (a sample of ``extra`` replaces one with its key)."""
    groups: dict[str, list] = {}
    for path in (target, extra):
        for sample in shards.iter_tar(path) if fsio.exists(path) else []:
            key = sample["__key__"]
            groups[key] = [(k, v) for k, v in sample.items() if not k.startswith("__")]
    with shards.TarWriter(target) as tar:
        for key in sorted(groups):
            tar.sample(key, dict(sorted(groups[key])))


def retry(pool: str, states: list[str] | None, runner, log=print) -> dict:
    """Fetch again the rows of ``pool`` in ``states``; rewrite the pool's manifest; return it."""
    doc = manifest.read_manifest(pool)
    if not doc or doc.get("stage") != "ingest":
        raise UserError(f"--retry needs a pool that winnow ingest finished; {pool} has no ingest manifest (an "
                        "unfinished ingest resumes with the same command, without --retry)")
    wanted_states = expand(states)
    known = {f.name for f in fields(IngestConfig)}
    cfg = IngestConfig(**{k: v for k, v in doc["params"].items() if k in known})
    ids = shards.list_shards(pool)
    todo = [i for i in ids if wanted(shards.read_table(pool, i, columns=["state", "status", "error_message"]),
                                     wanted_states).any()]
    log(f"retry: {len(todo)} of {len(ids)} shards hold rows in {', '.join(wanted_states)}")
    manifest.lock(pool, "ingest")
    try:
        tasks = [RetryTask(pool, i, asdict(cfg), wanted_states, doc.get("started") or "") for i in todo]
        stats = runner.map(retry_shard, tasks, label="retry", unit="shards") if tasks else []
        counts, total = ledger(pool)
        retried, recovered = sum(s["retried"] for s in stats), sum(s["recovered"] for s in stats)
        ok = counts.get(OK, 0)
        doc = doc | {"rows": {"input": total, "ok": ok, "failed": total - ok, **counts},
                     "outputs": [{"path": o["path"], "size": fsio.size(fsio.join(pool, o["path"]))}
                                 for o in doc.get("outputs", []) if fsio.exists(fsio.join(pool, o["path"]))],
                     "retries": [*doc.get("retries", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                           "states": list(wanted_states), "retried": retried,
                                                           "recovered": recovered}]}
        fsio.write_json(fsio.join(pool, manifest.MANIFEST), doc)
    finally:
        manifest.unlock(pool)
    log(f"retry: {retried:,} rows fetched again, {recovered:,} now ok; the pool has {ok:,} ok of {total:,}")
    return doc
