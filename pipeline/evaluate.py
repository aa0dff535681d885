"""The evaluation harness: a task list (YAML, DataComp ``tasklist.yml`` style) run against one open_clip model.

Task list::

    tasks:
      - name: synthetic-shapes            # shown in results
        kind: zeroshot_classification     # or retrieval
        data: runs/demo/world/eval        # an eval set folder (see below); ${var} placeholders allowed
        main_metric: acc1                 # acc1, acc5, mean_per_class_recall | image_retrieval_recall@1, ...
        random_score: 0.0833

An eval set folder holds ``test/*.tar`` (WebDataset: ``<key>.jpg`` or ``.png``/``.webp``, ``<key>.cls`` with the
integer label, ``<key>.txt`` with a caption for retrieval), ``classnames.txt`` and
``zeroshot_classification_templates.txt`` (clip_benchmark's export layout, which DataComp's eval sets use).

Zero-shot classification builds one classifier row per class (mean of the normalised template embeddings,
renormalised) and reports ``acc1``, ``acc5`` (when there are at least 5 classes) and ``mean_per_class_recall``.
Retrieval reports recall@{1,5,10} for image->text and text->image and their means (DataComp's main retrieval
metric is ``mean_recall@1``). ``odd_one_out`` (DiST, :mod:`pipeline.dist`) reports the share of triplets whose
odd one by image embeddings is the original (``acc``, chance 1/3) with a bootstrap 95% interval. The average is
the unweighted mean of the tasks' main metrics (a curve of tasks counts once, by its area).
"""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass

import numpy as np

from . import fsio
from .config import parse_yaml
from .errors import UserError

KINDS = ("zeroshot_classification", "retrieval", "odd_one_out")


@dataclass
class Task:
    name: str
    kind: str
    data: str
    main_metric: str
    random_score: float = 0.0
    curve: str = ""  # tasks sharing a curve are points (x, main metric) of one curve, summarised by its area
    x: float = 0.0


def load_tasklist(path: str, variables: dict[str, str] | None = None) -> list[Task]:
    from .select import substitute

    if not os.path.isfile(path):
        raise UserError(f"task list not found: {path}")
    doc = parse_yaml(substitute(open(path).read(), variables or {}, os.path.basename(path)), f"task list {path}") or {}
    if not isinstance(doc, dict):
        raise UserError(f"task list {path} must hold a mapping with a tasks list")
    tasks = []
    for i, entry in enumerate(doc.get("tasks") or []):
        unknown = set(entry) - {"name", "kind", "data", "main_metric", "random_score", "curve", "x"}
        if unknown or not {"name", "kind", "data", "main_metric"} <= set(entry):
            raise UserError(f"{path}: task {i} needs name, kind, data, main_metric (and optional random_score)")
        if entry["kind"] not in KINDS:
            raise UserError(f"{path}: task {entry['name']!r} kind must be one of {', '.join(KINDS)}")
        tasks.append(Task(**entry))
    if not tasks:
        raise UserError(f"{path} lists no tasks")
    return tasks


def read_evalset(folder: str) -> dict:
    """Images (encoded bytes), labels, captions, class names and templates of an eval set folder."""
    tars = sorted(glob.glob(os.path.join(folder, "test", "*.tar")))
    if not tars:
        raise UserError(f"eval set {folder} has no test/*.tar shards")
    from .shards import image_bytes, iter_tar

    images, labels, captions = [], [], []
    for tar in tars:
        for s in iter_tar(tar):
            data = image_bytes(s)
            if data is None:
                continue
            images.append(data)
            labels.append(int(s["cls"]) if "cls" in s else -1)
            captions.append(s["txt"].decode() if "txt" in s else None)
    read = lambda name: [ln.strip() for ln in open(os.path.join(folder, name)) if ln.strip()]  # noqa: E731
    classnames = read("classnames.txt") if os.path.exists(os.path.join(folder, "classnames.txt")) else []
    templates = read("zeroshot_classification_templates.txt") if os.path.exists(
        os.path.join(folder, "zeroshot_classification_templates.txt")) else ["a photo of a {c}."]
    return {"images": images, "labels": np.array(labels), "captions": captions, "classnames": classnames,
            "templates": templates}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_labeled(source: str) -> dict:
    """A labeled image source for building eval sets: an eval set folder (``test/*.tar``, see above) or an image
    folder with one sub-folder per class (ImageNet's val layout; class names are the sub-folder names).
    Returns :func:`read_evalset`'s dict; every image must have a label."""
    if not os.path.isdir(source):
        raise UserError(f"labeled source not found: {source} (an eval set folder or a folder of class folders)")
    if glob.glob(os.path.join(source, "test", "*.tar")):
        data = read_evalset(source)
    else:
        classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
        images, labels = [], []
        for label, name in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(source, name))):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    images.append(open(os.path.join(source, name, f), "rb").read())
                    labels.append(label)
        if not images:
            raise UserError(f"{source} has neither test/*.tar shards nor class folders of images")
        data = {"images": images, "labels": np.array(labels), "captions": [None] * len(images),
                "classnames": classes, "templates": ["a photo of a {c}."]}
    if (data["labels"] < 0).any() or len(set(data["labels"].tolist())) < 2:
        raise UserError(f"{source}: needs a .cls label per image and at least two classes")
    return data


def per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` images of every class, in the source's order (all when n <= 0)."""
    if n <= 0:
        return np.arange(len(labels))
    seen: dict[int, int] = {}
    keep = []
    for i, lab in enumerate(labels.tolist()):
        if seen.get(lab, 0) < n:
            seen[lab] = seen.get(lab, 0) + 1
            keep.append(i)
    return np.array(keep, int)


def write_evalset_meta(folder: str, classnames: list[str], templates: list[str]) -> None:
    """The class names and templates files of an eval set folder (clip_benchmark layout)."""
    fsio.write_bytes(os.path.join(folder, "classnames.txt"), "".join(c + "\n" for c in classnames).encode())
    fsio.write_bytes(os.path.join(folder, "zeroshot_classification_templates.txt"),
                     "".join(t + "\n" for t in templates).encode())


def encode_images(model, preprocess, images: list[bytes], device: str, batch_size: int = 128) -> np.ndarray:
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[s: s + batch_size]])
            out.append(model.encode_image(x.to(device), normalize=True).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def encode_texts(model, tokenizer, texts: list[str], device: str, batch_size: int = 256) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            out.append(model.encode_text(tokenizer(texts[s: s + batch_size]).to(device), normalize=True)
                       .float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def classifier(model, tokenizer, classnames: list[str], templates: list[str], device: str) -> np.ndarray:
    """(n_classes, d): mean of each class's normalised template embeddings, renormalised (CLIP's recipe)."""
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, device).reshape(len(classnames), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def zeroshot_metrics(image_emb: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    logits = image_emb @ weights.T
    order = np.argsort(-logits, axis=1)
    metrics = {"acc1": float((order[:, 0] == labels).mean())}
    if weights.shape[0] >= 5:
        metrics["acc5"] = float((order[:, :5] == labels[:, None]).any(axis=1).mean())
    pred = order[:, 0]
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    metrics["mean_per_class_recall"] = float(np.mean(recalls))
    return metrics


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Pair i is (image i, caption i). Recall@k in both directions and their means."""
    sims = image_emb @ text_emb.T
    target = np.arange(len(sims))
    metrics = {}
    for direction, s in (("image_retrieval", sims.T), ("text_retrieval", sims)):  # query rows
        # rank of the true match = number of candidates scoring strictly higher
        true = s[target, target][:, None]
        rank = (s > true).sum(axis=1)
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = float((rank < k).mean())
    for k in ks:
        metrics[f"mean_recall@{k}"] = 0.5 * (metrics[f"image_retrieval_recall@{k}"] +
                                             metrics[f"text_retrieval_recall@{k}"])
    return metrics


def run_task(task: Task, model, preprocess, tokenizer, device: str, cache: dict | None = None) -> dict[str, float]:
    """One task's metrics; ``cache`` (shared over one model's tasks) keeps zero-shot classifiers, which the
    many eval sets built from one source (Patch Mixing's conditions) share."""
    if task.kind == "odd_one_out":  # DiST: (original, synth A, synth B) triplets, image embeddings only
        from .dist import odd_one_out_metrics, read_triplets

        triplets, _ = read_triplets(task.data)
        emb = encode_images(model, preprocess, [b for t in triplets for b in t], device)
        metrics = odd_one_out_metrics(emb.reshape(len(triplets), 3, -1))
    else:
        data = read_evalset(task.data)
        image_emb = encode_images(model, preprocess, data["images"], device)
        if task.kind == "zeroshot_classification":
            if not data["classnames"] or (data["labels"] < 0).any():
                raise UserError(f"task {task.name}: {task.data} needs classnames.txt and a .cls label per image")
            key = (tuple(data["classnames"]), tuple(data["templates"]))
            cache = {} if cache is None else cache
            if key not in cache:
                cache[key] = classifier(model, tokenizer, data["classnames"], data["templates"], device)
            weights = cache[key]
            metrics = zeroshot_metrics(image_emb, weights, data["labels"])
        else:
            if any(c is None for c in data["captions"]):
                raise UserError(f"task {task.name}: {task.data} needs a .txt caption per image for retrieval")
            metrics = retrieval_metrics(image_emb, encode_texts(model, tokenizer, data["captions"], device))
    if task.main_metric not in metrics:
        raise UserError(f"task {task.name}: main_metric {task.main_metric!r} is not one of {', '.join(metrics)}")
    return metrics


def curve_summaries(tasks: list[Task], mains: list[float]) -> dict[str, dict]:
    """Per curve: its points in x order and the normalised area under it (Patch Mixing's summary metric)."""
    from .patchmix import area_under_curve

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


def evaluate(model_name: str, pretrained: str, tasks: list[Task], out: str, device: str = "auto",
             log=print) -> dict:
    """Evaluate one model on every task; write ``eval_results.jsonl`` (one line per task) and ``summary.json``."""
    import json

    from .models import default_device, load

    device = default_device() if device == "auto" else device
    model, preprocess, tokenizer = load(model_name, pretrained, device=device)
    lines, mains, cache = [], [], {}
    for task in tasks:
        metrics = run_task(task, model, preprocess, tokenizer, device, cache)
        main = metrics[task.main_metric]
        mains.append(main)
        lines.append({"key": task.name, "dataset": task.data, "kind": task.kind,
                      "metrics": {**metrics, "main_metric": main}, "random_score": task.random_score})
        log(f"evaluate: {task.name}: {task.main_metric} = {main:.4f} (random {task.random_score:.4f})")
    curves = curve_summaries(tasks, mains)
    # a curve counts once in the average, by its area; other tasks by their main metric
    plain = [m for t, m in zip(tasks, mains) if not t.curve]
    summary = {"model": model_name, "pretrained": pretrained,
               "average": float(np.mean(plain + [c["auc"] for c in curves.values()])),
               "tasks": {line["key"]: line["metrics"]["main_metric"] for line in lines}}
    if curves:
        summary["curves"] = curves
    fsio.write_bytes(os.path.join(out, "eval_results.jsonl"),
                     "".join(json.dumps(line) + "\n" for line in lines).encode())
    fsio.write_json(os.path.join(out, "summary.json"), summary)
    log(f"evaluate: average of main metrics = {summary['average']:.4f} -> {out}")
    return summary
