"""``winnow evaluate``: one open_clip model on a task list (:mod:`winnow.pipeline.tasks`).

A stage whose units are the tasks: each task's result is written as ``tasks/<stem>.json`` when it is done, so an
interrupted evaluation resumes at the next task, and the same model on the same task list is not evaluated twice.
Writes, per task, ``samples/<stem>.npy`` (:func:`winnow.pipeline.tasks.samples_path`: the main metric per eval item,
for
bootstrap intervals and paired tests), and at the end ``eval_results.jsonl``, one line per task exactly as
DataComp's ``evaluate.py`` writes it (``key``, ``dataset`` = the task's name, ``metrics`` with ``main_metric``;
its resume logic and ``aggregate_scores.py`` read it), and ``summary.json``: the average
(:func:`winnow.pipeline.tasks.average_of`), every task's main metric, the curves with their areas, and per task what
the
results line leaves out (kind, data, main metric's name, random score, diagnostic, samples file).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from winnow.pipeline.core import fsio
from winnow.pipeline.data.evalsets import fingerprint
from winnow.pipeline.run.stage import Stage
from winnow.pipeline.tasks import Context, Task, average_of, run_task_samples, samples_path, stem
from winnow.pipeline.tasks.curves import summarize


@dataclass
class EvaluateConfig:
    """``model``: the open_clip architecture of the checkpoint (empty: the one its ``winnow train`` run recorded);
    ``device``: auto (CUDA when present), cpu, cuda."""

    model: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"


DATA = "winnow_data"  # a task marker's record of the eval data (kept out of DataComp's results lines)
_CONTEXT: dict[tuple, Context] = {}  # the model being evaluated (one at a time), with its classifier cache


@dataclass(frozen=True)
class EvalTask:
    model: str
    pretrained: str
    device: str
    task: Task
    out: str

    @property
    def marker(self) -> str:
        return os.path.join(self.out, "tasks", stem(self.task.name) + ".json")


def _device(device: str) -> str:
    """``cuda`` on a machine with several GPUs: the GPU of this runner worker (worker i uses GPU i mod n), so
    tasks spread over GPUs as they spread over workers."""
    if device != "cuda":
        return device
    import torch

    n = torch.cuda.device_count()
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % n}" if n > 1 else device


def evaluate_task(t: EvalTask) -> dict:
    """One task's results line, written as the task's marker."""
    device = _device(t.device)
    key = (t.model, t.pretrained, device)
    if key not in _CONTEXT:
        from winnow.pipeline.models.registry import load

        _CONTEXT.clear()
        _CONTEXT[key] = Context(*load(t.model, t.pretrained, device=device), device=device)
    metrics, samples = run_task_samples(t.task, _CONTEXT[key])
    if samples is not None:
        with fsio.atomic_open(samples_path(t.out, t.task.name)) as f:
            np.save(f, samples)

    line = {"key": t.task.key or t.task.name, "dataset": t.task.name,
            "metrics": {**metrics, "main_metric": metrics.get(t.task.main_metric) if t.task.main_metric else None},
            DATA: {"fingerprint": fingerprint(t.task.data),
                   "items": None if samples is None else int(len(samples))}}
    return line


def evaluate(model_name: str, pretrained: str, tasks: list[Task], out: str, device: str = "auto",
             overwrite: bool = False, log=print, runner=None) -> dict:
    """Evaluate one model on every task that can run here (``Task.missing`` ones are named and left out); write
    ``eval_results.jsonl`` and ``summary.json`` into ``out``. With a ``runner`` the tasks spread over its workers
    (each loads the model once; on several GPUs, one GPU per worker), the largest first."""
    missing = [t for t in tasks if t.missing]
    tasks = [t for t in tasks if not t.missing]
    from winnow.pipeline.models.registry import check, default_device, resolve_model, weights_reachable

    model_name = resolve_model(model_name, pretrained)
    if "://" not in pretrained and not check(model_name, pretrained) and pretrained:
        weights_reachable(model_name, pretrained)  # one line now, not a minute of retries per task
    device = default_device() if device == "auto" else device
    stage = Stage("evaluate", out, {"model": model_name, "pretrained": pretrained, "tasks": [asdict(t) for t in tasks]},
                  inputs=[pretrained] if os.path.isfile(pretrained) else [], overwrite=overwrite, log=log,
                  runner=runner)
    if stage.done:
        return fsio.read_json(os.path.join(out, "summary.json"))
    units = [EvalTask(model_name, pretrained, device, t, out) for t in tasks]
    done = sum(fsio.exists(u.marker) for u in units)

    def run_one(unit: EvalTask) -> dict:  # progress as tasks finish
        nonlocal done
        line = evaluate_task(unit)
        done += 1
        log(f"evaluate: {done}/{len(units)} tasks ({unit.task.name} {_fmt(line['metrics']['main_metric'])})")
        return line

    if runner is None:
        lines = stage.map(run_one, units, label="evaluate", unit="tasks")
    else:  # the largest tasks first, so that the workers finish together
        order = sorted(range(len(units)), key=lambda i: -units[i].task.size)
        by_size = stage.map(evaluate_task, [units[i] for i in order], label="evaluate", unit="tasks")
        lines = [line for _, line in sorted(zip(order, by_size))]
    _CONTEXT.clear()
    mains = [line["metrics"]["main_metric"] for line in lines]
    for task, main in zip(tasks, mains):
        log(f"evaluate: {task.name}: {task.main_metric or 'no main metric'} = {_fmt(main)} (random "
            f"{task.random_score:.4f})" + (" [diagnostic]" if task.diagnostic else ""))
    curves = summarize(tasks, mains)
    summary = {"model": model_name, "pretrained": pretrained, "average": average_of(tasks, mains),
               "averaged": sum(1 for t, m in zip(tasks, mains) if not t.diagnostic and m is not None),
               "tasks": {t.name: main for t, main in zip(tasks, mains)}}
    if missing:
        summary["missing"] = {t.name: t.missing for t in missing}
    if curves:
        summary["curves"] = curves
    summary["details"] = {t.name: {"key": t.key or t.name, "kind": t.kind, "data": t.data,
                                   "main_metric": t.main_metric, "random_score": t.random_score,
                                   "diagnostic": t.diagnostic, "samples": samples_path("", t.name),
                                   **(line.get(DATA) or {})} for t, line in zip(tasks, lines)}
    fsio.write_bytes(os.path.join(out, "eval_results.jsonl"), "".join(
        json.dumps({k: v for k, v in line.items() if k != DATA}) + "\n" for line in lines).encode())
    fsio.write_json(os.path.join(out, "summary.json"), summary)
    stage.finish(rows={"tasks": len(tasks)}, average=summary["average"])
    average = "none (every task is a diagnostic)" if summary["average"] is None else f"{summary['average']:.4f}"
    log(f"evaluate: average of the main metrics of the {summary['averaged']} non-diagnostic tasks = {average} -> {out}")
    if missing:
        log(f"evaluate: {len(missing)} task(s) of the list were not in the data folder ("
            f"{', '.join(missing_names(missing))}): this average is not the task list's")
    return summary


def missing_names(tasks: list[Task], shown: int = 5) -> list[str]:
    names = [t.name for t in tasks]
    return names[:shown] + ([f"{len(names) - shown} more"] if len(names) > shown else [])


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
