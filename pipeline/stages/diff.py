"""``winnow diff A B``: two subsets of one pool side by side, and who each one drops.

- sizes, overlap and the rows only in each (set arithmetic on the two ``uids.npy``);
- for the rows only in A, the rule of B's recipe that drops each (the first rule it fails, counted), and the
  other way round; a rule ranking among the rows kept so far (``top_fraction ... of: kept``) is named as such;
- the pool's rows by ledger state, and how many of each state are in A and in B;
- **who a filter drops**: the candidates (ok rows), the rows kept by A and by B and each one's kept share per
  group of caption language (fastText lid.176), host (the registered domain, by the last two labels, three
  under a two-letter country code's ``co``/``com``/``org``/``net``/``ac``/``gov``/``edu``), caption length in
  words, shorter image side, and any column named with ``--by``. Each breakdown sums to the totals.

Scores come from the score cache the subsets were made with; parts are read one at a time.
"""

from __future__ import annotations

import collections
import ipaddress
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest
from winnow.pipeline.data.ledger import OK, states_of
from winnow.pipeline.data.uid import UID_DTYPE, isin_uids, uids_to_array
from winnow.pipeline.stages.explain import Pool, _cache_of
from winnow.pipeline.stages.subset import (
    Recipe,
    Rows,
    apply,
    load_recipe,
    ranks_among_kept,
    top_fraction_threshold,
    top_fractions,
)

SECOND_LEVEL = {"co", "com", "org", "net", "ac", "gov", "edu"}
WORDS = [(0, "none"), (1, "1-2 words"), (3, "3-5 words"), (6, "6-10 words"), (11, "11-20 words"),
         (21, "21+ words")]
SIDES = [(0, "no size"), (1, "< 200 px"), (200, "200-399 px"), (400, "400-799 px"), (800, "800+ px")]


def registered_domain(url: str | None) -> str:
    host = (urlsplit(url or "").hostname or "").lower().rstrip(".")
    if not host:
        return "(no host)"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _bucket(value: float, edges: list[tuple[float, str]]) -> str:
    label = edges[0][1]
    for low, name in edges:
        if value >= low:
            label = name
    return label


def _subset(folder: str) -> tuple[dict, np.ndarray, Recipe | None]:
    path = fsio.join(folder, "subset.json")
    if not fsio.exists(path):
        raise UserError(f"diff: {folder} is not a subset folder (no subset.json); give two `winnow subset` outputs")
    info = fsio.read_json(path)
    uids = np.asarray(fsio.load_npy(fsio.join(folder, "uids.npy"), f"subset {folder}"), dtype=UID_DTYPE)
    params = (manifest.read_manifest(folder) or {}).get("params") or {}
    return info, uids, load_recipe(params["recipe"]) if params.get("recipe") else None


def diff(a: str, b: str, by: list[str] | None = None, cache: str = "", languages: bool = True) -> dict:
    """The comparison of subsets ``a`` and ``b`` (folders of ``winnow subset``), as tables."""
    info_a, uids_a, recipe_a = _subset(a)
    info_b, uids_b, recipe_b = _subset(b)
    if fsio.absolute(info_a["pool"]) != fsio.absolute(info_b["pool"]):
        raise UserError(f"diff: {a} was made from {info_a['pool']} and {b} from {info_b['pool']}; subsets of one "
                        "pool only (their uids would not be comparable)")
    pool = Pool(info_a["pool"], cache or _cache_of([a, b]))
    both = int(isin_uids(uids_a, uids_b).sum())
    summary = pd.DataFrame([{"subset": info_a["recipe"], "folder": a, "rows": len(uids_a), "only here":
                             len(uids_a) - both, "in both": both},
                            {"subset": info_b["recipe"], "folder": b, "rows": len(uids_b), "only here":
                             len(uids_b) - both, "in both": both}])
    thresholds = {k: _threshold(pool, info, k) for info, r in ((info_a, recipe_a), (info_b, recipe_b)) if r
                  for k in top_fractions(r)}
    states: collections.Counter = collections.Counter()
    in_a_states: collections.Counter = collections.Counter()
    in_b_states: collections.Counter = collections.Counter()
    groups: dict = collections.defaultdict(lambda: [0, 0, 0])
    rules = {"only in A, dropped by B's": collections.Counter(), "only in B, dropped by A's": collections.Counter()}
    examples: dict[str, list] = {"only in A": [], "only in B": []}
    for part in pool.parts:
        table = _read(part.parquet, by or [])
        uid = uids_to_array(table["uid"], sort=False)
        state = states_of(table).to_numpy()
        in_a, in_b = isin_uids(uid, uids_a), isin_uids(uid, uids_b)
        states.update(state)
        in_a_states.update(state[in_a])
        in_b_states.update(state[in_b])
        ok = state == OK
        for kind, labels in _labels(table, by or [], languages).items():
            for label, ka, kb in zip(labels[ok], in_a[ok], in_b[ok]):
                g = groups[kind, label]
                g[0] += 1
                g[1] += int(ka)
                g[2] += int(kb)
        for name, mine, other, recipe in (("only in A, dropped by B's", in_a, in_b, recipe_b),
                                          ("only in B, dropped by A's", in_b, in_a, recipe_a)):
            only = mine & ~other
            if only.any() and recipe is not None:
                rules[name].update(_first_failing(pool, part, table, uid, ok, recipe, thresholds, only))
            side = "only in A" if name.startswith("only in A") else "only in B"
            for i in np.flatnonzero(only)[: max(0, 8 - len(examples[side]))]:
                examples[side].append({"part": part.stem, "key": str(table["key"].iloc[i]) if "key" in table
                                       else None, "uid": str(table["uid"].iloc[i]),
                                       "caption": table["caption"].iloc[i] if "caption" in table else None})
    return {"a": info_a["recipe"], "b": info_b["recipe"], "pool": pool.pool, "summary": summary,
            "rules": {k: pd.DataFrame(sorted(v.items(), key=lambda kv: -kv[1]), columns=["rule", "rows"])
                      for k, v in rules.items()},
            "states": pd.DataFrame([{"state": s, "pool": n, "in A": in_a_states.get(s, 0), "in B":
                                     in_b_states.get(s, 0)} for s, n in sorted(states.items(), key=lambda kv: -kv[1])]),
            "groups": _group_table(groups), "examples": examples}


def _threshold(pool: Pool, info: dict, key: tuple) -> float:
    recorded = [s["threshold"] for s in info.get("steps", []) if "threshold" in s and key[0] in s["rule"]
                and f"top {key[1]:.0%}" in s["rule"]]
    return recorded[0] if recorded else top_fraction_threshold(pool.column(key[0]), key[1])


def _read(path: str, by: list[str]) -> pd.DataFrame:
    with fsio.open_read(path) as f:
        names = pq.read_schema(f).names
    wanted = ["uid", "key", "state", "status", "error_message", "caption", "text", "url", "width", "height",
              "original_width", "original_height", *by]
    missing = [c for c in by if c not in names]
    if missing:
        raise UserError(f"diff --by {missing[0]}: the pool's tables have no such column (columns: "
                        f"{', '.join(names)})")
    with fsio.open_read(path) as f:
        table = pq.read_table(f, columns=[c for c in dict.fromkeys(wanted) if c in names]).to_pandas()
    if "caption" not in table and "text" in table:
        table = table.rename(columns={"text": "caption"})
    return table


def _labels(table: pd.DataFrame, by: list[str], languages: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    captions = table["caption"] if "caption" in table else pd.Series([None] * len(table))
    if languages:
        from winnow.filters.english import languages as lid

        texts = [c if isinstance(c, str) else "" for c in captions]
        out["caption language"] = np.array([lang or "(none)" if t else "(no caption)"
                                            for lang, t in zip(lid(texts), texts)], dtype=object)
    if "url" in table:
        out["host"] = np.array([registered_domain(u) for u in table["url"]], dtype=object)
    words = np.array([len(c.split()) if isinstance(c, str) else 0 for c in captions])
    out["caption length"] = np.array([_bucket(w, WORDS) for w in words], dtype=object)
    w = table["original_width"] if "original_width" in table else table.get("width")
    h = table["original_height"] if "original_height" in table else table.get("height")
    if w is not None and h is not None:
        side = np.fmin(pd.to_numeric(w, errors="coerce").to_numpy(float), pd.to_numeric(h, errors="coerce")
                       .to_numpy(float))
        out["image size (shorter side)"] = np.array([_bucket(0 if np.isnan(s) else max(s, 1), SIDES)
                                                     for s in side], dtype=object)
    for column in by:
        out[column] = np.array(["(none)" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                                for v in table[column]], dtype=object)
    return out


def _first_failing(pool: Pool, part, table: pd.DataFrame, uid: np.ndarray, ok: np.ndarray, recipe: Recipe,
                   thresholds: dict, only: np.ndarray) -> collections.Counter:
    """For the rows ``only`` marks: the first rule of ``recipe`` each fails, counted."""
    if ranks_among_kept(recipe):
        return collections.Counter({"a top_fraction rule ranked among the rows kept so far": int(only.sum())})
    columns: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in columns:
            if name not in pool.folders:
                raise UserError(f"diff: no cached score {name!r}; make both subsets with the same --cache")
            columns[name] = np.asarray(np.load(fsio.join(pool.folders[name][0], f"{part.stem}.npy")), dtype=float)
        return columns[name]

    order = np.lexsort((uid["f1"], uid["f0"]))
    rows = Rows(uid[order], order, ok, get, dict(thresholds))
    left = only.copy()
    out: collections.Counter = collections.Counter()
    if (~ok & left).any():
        out["downloaded (state ok)"] += int((~ok & left).sum())
        left &= ok
    for rule in recipe.select:
        log: list[dict] = []
        keep = apply(Recipe(recipe.name, recipe.filters, [rule]), rows, log)
        dropped = left & ~keep
        if dropped.any():
            out[log[-1]["rule"]] += int(dropped.sum())
            left &= keep
    if left.any():
        out["(kept by the recipe now: the subset predates a change)"] += int(left.sum())
    return out


def share(k: int, n: int) -> str:
    """``k / n`` as a percentage with its 95% Wilson interval (a small group's share is uncertain)."""
    if not n:
        return "n/a"
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.1%} [{max(0.0, centre - half):.0%}, {min(1.0, centre + half):.0%}]"


def _group_table(groups: dict) -> pd.DataFrame:
    rows = []
    for (kind, label), (n, ka, kb) in groups.items():
        rows.append({"by": kind, "group": label, "candidates": n, "in A": ka, "A kept": ka / n if n else np.nan,
                     "in B": kb, "B kept": kb / n if n else np.nan})
    df = pd.DataFrame(rows, columns=["by", "group", "candidates", "in A", "A kept", "in B", "B kept"])
    return df.sort_values(["by", "candidates"], ascending=[True, False], kind="stable").reset_index(drop=True)


def format_text(d: dict, top: int = 8) -> str:
    lines = [f"diff of {d['a']} (A) and {d['b']} (B), pool {d['pool']}", "",
             d["summary"].drop(columns=["folder"]).to_string(index=False), ""]
    note = "kept shares with their 95% Wilson intervals"
    for name, table in d["rules"].items():
        if len(table):
            lines += [f"{name} rules:", table.to_string(index=False), ""]
    lines += ["pool rows by ledger state:", d["states"].to_string(index=False), ""]
    groups = d["groups"]
    for kind in dict.fromkeys(groups["by"]):
        part = groups[groups["by"] == kind].head(top).copy()
        part["A kept"] = [share(k, n) for k, n in zip(part["in A"], part["candidates"])]
        part["B kept"] = [share(k, n) for k, n in zip(part["in B"], part["candidates"])]
        more = (groups["by"] == kind).sum() - len(part)
        lines += [f"who is kept, by {kind}" + (f" (top {top} of {len(part) + more} groups)" if more else "") +
                  f" ({note}):",
                  part.drop(columns=["by"]).to_string(index=False), ""]
    return "\n".join(lines)
