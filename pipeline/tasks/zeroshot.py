"""Zero-shot classification: one classifier row per class (the mean of the class's normalised template
embeddings, renormalised: CLIP's recipe); ``acc1``, ``acc5`` (with at least 5 classes) and
``mean_per_class_recall`` (clip_benchmark's and DataComp's metrics).

Per image (:func:`per_image`): 1.0 when the top-1 (top-5) prediction is right, else 0; for
``mean_per_class_recall`` that credit weighted by ``n / (classes * n_c)`` (n images, ``classes`` present among
the labels, ``n_c`` images of the image's class), so the mean over images is the mean of the per-class recalls.

Per class (:func:`per_class`): ``acc1_class_<name>``, the top-1 accuracy on the images of that class (its recall),
for every class with images; extra keys of the results line's ``metrics`` (DataComp's tools read ``main_metric``),
so a report can compare frequent and rare classes of the training data."""

from __future__ import annotations

import numpy as np

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.evalsets import read_evalset
from winnow.pipeline.models.encode import embed_images, encode_texts

KIND = "zeroshot_classification"
METRICS = ("acc1", "acc5", "mean_per_class_recall")
CLASS_PREFIX = "acc1_class_"


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


def per_image(image_emb: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric, each image's part of it (see the module's docstring): the mean over images is the metric."""
    order = np.argsort(-(image_emb @ weights.T), axis=1)
    top1 = (order[:, 0] == labels).astype(float)
    classes, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    out = {"acc1": top1, "mean_per_class_recall": top1 * len(labels) / (len(classes) * counts[index])}
    if weights.shape[0] >= 5:
        out["acc5"] = (order[:, :5] == labels[:, None]).any(axis=1).astype(float)
    return out


def per_class(image_emb: np.ndarray, weights: np.ndarray, labels: np.ndarray,
              classnames: list[str]) -> dict[str, float]:
    """``acc1_class_<name>``: top-1 accuracy on each class's images, for the classes present among ``labels``."""
    pred = np.argsort(-(image_emb @ weights.T), axis=1)[:, 0]  # as in metrics: the same pick among ties
    return {f"{CLASS_PREFIX}{classnames[c]}": float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


def predict(task, ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The image embeddings, class weights and labels of a labeled eval set, and the set itself (its ``meta``)."""
    data = read_evalset(task.data)
    if not data["classnames"] or (data["labels"] < 0).any():
        raise UserError(f"task {task.name}: {task.data} needs classnames.txt and a .cls label per image")
    key = (KIND, tuple(data["classnames"]), tuple(data["templates"]))  # shared by sets of one source
    if key not in ctx.cache:
        ctx.cache[key] = classifier(ctx.model, ctx.tokenizer, data["classnames"], data["templates"], ctx.device)
    image_emb = embed_images(ctx.model, ctx.preprocess, data["images"], ctx.device)
    return image_emb, ctx.cache[key], data["labels"], data


def run(task, ctx) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    image_emb, weights, labels, data = predict(task, ctx)
    return ({**metrics(image_emb, weights, labels), **per_class(image_emb, weights, labels, data["classnames"])},
            per_image(image_emb, weights, labels))
