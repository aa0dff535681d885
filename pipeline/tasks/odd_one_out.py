"""DiST's odd-one-out test (:mod:`winnow.pipeline.evalsets.dist`): embed (original, synth A, synth B), L2-normalise,
``odd = argmin_i sum_{j != i} cos(e_i, e_j)``; a trial is right when the odd one is the original (chance 1/3).
``acc`` comes with a bootstrap 95% interval. A diagnostic: reported beside a model's average, never in it; the
eval item of its per-item outcomes is the triplet (its credit)."""

from __future__ import annotations

import numpy as np

from winnow.pipeline.data.evalsets import read_triplets
from winnow.pipeline.models.encode import embed_images

KIND = "odd_one_out"
METRICS = ("acc", "acc_ci_low", "acc_ci_high", "n")
DIAGNOSTIC = True


def odd_one_out(emb: np.ndarray) -> np.ndarray:
    """Credit per trial for (n, 3, d) embeddings: 1 when the odd one is the original, 0 otherwise, 1/k when the
    original is one of k tied minima (a model that sees no difference scores chance, not a lucky first index)."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=2, keepdims=True), 1e-12)
    sims = np.einsum("nid,njd->nij", e, e)
    total = sims.sum(axis=2) - np.einsum("nii->ni", sims)
    tied = total <= total.min(axis=1, keepdims=True) + 1e-6
    return tied[:, 0] / tied.sum(axis=1)


def metrics(emb: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict[str, float]:
    """Accuracy (odd one = original; chance 1/3) with a bootstrap 95% interval."""
    credit = odd_one_out(emb)
    boot = np.random.default_rng(seed).choice(credit, (n_boot, len(credit))).mean(axis=1)
    return {"acc": float(credit.mean()), "acc_ci_low": float(np.quantile(boot, 0.025)),
            "acc_ci_high": float(np.quantile(boot, 0.975)), "n": int(len(credit))}


def run(task, ctx) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    triplets, _ = read_triplets(task.data)
    emb = embed_images(ctx.model, ctx.preprocess, [b for t in triplets for b in t], ctx.device)
    emb = emb.reshape(len(triplets), 3, -1)
    return metrics(emb), {"acc": odd_one_out(emb)}
