"""Comparing trained subsets: the evaluations found in run folders, seeds grouped, and one table of means, 95%
intervals, seed spreads and paired tests (:mod:`winnow.pipeline.tasks.stats`). ``winnow compare`` prints it; the HTML
report (:mod:`winnow.workflows.report`) shows it.

A RUN is a demo folder (every ``train/*/eval``), a training run folder (``<logs>/<name>`` with ``eval/``) or an
evaluation folder (``summary.json`` + ``eval_results.jsonl``). Runs named ``<subset>-seed<k>`` are seeds of one
subset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.manifest import read_manifest
from winnow.pipeline.tasks import Task, samples_path
from winnow.pipeline.tasks.stats import ONE_SEED, Difference, Estimate, compare, estimate, holm, verdict

SEED = re.compile(r"^(?P<subset>.+)-seed(?P<seed>\d+)$")
METHOD = ("95% interval: eval images resampled (paired across tasks) and, with 2 or more seeds, the seed-to-seed "
          "variance of the mean added (Student t); p: paired bootstrap over the same eval images of the "
          "seed-averaged per-image difference, plus the pooled seed variance; p (Holm): adjusted for the number "
          "of subsets compared with the baseline; significant when p (Holm) < 0.05 and both sides have 2 or more "
          "seeds (pipeline/tasks/stats.py)")
FEWER = "\u2020"  # marks an interval made from fewer seeds than the table's most


@dataclass
class EvalRun:
    """One evaluated model: its run name and its evaluation folder."""

    name: str
    out: str

    @cached_property
    def summary(self) -> dict:
        return fsio.read_json(fsio.join(self.out, "summary.json"))

    def tasks(self) -> list[Task]:
        """The tasks it was evaluated on (from the evaluation's manifest)."""
        doc = read_manifest(self.out)
        if doc is None:
            raise UserError(f"{self.out} has no _manifest.json: not a finished `winnow evaluate` output")
        known = set(Task.__dataclass_fields__)
        return [Task(**{k: v for k, v in t.items() if k in known}) for t in doc["params"]["tasks"]]

    def samples(self, task: str) -> np.ndarray | None:
        path = samples_path(self.out, task)
        if not fsio.exists(path):
            return None
        return fsio.load_npy(path, f"per-sample outcomes {path}").astype(np.float64)

    def losses(self) -> list[tuple[int, float]]:
        """(samples seen, loss) of every step line its training run logged (``out.log`` of the run folder holding
        this evaluation as ``eval/``); [] when there is none."""
        from winnow.pipeline.stages.train import step_loss

        parent, leaf = self.out.rstrip("/").rsplit("/", 1)
        path = fsio.join(parent, "out.log")
        if leaf != "eval" or not fsio.exists(path):
            return []
        return [x for x in map(step_loss, fsio.read_bytes(path).decode(errors="replace").splitlines())
                if x is not None]

    def fingerprint(self, task: str) -> str | None:
        """The fingerprint of the eval data ``task`` was scored on (None: evaluated before they were recorded)."""
        return (self.summary.get("details", {}).get(task) or {}).get("fingerprint")

    @property
    def main(self) -> set[str]:
        return {t.name for t in self.tasks() if not t.diagnostic}


def check_comparable(runs: list[EvalRun]) -> list[str]:
    """Refuse (one UserError line naming both) runs evaluated on different main task lists or on different eval
    data; return notes for runs whose eval data were not recorded (older evaluations: assumed the same)."""
    first, notes = runs[0], []
    for run in runs[1:]:
        a, b = first.main, run.main
        if a != b:
            only = "; ".join(f"{', '.join(sorted(x - y))} only in {n}" for x, y, n in
                             ((a, b, first.name), (b, a, run.name)) if x - y)
            raise UserError(f"{first.name} and {run.name} were evaluated on different task lists ({only}); "
                            "compare runs evaluated with the same --tasks")
        for task in sorted(a):
            fa, fb = first.fingerprint(task), run.fingerprint(task)
            if fa and fb and fa != fb:
                raise UserError(f"{first.name} and {run.name} were evaluated on different eval data (task {task}: "
                                "other files or items); compare runs evaluated on the same eval sets")
            if not (fa and fb):
                notes.append(f"{first.name if not fa else run.name}: its eval data were not recorded (evaluated by "
                             "an older version); assumed to be the same")
    return sorted(set(notes))


def find_runs(paths: list[str]) -> list[EvalRun]:
    """The evaluations in the given folders, in the order given (a demo folder's in its subsets' order)."""
    runs = []
    for path in paths:
        path = path.rstrip("/")
        if fsio.exists(fsio.join(path, "summary.json")) and fsio.exists(fsio.join(path, "eval_results.jsonl")):
            parts = path.split("/")
            runs.append(EvalRun(parts[-2] if parts[-1] == "eval" and len(parts) > 1 else parts[-1], path))
        elif fsio.exists(fsio.join(path, "eval", "summary.json")):
            runs.append(EvalRun(path.rsplit("/", 1)[-1], fsio.join(path, "eval")))
        elif fsio.isdir(fsio.join(path, "train")):
            listed = _demo_runs(path)
            found = [(p.rstrip("/").split("/")[-3], p.rstrip("/").rsplit("/", 1)[0]) for p in
                     fsio.glob(fsio.join(path, "train", "*", "eval", "summary.json"))]
            found = sorted([f for f in found if not listed or f[0] in listed],
                           key=lambda f: (listed.get(f[0], 0), _subset(f[0]) != "no_filter", f[0]))
            runs += [EvalRun(name, out) for name, out in found]
        else:
            raise UserError(f"{path}: no evaluation found; give a demo folder (runs/demo), a training run folder "
                            "with eval/summary.json, or an evaluation folder (summary.json + eval_results.jsonl)")
    if not runs:
        raise UserError(f"no evaluated run in {', '.join(paths)}; train and evaluate first (`winnow train --tasks`)")
    return runs


def _demo_runs(demo: str) -> dict[str, int]:
    """The runs of the demo's last report (``report/summary.json``) in its order; {} without one."""
    path = fsio.join(demo, "report", "summary.json")
    runs = fsio.read_json(path).get("runs", {}) if fsio.exists(path) else {}
    return {n: i for i, n in enumerate(f"{s}-seed{r['seed']}" for s, results in runs.items() for r in results)}


def _subset(name: str) -> str:
    m = SEED.match(name)
    return m.group("subset") if m else name


@dataclass
class Group:
    """The seeds of one subset."""

    name: str
    runs: list[EvalRun] = field(default_factory=list)

    @cached_property
    def tasks(self) -> list[Task]:
        return self.runs[0].tasks()

    @property
    def main(self) -> list[str]:
        """The tasks of the average (not diagnostics: curve points, odd-one-out)."""
        return [t.name for t in self.tasks if not t.diagnostic]

    def values(self, task: str) -> np.ndarray:
        """The main metric of ``task``, one value per seed (NaN where a run lacks it)."""
        return np.array([r.summary["tasks"].get(task, np.nan) for r in self.runs], float)

    def mean(self, task: str) -> float | None:
        """The mean over seeds of ``task``'s main metric, None when no run has it."""
        values = self.values(task)
        return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else None

    def samples(self, task: str) -> np.ndarray | None:
        """Per-sample outcomes of ``task``, seeds x samples, or None when a run has none (older evaluations)."""
        arrays = [r.samples(task) for r in self.runs]
        if any(a is None for a in arrays) or len({len(a) for a in arrays}) != 1:
            return None
        return np.stack(arrays)

    @property
    def size(self) -> int | None:
        """Training samples of its subset (the training run's manifest), when known."""
        doc = read_manifest(self.runs[0].out.rstrip("/").rsplit("/", 1)[0]) or {}
        return doc.get("rows", {}).get("samples") if doc.get("stage") == "train" else None


def group_runs(runs: list[EvalRun]) -> list[Group]:
    """Runs named ``<subset>-seed<k>`` grouped as seeds of one subset, in order of first appearance."""
    members: dict[str, list[EvalRun]] = {}
    for run in runs:
        members.setdefault(_subset(run.name), []).append(run)
    return [Group(name, rs) for name, rs in members.items()]


def interval(group: Group, tasks: list[str], weights=None) -> Estimate | None:
    """The estimate of the (weighted) average over ``tasks`` with its interval, or None without per-sample
    outcomes."""
    arrays = [group.samples(t) for t in tasks]
    return estimate(arrays, weights=weights) if tasks and all(a is not None for a in arrays) else None


def paired(a: Group, b: Group, tasks: list[str]) -> Difference | None:
    """A - B on the average over ``tasks``, paired over the same eval images; None when it cannot be paired."""
    xs, ys = [a.samples(t) for t in tasks], [b.samples(t) for t in tasks]
    if not tasks or any(x is None or y is None or x.shape[1] != y.shape[1] for x, y in zip(xs, ys)):
        return None
    return compare(xs, ys)


@dataclass
class Row:
    group: Group
    metrics: dict[str, float]  # per main task, mean over seeds
    average: float
    spread: float  # max - min of the per-seed average
    interval: Estimate | None
    vs: Difference | None = None  # against the table's baseline
    p_holm: float | None = None  # vs's p adjusted for the table's number of comparisons

    @property
    def verdict(self) -> str:
        return verdict(self.vs, self.p_holm)


def table(groups: list[Group], baseline: int = 0) -> list[Row]:
    """One row per subset: main metrics and their average (mean over seeds), 95% interval, seed spread, and a
    paired test against ``groups[baseline]`` on the baseline's main tasks (Holm-adjusted over the rows). Runs
    evaluated on different task lists or eval data are refused (:func:`check_comparable`)."""
    check_comparable([r for g in groups for r in g.runs])
    tasks = groups[baseline].main
    rows = []
    for g in groups:
        per_seed = np.mean([g.values(t) for t in tasks], axis=0) if tasks else np.array([np.nan])
        rows.append(Row(g, {t: g.mean(t) for t in tasks}, float(np.mean(per_seed)),
                        float(np.ptp(per_seed)), interval(g, tasks),
                        paired(g, groups[baseline], tasks) if g is not groups[baseline] else None))
    tested = [r for r in rows if r.vs is not None]
    for r, p in zip(tested, holm([r.vs.p for r in tested])):
        r.p_holm = p
    return rows


def _num(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None or not np.isfinite(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def ci_text(e: Estimate | Difference | None, signed: bool = False) -> str:
    return "n/a" if e is None else f"[{_num(e.low, signed)}, {_num(e.high, signed)}]"


def p_text(d: Difference | float | None) -> str:
    p = d.p if isinstance(d, Difference) else d
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def frame(rows: list[Row], baseline: int = 0) -> pd.DataFrame:
    """The table as strings, one column per figure (for text and HTML); the last five compare each row with
    ``rows[baseline]``. An interval made from fewer seeds than the table's most is marked."""
    base = rows[baseline]
    most = max(len(r.group.runs) for r in rows)
    out = []
    for r in rows:
        tested = r is not base
        fewer = FEWER if len(r.group.runs) < most and r.interval is not None else ""
        out.append({"subset": r.group.name, "seeds": str(len(r.group.runs)),
                    "size": f"{r.group.size:,}" if r.group.size else "",
                    **{t: _num(v) for t, v in r.metrics.items()}, "average": _num(r.average),
                    "95% interval": ci_text(r.interval) + fewer,
                    "seed spread": _num(r.spread) if len(r.group.runs) > 1 else "",
                    f"vs {base.group.name}": _num(r.average - base.average, True) if tested else "",
                    "diff. interval": ci_text(r.vs, True) if tested else "", "p": p_text(r.vs) if tested else "",
                    "p (Holm)": p_text(r.p_holm) if tested else "", "verdict": r.verdict if tested else ""})
    return pd.DataFrame(out)


def notes(rows: list[Row]) -> list[str]:
    """What the reader of the table must know besides :data:`METHOD`."""
    out = []
    if len({len(r.group.runs) for r in rows}) > 1:
        out.append(f"{FEWER}: made from fewer seeds than other rows (with one seed it covers the eval images only), "
                   "so it is narrower than its evidence allows; do not compare its width with the others'")
    if any(r.vs is not None and r.vs.one_seed for r in rows):
        out.append(f"{ONE_SEED}: a side has a single seed, so a second seed could move the difference by more "
                   "than its interval; train 2 or more seeds per subset before calling it significant")
    if any(r.interval is None for r in rows):
        out.append("n/a: no per-sample outcomes (samples/*.npy); evaluations made before they were written "
                   "need `winnow evaluate` again")
    return out + check_comparable([run for r in rows for run in r.group.runs])


def format_text(rows: list[Row]) -> str:
    """The table and how its figures are made, as text."""
    return frame(rows).to_string(index=False) + "\n\n" + "\n".join([METHOD, *notes(rows)])


def compare_runs(paths: list[str]) -> str:
    """``winnow compare``: the table for the runs in ``paths``, tests against the first subset."""
    return format_text(table(group_runs(find_runs(paths))))
