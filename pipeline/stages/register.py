"""``winnow register``: adopt an existing img2dataset / DataComp pool without downloading it again.

The pool is accepted as it is: shards ``{id}.tar`` + ``{id}.parquet`` + ``{id}_stats.json`` numbered from 0
without gaps, a parquet with ``uid``, ``key`` and ``status`` columns, and tars that hold exactly the ``success``
rows. Each shard is checked by a task on the cluster; problems are reported per shard, all at once, and
registration writes ``_manifest.json`` only when the pool is valid.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from dataclasses import dataclass

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest, shards
from winnow.pipeline.data.ledger import OK, states_of
from winnow.pipeline.data.uid import normalize_uid

REQUIRED_COLUMNS = ("uid", "key", "status")


@dataclass(frozen=True)
class CheckTask:
    pool: str
    shard_id: int
    digits: int = 8


def check_shard(task: CheckTask) -> dict:
    """Validate one shard; return its counts and a list of problems (empty when valid)."""
    p = shards.paths(task.pool, task.shard_id, task.digits)
    name = shards.shard_name(task.shard_id, task.digits)
    problems: list[str] = []
    missing = [k for k in ("parquet", "stats") if not fsio.exists(p[k])]
    if missing:
        return {"shard": name, "rows": 0, "states": {}, "problems": [f"{name}: no {' or '.join(missing)} file"]}
    try:
        table = shards.read_table(task.pool, task.shard_id, digits=task.digits)
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is a layout problem to report
        return {"shard": name, "rows": 0, "states": {}, "problems": [f"{name}.parquet unreadable: {exc}"]}
    absent = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if absent:
        problems.append(f"{name}.parquet lacks column(s) {', '.join(absent)} (img2dataset: pass "
                        f"save_additional_columns=['uid'])")
        return {"shard": name, "rows": len(table), "states": {}, "problems": problems}
    bad = [u for u in table["uid"] if normalize_uid(u) is None]
    if bad:
        problems.append(f"{name}.parquet: {len(bad)} uid(s) are not 32-hex, e.g. {bad[0]!r}")
    stats = fsio.read_json(p["stats"])
    if stats.get("count", len(table)) != len(table):
        problems.append(f"{name}: _stats.json count {stats.get('count')} != {len(table)} parquet rows")
    states = states_of(table)
    ok_keys = set(table.loc[states == OK, "key"].astype(str))
    try:
        tar_keys = _tar_keys(p["tar"])
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{name}.tar unreadable ({exc}): truncated or not a tar")
        tar_keys = set()
    else:
        if tar_keys != ok_keys:
            problems.append(f"{name}.tar holds {len(tar_keys)} samples but the parquet has {len(ok_keys)} ok rows "
                            f"({len(tar_keys ^ ok_keys)} keys differ)")
    return {"shard": name, "rows": len(table), "states": dict(Counter(states)), "problems": problems}


def _tar_keys(tar_path: str) -> set[str]:
    """Keys of the samples that have an image member, reading tar headers only."""
    fs, path = fsio.get_fs(tar_path)
    keys = set()
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if ext in shards.IMAGE_EXTS:
                keys.add(key)
    return keys


def register(pool: str, runner, log=print) -> dict:
    """Validate an existing pool and write its manifest (no download)."""
    if not fsio.exists(pool):
        raise UserError(f"pool folder not found: {pool}")
    ids = shards.list_shards(pool, committed=False)
    if not ids:
        raise UserError(f"{pool} holds no shards ({{id}}.tar + .parquet + _stats.json); is this the right folder?")
    digits = shards.name_digits(pool)
    gaps = sorted(set(range(ids[-1] + 1)) - set(ids))
    if gaps:
        missing = ", ".join(shards.shard_name(g, digits) + ".tar" for g in gaps[:5])
        raise UserError(f"{pool}: shard numbering must start at 0 without gaps (DataComp's tools assume it); "
                        f"missing {missing}{' ...' if len(gaps) > 5 else ''}")
    results = runner.map(check_shard, [CheckTask(pool, i, digits) for i in ids], label="register")
    problems = [p for r in results for p in r["problems"]]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UserError(f"{pool} is not a valid pool: {problems[0]}{more}")
    states = Counter()
    for r in results:
        states.update(r["states"])
    rows = sum(r["rows"] for r in results)
    run = manifest.StageRun("register", pool, params={"shards": len(ids), "name_digits": digits})
    return run.finish(rows={"input": rows, "ok": states.get(OK, 0), "failed": rows - states.get(OK, 0),
                            **dict(states)}, shards=len(ids))
