"""``winnow explain``: one sample's whole history, from its input row to the shards that hold it.

For each uid (or ``--url``): the part and row of the pool that hold it and its input row, url and caption; its
ledger state and reason, with its download attempts (``winnow ingest --retry``); each score cached for the pool
(``winnow subset`` caches them outside the pool); for each subset given, whether it is in it and, if not, the
rule that dropped it, with the value and the bound (intersections are traced into their parts); its duplicate
group and the member kept, or the evaluation image it copies; and the resharded shard that holds it.

Only what is needed is read: the sorted uid arrays of the score cache (binary search in each part; without a
cache, the parts' uid columns), then one row of one parquet and one value of each cached score array.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest
from winnow.pipeline.data.ledger import OK, STATES
from winnow.pipeline.data.parts import Part, list_parts
from winnow.pipeline.data.uid import UID_DTYPE, normalize_uid, uids_to_array
from winnow.pipeline.select.score import cache_root, load_array
from winnow.pipeline.stages.subset import (
    Recipe,
    Rows,
    _subrecipes,
    apply,
    load_recipe,
    ranks_among_kept,
    top_fraction_threshold,
    top_fractions,
)


def _pack(uid: str) -> tuple[int, int]:
    a = uids_to_array([uid], sort=False)[0]
    return int(a["f0"]), int(a["f1"])


def _find(sorted_uid: np.ndarray, hi: int, lo: int) -> int:
    """Index of (hi, lo) in a sorted ``u8,u8`` array, or -1."""
    f0 = sorted_uid["f0"]
    a, b = np.searchsorted(f0, np.uint64(hi), "left"), np.searchsorted(f0, np.uint64(hi), "right")
    if a == b:
        return -1
    i = a + int(np.searchsorted(sorted_uid["f1"][a:b], np.uint64(lo), "left"))
    return i if i < b and int(sorted_uid["f1"][i]) == lo else -1


class Pool:
    """The pool's parts and, when ``winnow subset`` cached it, the sorted uids of each part."""

    def __init__(self, pool: str, cache: str = ""):
        self.pool, self.parts = pool, list_parts(pool)
        self.root = cache_root(pool, cache)
        rows = fsio.join(self.root, "rows")
        self.rows = rows if manifest.read_manifest(rows) else None
        self.folders = self._score_folders()

    def _score_folders(self) -> dict[str, tuple[str, dict]]:
        """column -> (cache folder, its filter spec), for every finished score folder of the pool's cache."""
        out = {}
        for name in sorted(fsio.listdir(self.root)) if fsio.exists(self.root) else []:
            doc = manifest.read_manifest(fsio.join(self.root, name)) if name != "rows" else None
            if doc and doc.get("stage") == "score":
                column = name.rsplit("-", 1)[0]
                out[column] = (fsio.join(self.root, name), {"key": doc["params"]["key"],
                                                           "params": doc["params"]["params"]})
        return out

    def locate(self, uid: str) -> tuple[Part, int] | None:
        hi, lo = _pack(uid)
        for part in self.parts:
            if self.rows:
                stem = fsio.join(self.rows, part.stem)
                sorted_uid = np.load(f"{stem}.uid.npy", mmap_mode="r") if fsio.is_local(stem) else \
                    load_array(f"{stem}.uid.npy")
                i = _find(sorted_uid, hi, lo)
                if i >= 0:
                    order = np.load(f"{stem}.order.npy", mmap_mode="r") if fsio.is_local(stem) else \
                        load_array(f"{stem}.order.npy")
                    return part, int(order[i])
            else:
                with fsio.open_read(part.parquet) as f:
                    uids = pq.read_table(f, columns=["uid"])["uid"].to_pylist()
                for row, u in enumerate(uids):
                    if normalize_uid(u) == uid:
                        return part, row
        return None

    def locate_url(self, url: str) -> list[str]:
        uids = []
        for part in self.parts:
            with fsio.open_read(part.parquet) as f:
                table = pq.read_table(f, columns=["uid", "url"], filters=[("url", "==", url)])
            uids += [normalize_uid(u) for u in table["uid"].to_pylist()]
        return [u for u in uids if u]

    def row(self, part: Part, row: int) -> dict:
        with fsio.open_read(part.parquet) as f:
            reader = pq.ParquetFile(f)
            start = 0
            for g in range(reader.num_row_groups):
                n = reader.metadata.row_group(g).num_rows
                if row < start + n:
                    table = reader.read_row_group(g)
                    return {k: _plain(v) for k, v in table.slice(row - start, 1).to_pylist()[0].items()}
                start += n
        raise UserError(f"row {row} is outside {part.parquet}")

    def scores(self, part: Part, row: int) -> dict[str, float]:
        out = {}
        for column, (folder, _) in self.folders.items():
            path = fsio.join(folder, f"{part.stem}.npy")
            if fsio.exists(path):
                values = np.load(path, mmap_mode="r") if fsio.is_local(path) else load_array(path)
                out[column] = float(values[row])
        return out

    def column(self, column: str) -> np.ndarray:
        """A cached score column over the pool's candidate rows (for a top-fraction threshold)."""
        folder = self.folders[column][0]
        return np.concatenate([np.asarray(load_array(fsio.join(folder, f"{p.stem}.npy")))[
            load_array(fsio.join(self.rows, f"{p.stem}.ok.npy"))] for p in self.parts])


def _plain(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


def explain(pool: str, uids: list[str] | None = None, subsets: list[str] | None = None, url: str = "",
            shards: list[str] | None = None, cache: str = "") -> list[dict]:
    """The history of each uid (and of each row with ``url``), as plain data (``--json`` prints it)."""
    found = Pool(pool, cache or _cache_of(subsets))
    wanted = [_uid(u) for u in uids or []] + (found.locate_url(url) if url else [])
    if not wanted:
        raise UserError("explain: give a uid (32 hex digits) or --url URL" if not url else
                        f"explain: no row of {pool} has the url {url[:200]}")
    thresholds: dict = {}
    return [_one(found, uid, subsets or [], shards or [], thresholds) for uid in wanted]


def _cache_of(subsets: list[str] | None) -> str:
    """The cache a subset was scored with (its score folders' root's grandparent), so --subset finds it."""
    for folder in subsets or []:
        path = fsio.join(folder, "subset.json")
        if fsio.exists(path):
            scores = fsio.read_json(path).get("scores") or {}
            for where in scores.values():
                return os.path.dirname(os.path.dirname(os.path.dirname(where)))
    return ""


def _uid(text: str) -> str:
    uid = normalize_uid(text)
    if uid is None:
        raise UserError(f"explain: {text[:60]!r} is not a uid (1-32 hex digits)")
    return uid


def _one(pool: Pool, uid: str, subsets: list[str], shards: list[str], thresholds: dict) -> dict:
    where = pool.locate(uid)
    if where is None:
        return {"uid": uid, "found": False, "pool": pool.pool}
    part, row = where
    record = pool.row(part, row)
    state = record.get("state") or (OK if record.get("status") == "success" else "error")
    doc = {"uid": uid, "found": True, "pool": pool.pool, "part": part.stem, "row": row,
           "input_row": record.get("input_row"), "url": record.get("url"),
           "caption": record.get("caption", record.get("text")), "state": state,
           "reason": _reason(record.get("error_message"), state),
           "attempts": {k: record[k] for k in ("attempts", "first_attempt", "last_attempt", "previous_states")
                        if record.get(k) is not None},
           "scores": pool.scores(part, row), "subsets": [], "dedup": [], "shards": []}
    for folder in subsets:
        doc["subsets"].append(_in_subset(pool, folder, uid, doc, thresholds))
    doc["dedup"] = _dedup(pool.pool, uid)
    for folder in shards:
        doc["shards"].append(_in_shards(folder, uid))
    return doc


def _reason(message: str | None, state: str) -> str:
    """The row's error message without its leading state code (the state is shown beside it)."""
    if not message:
        return STATES.get(state, "")
    return message.split(": ", 1)[1] if message.startswith(f"{state}: ") else message


def _in_subset(pool: Pool, folder: str, uid: str, doc: dict, thresholds: dict) -> dict:
    path = fsio.join(folder, "subset.json")
    if not fsio.exists(path):
        raise UserError(f"explain --subset {folder}: no subset.json there (the output folder of winnow subset)")
    info = fsio.read_json(path)
    members = fsio.load_npy(fsio.join(folder, "uids.npy"), f"subset {folder}")
    hi, lo = _pack(uid)
    kept = _find(np.asarray(members, dtype=UID_DTYPE), hi, lo) >= 0
    out = {"subset": folder, "recipe": info.get("recipe"), "kept": kept, "rules": []}
    params = (manifest.read_manifest(folder) or {}).get("params") or {}
    recipe = load_recipe(params["recipe"]) if params.get("recipe") else None
    if recipe is not None and not kept:
        out["rules"] = _trace(pool, recipe, doc, thresholds, info)
    return out


def _trace(pool: Pool, recipe: Recipe, doc: dict, thresholds: dict, info: dict) -> list[dict]:
    """Each rule of ``recipe`` on this one row, in order, until the one that drops it (and inside it)."""
    if ranks_among_kept(recipe):
        return [{"rule": "a top_fraction rule ranks among the rows kept so far: not traced row by row"}]
    for key in top_fractions(recipe):
        if key not in thresholds:
            recorded = [s["threshold"] for s in info.get("steps", []) if "threshold" in s and key[0] in s["rule"]
                        and f"top {key[1]:.0%}" in s["rule"]]
            thresholds[key] = recorded[0] if recorded else top_fraction_threshold(pool.column(key[0]), key[1])
    scores = doc["scores"]

    def get(name: str) -> np.ndarray:
        return np.array([scores.get(name, np.nan)], dtype=float)

    one = uids_to_array([doc["uid"]], sort=False)
    rows = Rows(one, np.array([0]), np.array([doc["state"] == OK]), get, dict(thresholds))
    log: list[dict] = []
    apply(recipe, rows, log)
    out = []
    for step, rule in zip(log, [None, *recipe.select]):
        entry = {"rule": step["rule"], "passed": bool(step["kept"])}
        if rule is not None:
            kind, arg = next(iter(rule.items()))
            if kind in ("threshold", "top_fraction"):
                entry["value"] = scores.get(arg["column"])
                entry["bound"] = {k: arg[k] for k in ("min", "max") if k in arg} or {"min": step.get("threshold")}
            if not step["kept"]:
                entry["inside"] = [{"recipe": sub.name, "rules": _trace(pool, sub, doc, thresholds, {})}
                                   for sub in _subrecipes(rule)]
        out.append(entry)
        if not step["kept"]:
            break
    return out


def _dedup(pool: str, uid: str) -> list[dict]:
    """The rows of every dedup table of the pool that name ``uid``, with the member its group kept."""
    out = []
    base = fsio.join(pool, "dedup")
    for tag in sorted(fsio.listdir(base)) if fsio.exists(base) else []:
        path = fsio.join(base, tag, "duplicates.parquet")
        if not fsio.exists(path):
            continue
        with fsio.open_read(path) as f:
            table = pq.read_table(f, filters=[("uid", "==", uid)]).to_pandas()
        for r in table.itertuples(index=False):
            entry = {"table": path, "kind": r.kind, "group": r.group, "kept": bool(r.kept),
                     "similarity": float(r.similarity)}
            if not r.kept and r.kind != "contaminated":
                with fsio.open_read(path) as f:
                    group = pq.read_table(f, filters=[("group", "==", r.group), ("kind", "==", r.kind)]).to_pandas()
                keeper = group[group["kept"]]["uid"]
                entry["kept_member"] = str(keeper.iloc[0]) if len(keeper) else None
            out.append(entry)
    return out


def _in_shards(folder: str, uid: str) -> dict:
    """Which output shard of a reshard holds ``uid`` (``<uid>-<k>`` members), by the tars' headers."""
    import tarfile

    ids = fsio.join(folder, "sample_ids.npy")
    if not fsio.exists(ids):
        raise UserError(f"explain --shards {folder}: no sample_ids.npy there (the output folder of winnow reshard)")
    hi, lo = _pack(uid)
    if _find(np.sort(fsio.load_npy(ids, "sample ids"), order=["f0", "f1"]), hi, lo) < 0:
        return {"shards": folder, "holds": []}
    holds = []
    for name in sorted(n for n in fsio.listdir(folder) if n.endswith(".tar")):
        with fsio.open_read(fsio.join(folder, name)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            keys = {m.name.split(".")[0] for m in tar if m.name.startswith(uid)}
        holds += [f"{name}:{k}" for k in sorted(keys)]
    return {"shards": folder, "holds": holds}


def format_text(docs: list[dict]) -> str:
    """What ``winnow explain`` prints."""
    lines = []
    for d in docs:
        if not d["found"]:
            lines += [f"{d['uid']}: not in {d['pool']}", ""]
            continue
        where = f"part {d['part']} row {d['row']:,}" + (f" (input row {d['input_row']:,})" if d.get("input_row")
                                                         is not None else "")
        lines.append(f"{d['uid']}: {where} of {d['pool']}")
        lines.append(f"  url      {d['url']}")
        lines.append(f"  caption  {json.dumps(d['caption'], ensure_ascii=False)[:200]}")
        lines.append(f"  state    {d['state']}" + (f": {d['reason']}" if d['state'] != OK else ""))
        if d["attempts"]:
            a = d["attempts"]
            lines.append(f"  attempts {a.get('attempts')}, first {a.get('first_attempt')}, last "
                         f"{a.get('last_attempt')}" + (f"; before: {a['previous_states']}" if a.get(
                             'previous_states') else ""))
        for column, value in d["scores"].items():
            lines.append(f"  score    {column} = {value:.6g}")
        for s in d["subsets"]:
            if s["kept"]:
                lines.append(f"  subset   {s['recipe']} ({s['subset']}): kept")
                continue
            lines.append(f"  subset   {s['recipe']} ({s['subset']}): dropped")
            lines += _rule_lines(s["rules"], "    ")
        for e in d["dedup"]:
            if e["kind"] == "contaminated":
                lines.append(f"  dedup    copy of evaluation image {e['group']} (similarity {e['similarity']:.4f})")
            else:
                keeper = "this one" if e["kept"] else e.get("kept_member")
                lines.append(f"  dedup    {e['kind']} group {e['group']} (similarity {e['similarity']:.4f}); kept: "
                             f"{keeper}")
        for s in d["shards"]:
            lines.append(f"  shards   {s['shards']}: " + (", ".join(s["holds"]) or "not there"))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _rule_lines(rules: list[dict], indent: str) -> list[str]:
    out = []
    for r in rules:
        mark = "passes" if r.get("passed", True) else "DROPS it"
        bound = ", ".join(f"{'>=' if k == 'min' else '<='} {float(v):.6g}" for k, v in (r.get("bound") or {}).items()
                          if v is not None)
        value = f" (value {r['value']:.6g}; needs {bound})" if r.get("value") is not None else \
            (" (no score)" if "value" in r else "")
        out.append(f"{indent}{r['rule']}: {mark}{value}")
        for inner in r.get("inside", []):
            out.append(f"{indent}  inside {inner['recipe']}:")
            out += _rule_lines(inner["rules"], indent + "    ")
    return out


def as_json(docs: list[dict]) -> str:
    return json.dumps(docs, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))


