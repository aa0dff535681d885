"""Curves: tasks that share a ``curve`` are its points (x, main metric), summarised by the normalised area
under them (Patch Mixing's summary metric). Curves are diagnostics: reported beside a model's average
(:func:`winnow.pipeline.tasks.average_of`), never in it."""

from __future__ import annotations

import numpy as np


def area_under_curve(xs: list[float], ys: list[float]) -> float:
    """Trapezoidal area under an accuracy curve, normalised by the x range (so a flat curve at a gives a)."""
    xs_a, ys_a = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(xs_a)
    xs_a, ys_a = xs_a[order], ys_a[order]
    if len(xs_a) < 2 or xs_a[-1] == xs_a[0]:
        return float(ys_a.mean()) if len(ys_a) else float("nan")
    widths = np.diff(xs_a)
    return float(((ys_a[1:] + ys_a[:-1]) / 2 * widths).sum() / (xs_a[-1] - xs_a[0]))


def trapezoid_weights(xs: list[float]) -> np.ndarray:
    """Weights w (summing to 1) with sum(w * y) == :func:`area_under_curve` (xs, y) for any y: the area is a
    weighted mean of the points, so its interval comes from the same bootstrap as a plain mean's."""
    xs_a = np.asarray(xs, float)
    order = np.argsort(xs_a)
    sx, w = xs_a[order], np.zeros(len(xs_a))
    if len(sx) < 2 or sx[-1] == sx[0]:
        return np.full(len(xs_a), 1 / max(len(xs_a), 1))
    widths = np.diff(sx) / (sx[-1] - sx[0])
    w_sorted = np.zeros(len(sx))
    w_sorted[:-1] += widths / 2
    w_sorted[1:] += widths / 2
    w[order] = w_sorted
    return w


def summarize(tasks: list, mains: list[float]) -> dict[str, dict]:
    """Per curve: its points in x order and their area."""
    curves: dict[str, dict] = {}
    for task, main in zip(tasks, mains):
        if task.curve:
            c = curves.setdefault(task.curve, {"x": [], "y": []})
            c["x"].append(task.x)
            c["y"].append(main)
    for c in curves.values():
        order = np.argsort(c["x"])
        c["x"] = [float(c["x"][i]) for i in order]
        c["y"] = [float(c["y"][i]) for i in order]
        c["auc"] = area_under_curve(c["x"], c["y"])
    return curves
