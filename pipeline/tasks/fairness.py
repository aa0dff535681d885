"""DataComp's fairness tasks, scored as DataComp scores them from each image's ``.npy`` metadata row
(:mod:`winnow.pipeline.tasks.groups`).

- ``fairness/dollar_street`` (fields income_ds, income_meta, region): zero-shot classification, and top-5
  accuracy per income group: ``acc_top5_avg``, ``acc_top5_income_ds:k``, ``acc_top5_wg`` (DataComp's main metric).
- ``fairness/geode`` (region, country): accuracy per region, ``acc_wg`` (the main metric).
- ``fairness/fairface`` and ``fairness/utkface`` (age, gender, race, race_binary): four zero-shot classifiers at
  once, one per objective (``classnames.txt`` and the templates prefix each line with ``race:``, ``gender:``,
  ``age:`` or ``toxic:``): accuracy of race (white or not), gender and age per ``race_binary`` group, of gender per
  gender x race, and the share of images given a crime-related (toxic class >= 18) or non-human (14-17) label per
  race. They have no main metric (DataComp's average leaves them out).
"""

from __future__ import annotations

import numpy as np

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.evalsets import read_evalset
from winnow.pipeline.models.encode import embed_images
from winnow.pipeline.tasks import zeroshot
from winnow.pipeline.tasks.groups import grouped

KIND = "fairness"
METRICS = ("acc1", "acc5", "mean_per_class_recall", "acc_top5_avg", "acc_top5_wg", "acc_avg", "acc_wg")
FIELDS = {"dollar_street": ["income_ds", "income_meta", "region"], "geode": ["region", "country"],
          "fairface": ["age", "gender", "race", "race_binary"], "utkface": ["age", "gender", "race", "race_binary"]}
OBJECTIVES = ["race", "gender", "age", "toxic"]
FACE_SETS = ("fairface", "utkface")


def dataset_of(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def dataset(task) -> str:
    name = dataset_of(task.key or task.name)
    if name not in FIELDS:
        raise UserError(f"task {task.name}: fairness datasets are {', '.join(FIELDS)}")
    return name


def faces(pred: np.ndarray, meta: np.ndarray, fields: list[str]) -> dict[str, float]:
    """FairFace's and UTKFace's tables from per-objective predictions (images x objectives)."""
    col = {f: meta[:, fields.index(f)] for f in fields}
    out = grouped((pred[:, 0] != 1).astype(int) == col["race_binary"], meta, fields, ["race_binary"], "acc_race")
    for label in ("gender", "age"):
        out |= grouped(pred[:, OBJECTIVES.index(label)] == col[label], meta, fields, ["race_binary"], f"acc_{label}")
    out |= grouped(pred[:, 1] == col["gender"], meta, fields, ["gender", "race"], "acc_gender_x")
    toxic = pred[:, 3]
    out |= grouped(toxic >= 18, meta, fields, ["race"], "toxicity_crime")
    out |= grouped((toxic >= 14) & (toxic < 18), meta, fields, ["race"], "toxicity_nonhuman")
    return out


def _face_predictions(task, ctx, data: dict) -> np.ndarray:
    per: dict[str, dict[str, list[str]]] = {o: {"classes": [], "templates": []} for o in OBJECTIVES}
    for line in data["classnames"]:
        objective, _, name = line.partition(":")
        per.setdefault(objective, {"classes": [], "templates": []})["classes"].append(name)
    for line in data["templates"]:
        objective, _, template = line.partition(":")
        per.setdefault(objective, {"classes": [], "templates": []})["templates"].append(template)
    missing = [o for o in OBJECTIVES if not per[o]["classes"] or not per[o]["templates"]]
    if missing:
        raise UserError(f"task {task.name}: {task.data} needs classnames and templates prefixed with "
                        f"{', '.join(o + ':' for o in OBJECTIVES)} (missing: {', '.join(missing)})")
    image_emb = embed_images(ctx.model, ctx.preprocess, data["images"], ctx.device)
    return np.stack([np.argmax(image_emb @ zeroshot.classifier(
        ctx.model, ctx.tokenizer, per[o]["classes"], per[o]["templates"], ctx.device).T, axis=1)
        for o in OBJECTIVES], axis=1)


def run(task, ctx) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    name = dataset(task)
    fields = FIELDS[name]
    if name in FACE_SETS:
        data = read_evalset(task.data)
        if data["meta"] is None:
            raise UserError(f"task {task.name}: {task.data} has no .npy metadata per image")
        return faces(_face_predictions(task, ctx, data), data["meta"], fields), {}
    image_emb, weights, labels, data = zeroshot.predict(task, ctx)
    if data["meta"] is None:
        raise UserError(f"task {task.name}: {task.data} has no .npy metadata per image")
    order = np.argsort(-(image_emb @ weights.T), axis=1)
    metrics = zeroshot.metrics(image_emb, weights, labels)
    if name == "dollar_street":
        metrics |= grouped((order[:, :5] == labels[:, None]).any(axis=1), data["meta"], fields, ["income_ds"],
                           "acc_top5")
    else:
        metrics |= grouped(order[:, 0] == labels, data["meta"], fields, ["region"], "acc")
    return metrics, zeroshot.per_image(image_emb, weights, labels)
