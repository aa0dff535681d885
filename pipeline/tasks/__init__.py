"""Evaluation tasks: a task list (YAML, DataComp's ``tasklist.yml`` style) names tasks, each of a registered kind.

Task list::

    tasks:
      - name: synthetic-shapes            # shown in results
        kind: zeroshot_classification     # a key of KINDS
        data: runs/demo/world/eval        # an eval set folder (pipeline.data.evalsets); ${var} placeholders allowed
        main_metric: acc1                 # one of the kind's METRICS
        random_score: 0.0833
        curve: mix-g7                     # optional: tasks sharing a curve are its points (x, main metric)
        x: 0.1

A kind is one module with ``KIND`` (its name), ``METRICS`` (what it reports) and ``run(task, ctx)``; it is
registered by one line in :data:`KINDS`. Curves are summarised by their normalised area (:mod:`.curves`); the
average of a model is the mean of the plain tasks' main metrics and the curves' areas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.core.config import parse_yaml, substitute
from pipeline.core.errors import UserError
from pipeline.tasks import odd_one_out, retrieval, zeroshot

KINDS = {m.KIND: m for m in (zeroshot, retrieval, odd_one_out)}
FIELDS = ("name", "kind", "data", "main_metric", "random_score", "curve", "x")


@dataclass
class Task:
    name: str
    kind: str
    data: str
    main_metric: str
    random_score: float = 0.0
    curve: str = ""  # tasks sharing a curve are points (x, main metric) of one curve, summarised by its area
    x: float = 0.0


@dataclass
class Context:
    """What a task runs against: one model, its preprocessing and tokenizer, and a cache shared by its tasks."""

    model: object
    preprocess: object
    tokenizer: object
    device: str = "cpu"
    cache: dict = field(default_factory=dict)


def load_tasklist(path: str, variables: dict[str, str] | None = None) -> list[Task]:
    if not os.path.isfile(path):
        raise UserError(f"task list not found: {path}")
    doc = parse_yaml(substitute(open(path).read(), variables or {}, os.path.basename(path)), f"task list {path}") or {}
    if not isinstance(doc, dict):
        raise UserError(f"task list {path} must hold a mapping with a tasks list")
    tasks = []
    for i, entry in enumerate(doc.get("tasks") or []):
        if not isinstance(entry, dict) or set(entry) - set(FIELDS) or not set(FIELDS[:4]) <= set(entry):
            raise UserError(f"{path}: task {i} needs name, kind, data, main_metric (and optional random_score)")
        if entry["kind"] not in KINDS:
            raise UserError(f"{path}: task {entry['name']!r} kind must be one of {', '.join(KINDS)}")
        tasks.append(Task(**entry))
    if not tasks:
        raise UserError(f"{path} lists no tasks")
    return tasks


def run_task(task: Task, ctx: Context) -> dict[str, float]:
    """One task's metrics (its kind's METRICS, and what else the kind reports)."""
    metrics = KINDS[task.kind].run(task, ctx)
    if task.main_metric not in metrics:
        raise UserError(f"task {task.name}: main_metric {task.main_metric!r} is not one of {', '.join(metrics)}")
    return metrics
