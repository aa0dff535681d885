"""Comparing trained subsets: the evaluations found in run folders, seeds grouped, and one table of means, 95%
intervals, seed spreads and paired tests (:mod:`pipeline.tasks.stats`). ``winnow compare`` prints it; the HTML
report (:mod:`workflows.report`) shows it.

A RUN is a demo folder (every ``train/*/eval``), a training run folder (``<logs>/<name>`` with ``eval/``) or an
evaluation folder (``summary.json`` + ``eval_results.jsonl``). Runs named ``<subset>-seed<k>`` are seeds of one
subset.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from pipeline.core import fsio
from pipeline.core.errors import UserError
from pipeline.data.manifest import read_manifest
from pipeline.tasks import Task, samples_path
from pipeline.tasks.stats import Difference, Estimate, compare, estimate

SEED = re.compile(r"^(?P<subset>.+)-seed(?P<seed>\d+)$")
METHOD = ("95% interval: eval images resampled (paired across tasks) and, with 2 or more seeds, the seed-to-seed "
          "variance of the mean added (Student t); p: paired bootstrap over the same eval images of the "
          "seed-averaged per-image difference, plus the pooled seed variance; significant when p < 0.05 "
          "(pipeline/tasks/stats.py)")


@dataclass
class EvalRun:
    """One evaluated model: its run name and its evaluation folder."""

    name: str
    out: str

    @cached_property
    def summary(self) -> dict:
        return fsio.read_json(os.path.join(self.out, "summary.json"))

    def tasks(self) -> list[Task]:
        """The tasks it was evaluated on (from the evaluation's manifest)."""
        doc = read_manifest(self.out)
        if doc is None:
            raise UserError(f"{self.out} has no _manifest.json: not a finished `winnow evaluate` output")
        known = set(Task.__dataclass_fields__)
        return [Task(**{k: v for k, v in t.items() if k in known}) for t in doc["params"]["tasks"]]

    def samples(self, task: str) -> np.ndarray | None:
        path = samples_path(self.out, task)
        return np.load(path, allow_pickle=False).astype(np.float64) if os.path.exists(path) else None


def find_runs(paths: list[str]) -> list[EvalRun]:
    """The evaluations in the given folders, in the order given (a demo folder's in its subsets' order)."""
    runs = []
    for path in paths:
        path = path.rstrip("/")
        if os.path.isfile(os.path.join(path, "summary.json")) and os.path.isfile(
                os.path.join(path, "eval_results.jsonl")):
            parent = os.path.basename(os.path.dirname(path))
            runs.append(EvalRun(parent if os.path.basename(path) == "eval" else os.path.basename(path), path))
        elif os.path.isfile(os.path.join(path, "eval", "summary.json")):
            runs.append(EvalRun(os.path.basename(path), os.path.join(path, "eval")))
        elif os.path.isdir(os.path.join(path, "train")):
            listed = _demo_runs(path)
            found = [(p.split(os.sep)[-3], os.path.dirname(p)) for p in
                     glob.glob(os.path.join(path, "train", "*", "eval", "summary.json"))]
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
    path = os.path.join(demo, "report", "summary.json")
    runs = fsio.read_json(path).get("runs", {}) if os.path.isfile(path) else {}
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

    def samples(self, task: str) -> np.ndarray | None:
        """Per-sample outcomes of ``task``, seeds x samples, or None when a run has none (older evaluations)."""
        arrays = [r.samples(task) for r in self.runs]
        if any(a is None for a in arrays) or len({len(a) for a in arrays}) != 1:
            return None
        return np.stack(arrays)

    @property
    def size(self) -> int | None:
        """Training samples of its subset (the training run's manifest), when known."""
        doc = read_manifest(os.path.dirname(self.runs[0].out)) or {}
        return doc.get("rows", {}).get("samples") if doc.get("stage") == "train" else None


def group_runs(runs: list[EvalRun]) -> list[Group]:
    """Runs named ``<subset>-seed<k>`` grouped as seeds of one subset, in order of first appearance."""
    members: dict[str, list[EvalRun]] = {}
    for run in runs:
        members.setdefault(_subset(run.name), []).append(run)
    return [Group(name, rs) for name, rs in members.items()]


def interval(group: Group, tasks: list[str]) -> Estimate | None:
    """The estimate of the average over ``tasks`` with its interval, or None without per-sample outcomes."""
    arrays = [group.samples(t) for t in tasks]
    return estimate(arrays) if tasks and all(a is not None for a in arrays) else None


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


def table(groups: list[Group], baseline: int = 0) -> list[Row]:
    """One row per subset: main metrics and their average (mean over seeds), 95% interval, seed spread, and a
    paired test against ``groups[baseline]`` on the baseline's main tasks."""
    tasks = groups[baseline].main
    rows = []
    for g in groups:
        per_seed = np.nanmean([g.values(t) for t in tasks], axis=0) if tasks else np.array([np.nan])
        rows.append(Row(g, {t: float(np.nanmean(g.values(t))) for t in tasks}, float(np.mean(per_seed)),
                        float(np.ptp(per_seed)), interval(g, tasks),
                        paired(g, groups[baseline], tasks) if g is not groups[baseline] else None))
    return rows


def _num(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None or not np.isfinite(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def ci_text(e: Estimate | Difference | None, signed: bool = False) -> str:
    return "n/a" if e is None else f"[{_num(e.low, signed)}, {_num(e.high, signed)}]"


def p_text(d: Difference | None) -> str:
    return "n/a" if d is None else ("<0.001" if d.p < 0.001 else f"{d.p:.3f}")


def frame(rows: list[Row], baseline: int = 0) -> pd.DataFrame:
    """The table as strings, one column per figure (for text and HTML); the last four compare each row with
    ``rows[baseline]``."""
    base = rows[baseline]
    out = []
    for r in rows:
        tested = r is not base
        out.append({"subset": r.group.name, "seeds": str(len(r.group.runs)),
                    "size": f"{r.group.size:,}" if r.group.size else "",
                    **{t: _num(v) for t, v in r.metrics.items()}, "average": _num(r.average),
                    "95% interval": ci_text(r.interval),
                    "seed spread": _num(r.spread) if len(r.group.runs) > 1 else "",
                    f"vs {base.group.name}": _num(r.average - base.average, True) if tested else "",
                    "diff. interval": ci_text(r.vs, True) if tested else "", "p": p_text(r.vs) if tested else "",
                    "significant": ("n/a" if r.vs is None else "yes" if r.vs.significant else "no") if tested else ""})
    return pd.DataFrame(out)


def format_text(rows: list[Row]) -> str:
    """The table and how its figures are made, as text."""
    text = frame(rows).to_string(index=False)
    notes = [METHOD]
    if any(r.interval is None for r in rows):
        notes.append("n/a: no per-sample outcomes (samples/*.npy); evaluations made before they were written "
                     "need `winnow evaluate` again")
    return text + "\n\n" + "\n".join(notes)


def compare_runs(paths: list[str]) -> str:
    """``winnow compare``: the table for the runs in ``paths``, tests against the first subset."""
    return format_text(table(group_runs(find_runs(paths))))
