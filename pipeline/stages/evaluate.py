"""``winnow evaluate``: one open_clip model on a task list (:mod:`pipeline.tasks`).

Writes ``eval_results.jsonl`` (one line per task: key, dataset, kind, metrics with ``main_metric``, random score)
and ``summary.json`` (every task's main metric, the curves with their areas, and the average: plain tasks by their
main metric, each curve once by its area).
"""

from __future__ import annotations

import json
import os

from pipeline.core import fsio
from pipeline.tasks import Context, Task, run_task
from pipeline.tasks.curves import average, summarize


def evaluate(model_name: str, pretrained: str, tasks: list[Task], out: str, device: str = "auto",
             log=print) -> dict:
    """Evaluate one model on every task; write ``eval_results.jsonl`` and ``summary.json`` into ``out``."""
    from pipeline.models.registry import default_device, load

    device = default_device() if device == "auto" else device
    ctx = Context(*load(model_name, pretrained, device=device), device=device)
    lines, mains = [], []
    for task in tasks:
        metrics = run_task(task, ctx)
        main = metrics[task.main_metric]
        mains.append(main)
        lines.append({"key": task.name, "dataset": task.data, "kind": task.kind,
                      "metrics": {**metrics, "main_metric": main}, "random_score": task.random_score})
        log(f"evaluate: {task.name}: {task.main_metric} = {main:.4f} (random {task.random_score:.4f})")
    curves = summarize(tasks, mains)
    summary = {"model": model_name, "pretrained": pretrained, "average": average(tasks, mains, curves),
               "tasks": {line["key"]: line["metrics"]["main_metric"] for line in lines}}
    if curves:
        summary["curves"] = curves
    fsio.write_bytes(os.path.join(out, "eval_results.jsonl"),
                     "".join(json.dumps(line) + "\n" for line in lines).encode())
    fsio.write_json(os.path.join(out, "summary.json"), summary)
    log(f"evaluate: average of main metrics = {summary['average']:.4f} -> {out}")
    return summary
