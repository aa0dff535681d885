"""Zero-shot classification: one classifier row per class (the mean of the class's normalised template
embeddings, renormalised: CLIP's recipe); ``acc1``, ``acc5`` (with at least 5 classes) and
``mean_per_class_recall``."""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import UserError
from pipeline.data.evalsets import read_evalset
from pipeline.models.encode import embed_images, encode_texts

KIND = "zeroshot_classification"
METRICS = ("acc1", "acc5", "mean_per_class_recall")


def classifier(model, tokenizer, classnames: list[str], templates: list[str], device: str) -> np.ndarray:
    """(n_classes, d): mean of each class's normalised template embeddings, renormalised."""
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, device).reshape(len(classnames), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def metrics(image_emb: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    logits = image_emb @ weights.T
    order = np.argsort(-logits, axis=1)
    out = {"acc1": float((order[:, 0] == labels).mean())}
    if weights.shape[0] >= 5:
        out["acc5"] = float((order[:, :5] == labels[:, None]).any(axis=1).mean())
    pred = order[:, 0]
    out["mean_per_class_recall"] = float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))
    return out


def run(task, ctx) -> dict[str, float]:
    data = read_evalset(task.data)
    if not data["classnames"] or (data["labels"] < 0).any():
        raise UserError(f"task {task.name}: {task.data} needs classnames.txt and a .cls label per image")
    key = (KIND, tuple(data["classnames"]), tuple(data["templates"]))  # shared by sets of one source
    if key not in ctx.cache:
        ctx.cache[key] = classifier(ctx.model, ctx.tokenizer, data["classnames"], data["templates"], ctx.device)
    return metrics(embed_images(ctx.model, ctx.preprocess, data["images"], ctx.device), ctx.cache[key],
                   data["labels"])
