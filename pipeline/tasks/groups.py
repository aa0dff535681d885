"""Metrics over groups of eval items, as the WILDS package computes them for DataComp (numpy, no WILDS needed).

A group is a combination of integer metadata fields (``income_ds``; ``gender`` and ``race``), numbered as WILDS'
``CombinatorialGrouper`` numbers them: each field takes ``0 .. max`` over the set, the first field varies
fastest, and a group is named ``field:value_field:value``. :func:`grouped` is WILDS' ``standard_group_eval`` of
an element-wise metric: its mean (``<name>_avg``), per group its mean (NaN when empty) and count, and the worst
(smallest) mean over the groups that have items (``<name>_wg``). :func:`macro` is WILDS' macro recall or F1:
scikit-learn's over the labels present in ``y_true``, 0 for a label never predicted.
"""

from __future__ import annotations

import numpy as np


def group_ids(metadata: np.ndarray, fields: list[str], by: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each item's group number and each group's name."""
    values = np.asarray(metadata)[:, [fields.index(f) for f in by]].astype(np.int64)
    card = values.max(axis=0) + 1
    factors = np.concatenate(([1], np.cumprod(card[:-1]))).astype(np.int64)
    names = ["_".join(f"{f}:{(g // factors[i]) % card[i]}" for i, f in enumerate(by)) for g in range(int(card.prod()))]
    return values @ factors, names


def grouped(correct: np.ndarray, metadata: np.ndarray, fields: list[str], by: list[str], name: str,
            average: bool = True) -> dict[str, float]:
    """WILDS' group evaluation of the element-wise ``correct`` (1.0 right, 0.0 wrong)."""
    correct = np.asarray(correct, float)
    groups, names = group_ids(metadata, fields, by)
    out = {f"{name}_avg": float(correct.mean())} if average else {}
    worst = []
    for g, label in enumerate(names):
        mask = groups == g
        n = int(mask.sum())
        out[f"{name}_{label}"] = float(correct[mask].mean()) if n else float("nan")
        out[f"count_{label}"] = float(n)
        if n:
            worst.append(out[f"{name}_{label}"])
    out[f"{name}_wg"] = float(min(worst))
    return out


def macro(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(macro recall, macro F1) over the labels present in ``y_true``."""
    recalls, f1s = [], []
    for c in np.unique(y_true):
        tp = float(((y_pred == c) & (y_true == c)).sum())
        true, predicted = float((y_true == c).sum()), float((y_pred == c).sum())
        recall = tp / true
        precision = tp / predicted if predicted else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(recalls)), float(np.mean(f1s))
