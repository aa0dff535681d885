"""DataComp's WILDS tasks: zero-shot classification of iWildCam, Camelyon17 and FMoW, with the WILDS metrics
DataComp adds from each image's ``.npy`` metadata row (:mod:`winnow.pipeline.tasks.groups`).

- ``wilds/iwildcam`` (fields location, sequence, year, month, day, hour, minute, second, y): ``acc_avg``,
  ``recall-macro_all``, ``F1-macro_all`` (DataComp's main metric).
- ``wilds/camelyon17`` (hospital, slide, y): accuracy per slide (``acc_slide:k``, ``acc_wg``); main metric acc1.
- ``wilds/fmow`` (region, year, y): accuracy per year (worst: ``acc_worst_year``) and per region; the main
  metric ``acc_worst_region`` is the worst region with images. As in DataComp, whose grouper has no region names,
  the "Other" region (5) is not set apart.

The classification metrics (acc1, acc5, mean_per_class_recall) are those of any zero-shot task. Per item, the
samples of a main metric that is a mean over images (acc1) are written; macro F1 and worst-group accuracy are
not means over images, so those tasks have no per-item samples.
"""

from __future__ import annotations

import numpy as np

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.tasks import zeroshot
from winnow.pipeline.tasks.groups import grouped, macro

KIND = "wilds"
METRICS = ("acc1", "acc5", "mean_per_class_recall", "acc_avg", "recall-macro_all", "F1-macro_all", "acc_wg",
           "acc_worst_year", "acc_worst_region")
FIELDS = {"iwildcam": ["location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"],
          "camelyon17": ["hospital", "slide", "y"], "fmow": ["region", "year", "y"]}


def dataset(task) -> str:
    name = (task.key or task.name).rsplit("/", 1)[-1]
    if name not in FIELDS:
        raise UserError(f"task {task.name}: wilds datasets are {', '.join(FIELDS)}")
    return name


def wilds_metrics(name: str, pred: np.ndarray, labels: np.ndarray, meta: np.ndarray) -> dict[str, float]:
    fields, correct = FIELDS[name], (pred == labels).astype(float)
    if name == "iwildcam":
        recall, f1 = macro(labels, pred)
        return {"acc_avg": float(correct.mean()), "recall-macro_all": recall, "F1-macro_all": f1}
    if name == "camelyon17":
        return grouped(correct, meta, fields, ["slide"], "acc")
    out = grouped(correct, meta, fields, ["year"], "acc")
    out["acc_worst_year"] = out.pop("acc_wg")
    regions = grouped(correct, meta, fields, ["region"], "acc", average=False)
    out["acc_worst_region"] = regions.pop("acc_wg")
    return out | regions


def run(task, ctx) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    name = dataset(task)
    image_emb, weights, labels, data = zeroshot.predict(task, ctx)
    if data["meta"] is None:
        raise UserError(f"task {task.name}: {task.data} has no .npy metadata per image (a WILDS set needs it)")
    pred = np.argsort(-(image_emb @ weights.T), axis=1)[:, 0]
    metrics = zeroshot.metrics(image_emb, weights, labels) | wilds_metrics(name, pred, labels, data["meta"])
    return metrics, zeroshot.per_image(image_emb, weights, labels)
