"""Evaluation tasks: a task list names tasks, each of a registered kind. :func:`load_tasklist` reads a shipped
name (``manifests/tasks/NAME.yaml``) or a YAML path in either of two formats.

Winnow's own::

    tasks:
      - name: synthetic-shapes            # shown in results (their ``dataset``)
        kind: zeroshot_classification     # a key of KINDS
        data: runs/demo/world/eval        # an eval set folder (winnow.pipeline.data.evalsets); ${var} placeholders
        allowed
        main_metric: acc1                 # one of the kind's METRICS
        random_score: 0.0833
        curve: mix-g7                     # optional: tasks sharing a curve are its points (x, main metric)
        x: 0.1
        key: my/key                       # optional: the results' ``key`` (default: the name)

DataComp's ``tasklist.yml`` (shipped as ``datacomp``): a mapping of task key -> ``{name, main_metric, tags,
random_score, ...}``, read from ``--var data_dir=FOLDER`` in the layout DataComp's ``download_evalsets.py`` writes:
``wds_<key, / as ->_test`` folders (the ``fairness/`` prefix dropped) and, for ``retrieval/`` keys and WinoGAViL,
the Hugging Face cache ``hf_cache/nlphuji___<name>``. ``wilds/`` keys are WILDS tasks, ``fairness/`` keys fairness
tasks, ``misc/winogavil`` WinoGAViL, ``retrieval/`` keys retrieval, the rest zero-shot classification; the main
metric is the entry's, else ``acc1`` (DataComp's default; FairFace and UTKFace report no acc1, so they have no
main metric, as in DataComp). A task whose eval set is not in the folder is named in one line with how to fetch
it and left out (``Task.missing``); the others run.

A kind is one module with ``KIND`` (its name), ``METRICS`` (what it reports) and ``run(task, ctx)`` returning its
metrics and, per metric it can split, one value per eval item whose mean is that metric; registered by one line
in :data:`KINDS`. A kind with ``DIAGNOSTIC = True`` (odd-one-out) and any curve point is a diagnostic: reported
on its own, never in a model's average (:func:`average_of`, the one definition of it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from winnow import manifests
from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import parse_yaml, substitute
from winnow.pipeline.core.errors import UserError, did_you_mean
from winnow.pipeline.tasks import fairness, odd_one_out, retrieval, wilds, winogavil, zeroshot

KINDS = {m.KIND: m for m in (zeroshot, retrieval, odd_one_out, wilds, fairness, winogavil)}
FIELDS = ("name", "kind", "data", "main_metric", "random_score", "curve", "x", "key")
FETCH = "fetch it with DataComp's `python download_evalsets.py DATA_DIR` (github.com/mlfoundations/datacomp)"


@dataclass
class Task:
    name: str
    kind: str
    data: str
    main_metric: str
    random_score: float = 0.0
    curve: str = ""  # tasks sharing a curve are points (x, main metric) of one curve, summarised by its area
    x: float = 0.0
    key: str = ""  # the results' ``key`` (DataComp's task key); the name when empty
    missing: str = ""  # why the task cannot run here (its eval set is not in the folder); empty when it can
    size: int = 0  # eval items, when the task list says (DataComp's; to schedule the largest first)

    @property
    def diagnostic(self) -> bool:
        """Curve points, diagnostic kinds (odd-one-out) and tasks without a main metric (FairFace, UTKFace):
        reported on their own, not in the average."""
        return bool(self.curve) or getattr(KINDS[self.kind], "DIAGNOSTIC", False) or not self.main_metric


@dataclass
class Context:
    """What a task runs against: one model, its preprocessing and tokenizer, and a cache shared by its tasks."""

    model: object
    preprocess: object
    tokenizer: object
    device: str = "cpu"
    cache: dict = field(default_factory=dict)


def average_of(tasks: list[Task], mains: list[float | None]) -> float | None:
    """A model's average: the mean of the main metrics of its non-diagnostic tasks (curve points, odd-one-out
    and tasks without a main metric are reported separately; DataComp's average of 38 is this over its 40);
    None when every task is a diagnostic."""
    plain = [m for t, m in zip(tasks, mains, strict=True) if not t.diagnostic and m is not None]
    return float(np.mean(plain)) if plain else None


def stem(name: str) -> str:
    """The file name stem of a task's outputs."""
    return re.sub(r"[^\w.-]", "_", name)


def samples_path(out: str, name: str) -> str:
    """``<out>/samples/<stem>.npy``: the task's main metric per eval item (float32, 1-D; see the kinds)."""
    return os.path.join(out, "samples", stem(name) + ".npy")


def tasklists_dir() -> Path:

    return Path(manifests.__file__).parent / "tasks"


def load_tasklist(ref: str, variables: dict[str, str] | None = None, log=print) -> list[Task]:
    """The tasks of a shipped task list's name or a YAML path (Winnow's or DataComp's format, see the module)."""
    variables = variables or {}
    path = ref
    if not os.path.isfile(path) and re.fullmatch(r"[\w-]+", ref):
        path = str(tasklists_dir() / f"{ref}.yaml")
    if not os.path.isfile(path):
        names = sorted(p.stem for p in tasklists_dir().glob("*.yaml"))
        hint = did_you_mean(ref, names) or f"give a YAML path or a shipped name: {', '.join(names)}"
        raise UserError(f"task list {ref!r} not found; {hint.strip()}")
    text, name = Path(path).read_text(), os.path.basename(path)
    for var in re.findall(r"\$\{(\w+)\}", text):
        if var not in variables:
            raise UserError(f"task list {name} uses ${{{var}}}; pass --var {var}=VALUE")
    doc = parse_yaml(substitute(text, variables, name), f"task list {path}") or {}
    if isinstance(doc, dict) and "tasks" in doc:
        tasks = _own_tasks(doc["tasks"] or [], path)
    elif isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
        tasks = _datacomp_tasks(doc, path, variables, log)
    else:
        raise UserError(f"task list {path} must hold a tasks list (Winnow's format) or a mapping of task key -> "
                        "{name, main_metric, ...} (DataComp's tasklist.yml)")
    if not tasks:
        raise UserError(f"{path} lists no tasks")
    for i, t in enumerate(tasks):
        if t.main_metric and t.main_metric not in KINDS[t.kind].METRICS:
            raise UserError(f"{path}: task {t.name!r} main_metric {t.main_metric!r} is not one of "
                            f"{', '.join(KINDS[t.kind].METRICS)}")
        if any(stem(t.name) == stem(u.name) for u in tasks[:i]):
            raise UserError(f"{path}: two tasks are named {t.name!r} (or alike up to punctuation); rename one")
    return tasks


def _own_tasks(entries: list, path: str) -> list[Task]:
    tasks = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - set(FIELDS) or not set(FIELDS[:4]) <= set(entry):
            raise UserError(f"{path}: task {i} needs name, kind, data, main_metric (and optional random_score, "
                            "curve, x, key)")
        if entry["kind"] not in KINDS:
            raise UserError(f"{path}: task {entry['name']!r} kind must be one of {', '.join(KINDS)}")
        tasks.append(Task(**entry))
    return tasks


def _datacomp_tasks(doc: dict, path: str, variables: dict[str, str], log) -> list[Task]:
    if "data_dir" not in variables:
        raise UserError(f"task list {path} is DataComp's format; pass --var data_dir=FOLDER (the folder DataComp's "
                        "download_evalsets.py fills: wds_<task>_test folders and hf_cache/)")
    root, tasks = variables["data_dir"], []
    for key, info in doc.items():
        kind, data = _datacomp_source(key, info, root)
        main = str(info.get("main_metric", "acc1"))
        if kind == fairness.KIND and fairness.dataset_of(key) in fairness.FACE_SETS and "main_metric" not in info:
            main = ""  # FairFace and UTKFace report fairness tables, no acc1: no main metric (as in DataComp)
        task = Task(name=str(info.get("name", key)), key=key, kind=kind, data=data, main_metric=main,
                    random_score=float(info.get("random_score") or 0.0), size=int(info.get("size") or 0))
        if not _present(task):
            task.missing = f"eval set {data} not found"
            log(f"evaluate: {task.name} ({key}) is not in {root}: {FETCH}; the other tasks run")
        tasks.append(task)
    if all(t.missing for t in tasks):
        raise UserError(f"none of the {len(tasks)} eval sets of {os.path.basename(path)} is in {root}; {FETCH}")
    return tasks


def _datacomp_source(key: str, info: dict, root: str) -> tuple[str, str]:
    """The kind of DataComp's task ``key`` and where its data lies under ``root`` (download_evalsets.py's layout;
    a retrieval set exported in clip_benchmark's layout under ``wds_<key>_test`` is read too)."""
    name = key.split("/", 1)[-1]
    if key.startswith("retrieval/") or (key != "misc/winogavil" and "retrieval" in (info.get("tags") or [])):
        export = fsio.join(root, f"wds_{key.replace('/', '-')}_test")
        return retrieval.KIND, export if fsio.isdir(export) else fsio.join(root, "hf_cache", f"nlphuji___{name}")
    if key == "misc/winogavil":
        return winogavil.KIND, fsio.join(root, "hf_cache", "nlphuji___winogavil")
    if key.startswith("wilds/"):
        return wilds.KIND, fsio.join(root, f"wds_{key.replace('/', '-')}_test")
    if key.startswith("fairness/"):
        return fairness.KIND, fsio.join(root, f"wds_{name}_test")
    return zeroshot.KIND, fsio.join(root, f"wds_{key.replace('/', '-')}_test")


def _present(task: Task) -> bool:
    if "___" in task.data.rstrip("/").rsplit("/", 1)[-1]:  # a Hugging Face cache folder
        return bool(fsio.glob(fsio.join(task.data, "**", "*-test*.arrow")))
    return bool(fsio.glob(fsio.join(task.data, "test", "*.tar")))


def _run(task: Task, ctx: Context) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    metrics, per_item = KINDS[task.kind].run(task, ctx)
    if task.main_metric and task.main_metric not in metrics:
        raise UserError(f"task {task.name}: main_metric {task.main_metric!r} is not one of {', '.join(metrics)}")
    return metrics, per_item


def run_task(task: Task, ctx: Context) -> dict[str, float]:
    """One task's metrics (its kind's METRICS, and what else the kind reports)."""
    return _run(task, ctx)[0]


def run_task_samples(task: Task, ctx: Context) -> tuple[dict[str, float], np.ndarray | None]:
    """One task's metrics and its main metric per eval item (float32; their mean is the main metric: an image
    for zero-shot and retrieval, a triplet for odd-one-out, an instance for WinoGAViL; see the kinds), or None
    when the main metric is not a mean over items (macro F1, a worst group) or there is none."""
    metrics, per_item = _run(task, ctx)
    if not task.main_metric or task.main_metric not in per_item:
        return metrics, None
    return metrics, np.asarray(per_item[task.main_metric], np.float32)
