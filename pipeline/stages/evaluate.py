"""``winnow evaluate``: one open_clip model on a task list (:mod:`pipeline.tasks`).

A stage whose units are the tasks: each task's result is written as ``tasks/<name>.json`` when it is done, so an
interrupted evaluation resumes at the next task, and the same model on the same task list is not evaluated twice.
Writes ``eval_results.jsonl`` (one line per task: key, dataset, kind, metrics with ``main_metric``, random score)
and ``summary.json`` (every task's main metric, the curves with their areas, and the average: plain tasks by
their main metric, each curve once by its area).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Literal

from pipeline.core import fsio
from pipeline.run.stage import Stage
from pipeline.tasks import Context, Task, run_task
from pipeline.tasks.curves import average, summarize

@dataclass
class EvaluateConfig:
    """``model``: the open_clip architecture of the checkpoint; ``device``: auto (CUDA when present), cpu, cuda."""

    model: str = "winnow-tiny-clip"
    device: Literal["auto", "cpu", "cuda"] = "auto"


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
        return os.path.join(self.out, "tasks", re.sub(r"[^\w.-]", "_", self.task.name) + ".json")


def evaluate_task(t: EvalTask) -> dict:
    """One task's results line, written as the task's marker."""
    key = (t.model, t.pretrained, t.device)
    if key not in _CONTEXT:
        from pipeline.models.registry import load

        _CONTEXT.clear()
        _CONTEXT[key] = Context(*load(t.model, t.pretrained, device=t.device), device=t.device)
    metrics = run_task(t.task, _CONTEXT[key])
    line = {"key": t.task.name, "dataset": t.task.data, "kind": t.task.kind,
            "metrics": {**metrics, "main_metric": metrics[t.task.main_metric]}, "random_score": t.task.random_score}
    fsio.write_json(t.marker, line)
    return line


def evaluate(model_name: str, pretrained: str, tasks: list[Task], out: str, device: str = "auto",
             overwrite: bool = False, log=print) -> dict:
    """Evaluate one model on every task; write ``eval_results.jsonl`` and ``summary.json`` into ``out``."""
    from pipeline.models.registry import default_device

    device = default_device() if device == "auto" else device
    stage = Stage("evaluate", out, {"model": model_name, "pretrained": pretrained, "tasks": [asdict(t) for t in tasks]},
                  inputs=[pretrained] if os.path.isfile(pretrained) else [], overwrite=overwrite, log=log)
    if stage.done:
        return fsio.read_json(os.path.join(out, "summary.json"))
    lines = stage.map(evaluate_task, [EvalTask(model_name, pretrained, device, t, out) for t in tasks],
                      label="evaluate", unit="tasks")
    _CONTEXT.clear()
    mains = [line["metrics"]["main_metric"] for line in lines]
    for task, main in zip(tasks, mains):
        log(f"evaluate: {task.name}: {task.main_metric} = {main:.4f} (random {task.random_score:.4f})")
    curves = summarize(tasks, mains)
    summary = {"model": model_name, "pretrained": pretrained, "average": average(tasks, mains, curves),
               "tasks": {line["key"]: line["metrics"]["main_metric"] for line in lines}}
    if curves:
        summary["curves"] = curves
    fsio.write_bytes(os.path.join(out, "eval_results.jsonl"),
                     "".join(json.dumps(line) + "\n" for line in lines).encode())
    fsio.write_json(os.path.join(out, "summary.json"), summary)
    stage.finish(rows={"tasks": len(tasks)}, average=summary["average"])
    log(f"evaluate: average of main metrics = {summary['average']:.4f} -> {out}")
    return summary
