"""Declarative selection: a recipe (YAML) names filters and rules; the result is a DataComp subset file.

Recipe::

    name: clip_l14_30pct
    filters: [{key: clip, params: {tag: l14}}]
    select:
      - top_fraction: {column: clip_l14_score, fraction: 0.3}

Rules apply in order, each narrowing the set (the manifest records the count after each):

- ``threshold: {column, min, max}``: keep ``min <= score <= max`` (either bound optional); NaN scores fail.
- ``top_fraction: {column, fraction}``: DataComp's ``--fraction``: over the **whole pool** (every row with a
  score, not the rows left by earlier rules), ``n = int(len * fraction)``, ``T`` = the (n+1)-th largest score,
  keep ``score >= T`` (ties at T are kept). ``of: kept`` ranks among the rows the rules before it (in this
  recipe) keep instead, over the whole pool: ``n = int(kept * fraction)`` of them, the same rule otherwise, so
  ``top_fraction 0.3 of clip`` then ``top_fraction 0.667 of: kept`` by another score keeps 20% of the pool
  (Wang et al. 2024's negCLIPLoss then NormSim).
- ``exclude_uids: PATH``: drop the uids of a ``.npy`` subset file (``u8,u8``) or a parquet with a ``uid`` column.
- ``exclude_duplicates: {table, kinds, eps}``: drop the samples that ``winnow dedup`` marks as not kept in a
  duplicate group of one of ``kinds`` (``exact_image``, ``exact_pair``, ``near``, ``semantic``,
  ``contaminated``); ``table`` is its ``duplicates.parquet``; ``eps`` picks the SemDeDup eps (default: the
  first one computed).
- ``intersect: [RECIPE, ...]`` / ``union: [RECIPE, ...]``: combine other recipes, given by name (a file in
  ``manifests/subsets/``), path, or inline mapping with their own ``filters`` and ``select``.

The starting set is every row whose ledger state is ``ok`` (for DataComp metadata: every row).
Recipes may use ``${name}`` placeholders (``${name:-default}`` with a default), filled from ``--var name=value``
(and ``${pool}``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from winnow import manifests
from winnow.filters import plain, spec_of
from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import parse_yaml, substitute
from winnow.pipeline.core.errors import RunFailed, UserError, did_you_mean
from winnow.pipeline.data import manifest
from winnow.pipeline.data.ledger import OK
from winnow.pipeline.data.parts import Part
from winnow.pipeline.data.pool import require_finished
from winnow.pipeline.data.uid import UID_DTYPE, isin_uids, sort_halves, sort_uids, uids_to_array
from winnow.pipeline.run.stage import Stage
from winnow.pipeline.select.score import score

RULES = ("threshold", "top_fraction", "exclude_uids", "exclude_duplicates", "intersect", "union")


def recipes_dir() -> Path:

    return Path(manifests.__file__).parent / "subsets"


@dataclass
class Recipe:
    name: str
    filters: list[dict] = field(default_factory=list)
    select: list[dict] = field(default_factory=list)
    description: str = ""

    def to_dict(self) -> dict:
        """Plain data (sub-recipes of intersect/union included), as recorded in the subset's manifest."""
        select = [{k: [r.to_dict() for r in v] if k in ("intersect", "union") else v for k, v in rule.items()}
                  for rule in self.select]
        return {"name": self.name, "filters": [plain(f) for f in self.filters], "select": select}

    def files(self) -> list[str]:
        """The files the rules read (uid lists, duplicate tables), this recipe's and its sub-recipes'."""
        out = []
        for rule in self.select:
            kind, arg = next(iter(rule.items()))
            if kind == "exclude_uids":
                out.append(str(arg))
            elif kind == "exclude_duplicates":
                out.append(str(arg["table"]))
            for sub in _subrecipes(rule):
                out += sub.files()
        return out

    def all_filters(self) -> list[dict]:
        """Filters of this recipe and of every recipe it combines (deduplicated, in order)."""
        out: list[dict] = []
        for spec in self.filters + [s for rule in self.select for sub in _subrecipes(rule) for s in sub.all_filters()]:
            if spec not in out:
                out.append(spec)
        return out


def load_recipe(ref: str | dict | Recipe, variables: dict[str, str] | None = None, used: set | None = None) -> Recipe:
    """A recipe from a name in manifests/subsets, a YAML path, an inline mapping, or a Recipe (the variable names
    it and its sub-recipes use are added to ``used``)."""
    if isinstance(ref, Recipe):
        return ref
    if isinstance(ref, dict):
        doc = ref
    else:
        path = Path(ref)
        if not path.suffix:
            path = recipes_dir() / f"{ref}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
            hint = did_you_mean(ref, names) or f"give a YAML path or one of: {', '.join(names)}"
            raise UserError(f"recipe {ref!r} not found; {hint.strip()}")
        doc = parse_yaml(substitute(path.read_text(), variables or {}, path.name, used), f"recipe {path}") or {}
        if not isinstance(doc, dict):
            raise UserError(f"recipe {path} must hold a mapping (name, filters, select)")
        doc.setdefault("name", path.stem)
    unknown = set(doc) - {"name", "filters", "select", "description", "pool"}
    if unknown:
        raise UserError(f"recipe {doc.get('name', ref)!r}: unknown key {sorted(unknown)[0]!r}; "
                        "use name, description, filters, select")
    name = str(doc.get("name", "inline"))
    return Recipe(name=name, filters=[spec_of(f) for f in doc.get("filters") or []],
                  select=[_check_rule(rule, name, variables, used) for rule in doc.get("select") or []],
                  description=str(doc.get("description", "")))


def check_variables(ref: str | dict, given: dict[str, str]) -> None:
    """Refuse a ``--var`` that the recipe (and its sub-recipes) does not use, naming the ones it takes."""
    used: set = set()
    recipe = load_recipe(ref, {"pool": "", **given}, used)
    unknown = sorted(set(given) - used)
    if unknown:
        takes = ", ".join(sorted(used - {"pool"})) or "none"
        raise UserError(f"recipe {recipe.name!r} has no variable {unknown[0]!r}; its variables: {takes}")


def _number(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number; got {value!r}") from None


def _check_rule(rule: dict, name: str, variables, used: set | None = None) -> dict:
    """A validated copy of one rule (sub-recipes of intersect/union loaded as Recipe objects)."""
    if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in RULES:
        raise UserError(f"recipe {name!r}: each select rule is one of {', '.join(RULES)}; got {rule!r}")
    kind, arg = next(iter(rule.items()))
    if kind in ("intersect", "union"):
        if not isinstance(arg, list) or not arg:
            raise UserError(f"recipe {name!r}: {kind} takes a non-empty list of recipes")
        return {kind: [load_recipe(r, variables, used) for r in arg]}
    elif kind == "threshold" and (not isinstance(arg, dict) or "column" not in arg or
                                  not ({"min", "max"} & set(arg)) or set(arg) - {"column", "min", "max"}):
        raise UserError(f"recipe {name!r}: threshold takes column and min and/or max; got {arg!r}")
    elif kind == "threshold":
        for bound in {"min", "max"} & set(arg):
            _number(arg[bound], f"recipe {name!r}: threshold {bound}")
    elif kind == "top_fraction" and (not isinstance(arg, dict) or not {"column", "fraction"} <= set(arg) or
                                     set(arg) - {"column", "fraction", "of"} or arg.get("of", "pool") not in
                                     ("pool", "kept") or
                                     not 0 < _number(arg["fraction"], f"recipe {name!r}: fraction") <= 1):
        raise UserError(f"recipe {name!r}: top_fraction takes column, a fraction in (0, 1] and optionally of: pool "
                        f"(default) or of: kept; got {arg!r}")
    elif kind == "exclude_duplicates" and (not isinstance(arg, dict) or not {"table", "kinds"} <= set(arg) or
                                           set(arg) - {"table", "kinds", "eps"} or not isinstance(arg["kinds"], list)):
        raise UserError(f"recipe {name!r}: exclude_duplicates takes table, kinds (a list) and optional eps; "
                        f"got {arg!r}")
    return dict(rule)


def _subrecipes(rule: dict) -> list[Recipe]:
    kind, arg = next(iter(rule.items()))
    return arg if kind in ("intersect", "union") else []


def top_fraction_threshold(scores: np.ndarray, fraction: float, in_place: bool = False) -> float:
    """DataComp's rule (``get_threshold`` in its baselines): n = int(len * fraction), counting the rows without a
    score (NaN); T = the (n+1)-th largest score with NaNs sorted last, so ties at T are kept and a NaN T keeps
    nothing, as there. Where DataComp fails (n >= len, fraction 1.0) T is the smallest score: all are kept.
    Computed by a partition, O(len), not a sort (``in_place``: the caller's array may be reordered)."""
    if not len(scores) or not np.isfinite(scores).any():
        return float("inf")
    n = int(len(scores) * fraction)
    if n >= len(scores):
        return float(np.nanmin(scores))
    valid = len(scores) - int(np.isnan(scores).sum())  # -np.sort(-x) puts the NaNs last: position n is NaN
    if n >= valid:
        return float("nan")
    values = scores if in_place else scores.copy()
    values.partition(valid - 1 - n)  # ascending, NaNs last: the (n+1)-th largest number
    return float(values[valid - 1 - n])


def top_fraction_threshold_of(chunks: list[np.ndarray], fraction: float) -> float:
    """:func:`top_fraction_threshold` of the concatenation of ``chunks``, without concatenating or partitioning all
    of it: a strided sample brackets the threshold's rank, the rows below the bracket are counted and only the
    rows inside it are partitioned (a few percent of them). Exact: below 100,000 rows, in DataComp's edge cases
    (all or none kept) and when the bracket misses the rank, the whole array is used."""
    total = sum(len(c) for c in chunks)
    n = int(total * fraction)
    nans = sum(int(np.count_nonzero(np.isnan(c))) for c in chunks)
    valid = total - nans
    if total < 100_000 or n >= total or n >= valid:
        return top_fraction_threshold(np.concatenate(chunks) if chunks else np.zeros(0), fraction, in_place=True)
    rank = valid - 1 - n  # ascending among the numbers
    step = max(1, total // 200_000)
    sample = np.concatenate([c[::step] for c in chunks])
    sample = np.sort(sample[~np.isnan(sample)])
    q = rank / valid
    margin = 6 / np.sqrt(max(1, len(sample))) + 2 / max(1, len(sample))
    lo = sample[max(0, int((q - margin) * len(sample)))]
    hi = sample[min(len(sample) - 1, int(np.ceil((q + margin) * len(sample))))]
    below = sum(int(np.count_nonzero(c < lo)) for c in chunks)
    band = np.concatenate([c[(c >= lo) & (c <= hi)] for c in chunks])
    if below <= rank < below + len(band):
        band.partition(rank - below)
        return float(band[rank - below])
    return top_fraction_threshold(np.concatenate(chunks), fraction, in_place=True)


def read_uid_list(path: str) -> np.ndarray:
    """A uid list as a sorted ``u8,u8`` array: a ``.npy`` subset file or a parquet with a ``uid`` column."""
    if path.endswith(".npy"):
        arr = fsio.load_npy(path, f"exclude_uids {path}")
        if arr.dtype != UID_DTYPE:
            raise UserError(f"exclude_uids {path}: a uid array has dtype {UID_DTYPE} (DataComp's), not {arr.dtype}")
        return arr
    if path.endswith(".parquet"):

        with fsio.open_read(path) as f:
            return uids_to_array(pq.read_table(f, columns=["uid"])["uid"])
    raise UserError(f"exclude_uids {path!r}: give a .npy subset file or a parquet with a uid column")


@dataclass
class Rows:
    """The rows a recipe is applied to (one part of the pool, or a whole small pool): the uids sorted
    (``sorted_uid``, ``u8,u8``) with the row of each (``order``), which rows are candidates (``ok``), and a score
    column by name (``get``). ``thresholds`` holds the whole pool's top-fraction thresholds, ``{(column,
    fraction): T}``; rules missing from it are computed over these rows (then they are the pool)."""

    sorted_uid: np.ndarray
    order: np.ndarray
    ok: np.ndarray
    get: Callable[[str], np.ndarray]
    thresholds: dict = field(default_factory=dict)
    lists: dict = field(default_factory=dict)  # exclusion lists by rule, loaded once per subset
    pending: dict | None = None  # set on a pass that collects the values an ``of: kept`` threshold ranks

    @property
    def uid(self) -> np.ndarray:
        """The uids in row order (for the exclusion rules)."""
        out = np.empty_like(self.sorted_uid)
        out[self.order] = self.sorted_uid
        return out

    def kept(self, mask: np.ndarray) -> np.ndarray:
        """The sorted uids of the rows ``mask`` keeps."""
        return self.sorted_uid[mask[self.order]]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Rows:
        """Rows of a frame with uid, state and score columns (for small pools and tests)."""
        columns = {c: frame[c].to_numpy(dtype=float) for c in frame.columns if c not in ("uid", "state")}

        def get(name: str) -> np.ndarray:
            if name not in columns:
                raise UserError(f"no score column {name!r}; the recipe's filters produce: {', '.join(columns)}")
            return columns[name]

        uids = uids_to_array(frame["uid"].to_numpy(), sort=False)
        order = np.lexsort((uids["f1"], uids["f0"]))
        return cls(uids[order], order, (frame["state"] == OK).to_numpy(dtype=bool, na_value=False), get)


class Pending(Exception):
    """A pass over the pool stopped at an ``of: kept`` rule whose threshold is not known yet."""


def _among_key(recipe: Recipe, index: int, arg: dict) -> tuple:
    """The thresholds key of the ``of: kept`` rule at ``index`` of ``recipe`` (it depends on the rules before it)."""
    before = json.dumps(recipe.to_dict()["select"][:index], sort_keys=True, default=str)
    return (arg["column"], float(arg["fraction"]), "kept", hashlib.sha256(before.encode()).hexdigest()[:16])


def ranks_among_kept(recipe: Recipe) -> bool:
    """Whether the recipe or a sub-recipe has a ``top_fraction ... of: kept`` rule."""
    return any((kind == "top_fraction" and arg.get("of", "pool") == "kept") or
               any(ranks_among_kept(sub) for sub in _subrecipes(rule))
               for rule in recipe.select for kind, arg in rule.items())


def top_fractions(recipe: Recipe) -> set[tuple[str, float]]:
    """Every (column, fraction) of a whole-pool top_fraction rule in the recipe and its sub-recipes."""
    out = set()
    for rule in recipe.select:
        kind, arg = next(iter(rule.items()))
        if kind == "top_fraction" and arg.get("of", "pool") == "pool":
            out.add((arg["column"], float(arg["fraction"])))
        for sub in _subrecipes(rule):
            out |= top_fractions(sub)
    return out


def apply(recipe: Recipe, rows: Rows, log: list[dict] | None = None) -> np.ndarray:
    """Boolean mask of the rows ``recipe`` keeps; appends ``{rule, kept}`` entries to ``log``."""
    mask = rows.ok.copy()
    if log is not None:
        log.append({"rule": "downloaded (state ok)", "kept": int(mask.sum())})
    for i, rule in enumerate(recipe.select):
        kind, arg = next(iter(rule.items()))
        detail: dict = {}
        if kind == "threshold":
            values = np.asarray(rows.get(arg["column"]), dtype=float)
            keep = np.isfinite(values)
            if "min" in arg:
                keep &= values >= float(arg["min"])
            if "max" in arg:
                keep &= values <= float(arg["max"])
            text = f"{arg.get('min', '-inf')} <= {arg['column']} <= {arg.get('max', 'inf')}"
        elif kind == "top_fraction":
            values = np.asarray(rows.get(arg["column"]), dtype=float)
            among = arg.get("of", "pool") == "kept"
            key = _among_key(recipe, i, arg) if among else (arg["column"], float(arg["fraction"]))
            if key not in rows.thresholds and among and rows.pending is not None:  # a pass over the parts
                rows.pending.setdefault(key, []).append(values[mask])
                raise Pending(key)
            if key not in rows.thresholds:  # DataComp: over every candidate row, with or without a score
                rows.thresholds[key] = top_fraction_threshold(values[mask] if among else values[rows.ok], key[1])
            threshold = rows.thresholds[key]
            keep = np.isfinite(values) & (values >= threshold)
            text = f"top {key[1]:.0%} {'of the rows kept so far' if among else 'of the pool'} by {arg['column']}"
            detail = {"threshold": threshold}
        elif kind in ("exclude_uids", "exclude_duplicates"):
            key = json.dumps(arg, sort_keys=True, default=str)
            if key not in rows.lists:
                rows.lists[key] = _exclusion_list(kind, arg)
            keep = ~isin_uids(rows.uid, rows.lists[key])
            text = f"exclude uids in {arg}" if kind == "exclude_uids" else \
                f"exclude {', '.join(arg['kinds'])} duplicates ({arg['table']})"
        else:
            masks = [apply(sub, rows) for sub in arg]
            keep = np.logical_and.reduce(masks) if kind == "intersect" else np.logical_or.reduce(masks)
            text = f"{kind} of {', '.join(sub.name for sub in arg)}"
        mask &= keep
        if log is not None:
            log.append({"rule": text, "kept": int(mask.sum()), **detail})
    return mask


def _exclusion_list(kind: str, arg) -> np.ndarray:
    if kind == "exclude_uids":
        return read_uid_list(str(arg))
    from winnow.pipeline.stages.dedup import dropped_uids, read_table

    return uids_to_array(sorted(dropped_uids(read_table(str(arg["table"])), list(arg["kinds"]), arg.get("eps"))))


def write_subset(out: str, uids, doc: dict) -> np.ndarray:
    """Write ``uids.npy`` (sorted ``u8,u8``, DataComp's format) and ``subset.json``."""
    arr = sort_uids(uids) if isinstance(uids, np.ndarray) and uids.dtype == UID_DTYPE else uids_to_array(uids)
    with fsio.atomic_open(fsio.join(out, "uids.npy"), "wb") as f:
        np.save(f, arr)
    fsio.write_json(fsio.join(out, "subset.json"), doc)
    return arr


def write_runs(path: str, his: list[np.ndarray], los: list[np.ndarray], buckets: int = 64) -> int:
    """Write sorted runs of uids (upper and lower halves, each run sorted) as one sorted ``u8,u8`` ``.npy``, one
    range of upper halves at a time: memory is the runs plus about 1/``buckets`` of them, never a whole-size
    concatenation and sort. Returns the number of uids."""
    total = sum(len(h) for h in his)
    sample = np.sort(np.concatenate([h[:: max(1, len(h) // 256)] for h in his] or [np.zeros(0, np.uint64)]))
    edges = np.unique(sample[(np.arange(1, buckets) * len(sample)) // buckets]) if len(sample) else sample
    cuts = [np.concatenate([[0], np.searchsorted(h, edges, side="left"), [len(h)]]) for h in his]
    with fsio.atomic_open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(UID_DTYPE),
                                                 "fortran_order": False, "shape": (total,)})
        for b in range(len(edges) + 1):
            hi = np.concatenate([h[c[b]: c[b + 1]] for h, c in zip(his, cuts)] or [np.zeros(0, np.uint64)])
            lo = np.concatenate([x[c[b]: c[b + 1]] for x, c in zip(los, cuts)] or [np.zeros(0, np.uint64)])
            hi, lo = sort_halves(hi, lo)  # equal upper halves always share a bucket
            block = np.empty(len(hi), UID_DTYPE)
            block["f0"], block["f1"] = hi, lo
            f.write(block.tobytes())
    return total


def _score_rules(recipe: Recipe) -> list[tuple[str, dict]]:
    """Every threshold and top_fraction rule of the recipe and its sub-recipes, as (kind, argument)."""
    out = []
    for rule in recipe.select:
        kind, arg = next(iter(rule.items()))
        if kind in ("threshold", "top_fraction"):
            out.append((kind, arg))
        for sub in _subrecipes(rule):
            out += [r for r in _score_rules(sub) if r not in out]
    return out


def explain(recipe: Recipe, scores, thresholds: dict) -> list[str]:
    """Per score rule: how many candidate rows it keeps alone, and the range of its column beside its bound, e.g.
    "clip_b32_score >= 0.3 keeps 0 of 10,000: clip_b32_score ranges 0.05..0.21 (5%/50%/95% 0.07/0.12/0.19)"."""
    lines = []
    for kind, arg in _score_rules(recipe):
        column = arg["column"]
        values = np.concatenate([scores.column(column, p)[scores.ok(p)] for p in scores.parts]).astype(np.float64)
        if kind == "threshold":
            lo, hi = float(arg.get("min", -np.inf)), float(arg.get("max", np.inf))
            bound = " and ".join([f">= {lo:g}"] * ("min" in arg) + [f"<= {hi:g}"] * ("max" in arg))
        else:
            fraction = float(arg["fraction"])
            lo = thresholds.get((column, fraction), next((v for k, v in thresholds.items()
                                                          if k[:3] == (column, fraction, "kept")), np.nan))
            hi = np.inf
            bound = f">= {lo:.4g} (the top {fraction:.0%} threshold)"
        with np.errstate(invalid="ignore"):
            kept = int(((values >= lo) & (values <= hi)).sum())
        finite = values[np.isfinite(values)]
        if len(finite):
            q = np.quantile(finite, [0.05, 0.5, 0.95])
            spread = (f"{column} ranges {finite.min():.4g}..{finite.max():.4g} (5%/50%/95% "
                      f"{q[0]:.3g}/{q[1]:.3g}/{q[2]:.3g})")
        else:
            spread = f"{column} has no score (all NaN)"
        missing = len(values) - len(finite)
        lines.append(f"{column} {bound} keeps {kept:,} of {len(values):,}: {spread}"
                     + (f", {missing:,} without a score" if missing else ""))
    return lines


def _thresholds_among_kept(recipe: Recipe, parts: list, part_rows, thresholds: dict) -> None:
    """Fill ``thresholds`` for the recipe's ``of: kept`` rules: each pass over the parts finds one more, in the
    rules' order."""
    while ranks_among_kept(recipe):
        pending: dict = {}
        for part in parts:
            try:
                apply(recipe, part_rows(part, pending))
            except Pending:
                pass
        if not pending:
            return
        for key, chunks in pending.items():
            thresholds[key] = top_fraction_threshold_of(chunks, key[1])


def _small_subset_line(recipe: Recipe, scores, thresholds: dict, steps: list, used: set, kept_rows: int,
                       candidates: int, total: int) -> str:
    """Why a subset kept under 1% of its candidates: each score rule's range beside its bound, and the knobs."""
    knobs = sorted(used - {"pool"})
    why = "; ".join(explain(recipe, scores, thresholds) or [f"{s['rule']}: {s['kept']:,} left" for s in steps]) \
        if candidates else f"no row of the pool's {total:,} is a candidate (downloaded: state ok)"
    return (f"subset {recipe.name} kept {kept_rows:,} of {candidates:,} candidate rows"
            + (f" ({kept_rows / candidates:.2%})" if candidates else "") + (f": {why}" if why else "")
            + (f"; the recipe's variables: {', '.join(knobs)} (--var NAME=VALUE)" if knobs else ""))


def subset(recipe_ref: str | dict | Recipe, pool: str, out: str, runner, variables: dict[str, str] | None = None,
           embeddings: dict[str, str] | None = None, allow_partial: bool = False, overwrite: bool = False,
           cache: str = "", release: bool = False, allow_empty: bool = True, log=print) -> dict:
    """Score what the recipe needs (reusing cached scores), apply its rules, write the subset (a stage: the same
    recipe over the same scores is reused; a folder holding another recipe's subset is refused, before any
    scoring, unless ``overwrite``). ``release``: the runner has no more work after scoring (its shutdown then
    overlaps the selection). A subset under 1% of the candidates logs why (each score rule's range beside its
    bound); an empty one, unless ``allow_empty``, raises :class:`RunFailed` with that line and writes nothing.

    Memory: the whole pool's values of each top-fraction column (to find its threshold; for ``of: kept``, the
    values of the rows kept before it, found by one more pass over the parts), one part's arrays, and the kept
    uids (16 bytes each); no frame and no uid string."""
    require_finished(pool, allow_partial, "subset", log)
    variables = {"pool": str(pool), **(variables or {})}
    used: set = set()
    recipe = load_recipe(recipe_ref, variables, used)
    params = {"recipe": recipe.to_dict(), "pool": str(pool)}
    manifest.StageRun("subset", out, params).check(overwrite, protect=[pool])  # another subset there: refuse now
    existed = fsio.exists(out)
    scores = score(pool, recipe.all_filters(), runner, dirs=embeddings, cache=cache, log=log)
    if release and runner is not None:
        runner.release()
    inputs = [fsio.join(folder, manifest.MANIFEST) for folder in scores.folders.values()] + recipe.files()
    stage = Stage("subset", out, params, inputs=[p for p in inputs if fsio.exists(p)], overwrite=overwrite,
                  protect=[pool], log=log, redo=True)
    if stage.done:
        return fsio.read_json(fsio.join(out, "subset.json"))
    thresholds = {}
    for column, fraction in sorted(top_fractions(recipe)):  # DataComp's rule over every candidate of the pool
        values = [scores.column(column, p)[scores.ok(p)] for p in scores.parts]
        thresholds[column, fraction] = top_fraction_threshold_of(values, fraction)
        del values
    lists: dict = {}

    def part_rows(part: Part, pending: dict | None = None) -> Rows:
        sorted_uid, order = scores.sorted_uids(part)
        columns: dict[str, np.ndarray] = {}  # each column read once per part

        def get(name: str) -> np.ndarray:
            if name not in columns:
                columns[name] = scores.column(name, part)
            return columns[name]

        return Rows(sorted_uid, order, scores.ok(part), get, thresholds, lists, pending)

    _thresholds_among_kept(recipe, scores.parts, part_rows, thresholds)
    his, los, steps, total = [], [], [], 0
    for part in scores.parts:
        rows = part_rows(part)
        order = rows.order
        part_steps: list[dict] = []
        kept = rows.kept(apply(recipe, rows, part_steps))
        his.append(kept["f0"].copy())
        los.append(kept["f1"].copy())
        steps = part_steps if not steps else [{**a, "kept": a["kept"] + b["kept"]} for a, b in zip(steps, part_steps)]
        total += len(order)
        del rows, kept
    kept_rows = sum(len(h) for h in his)
    candidates = steps[0]["kept"] if steps else 0
    if kept_rows == 0 or kept_rows < 0.01 * candidates:
        line = _small_subset_line(recipe, scores, thresholds, steps, used, kept_rows, candidates, total)
        if kept_rows == 0 and not allow_empty:
            fsio.remove(fsio.join(out, manifest.RUN))
            manifest.unlock(out)
            if not existed and not fsio.listdir(out):
                fsio.remove(out)
            raise RunFailed(f"{line}; nothing written")
        log(f"warning: {line}")
    doc = {"recipe": recipe.name, "description": recipe.description, "pool": str(pool), "rows": total,
           "kept": kept_rows, "steps": steps, "scores": dict(scores.folders),
           "filters": [plain(f) for f in recipe.all_filters()], "code_version": manifest.code_version()}
    write_runs(fsio.join(out, "uids.npy"), his, los)  # each part's kept uids are a sorted run
    fsio.write_json(fsio.join(out, "subset.json"), doc)
    stage.finish(rows={"rows": total, "kept": kept_rows}, outputs=["uids.npy", "subset.json"])
    log(f"subset {recipe.name}: {kept_rows:,} of {total:,} rows -> {fsio.join(out, 'uids.npy')}")
    for step in steps:
        log(f"  {step['kept']:>9,}  {step['rule']}")
    return doc
