"""Image-text retrieval: pair i is (image i, caption i); recall@{1,5,10} for image->text and text->image and
their means (DataComp's main retrieval metric is ``mean_recall@1``). A tie with the true match is not a miss."""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import UserError
from pipeline.data.evalsets import read_evalset
from pipeline.models.encode import embed_images, encode_texts

KIND = "retrieval"
METRICS = tuple(f"{d}_recall@{k}" for d in ("image_retrieval", "text_retrieval", "mean") for k in (1, 5, 10))


def metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    sims = image_emb @ text_emb.T
    target = np.arange(len(sims))
    out = {}
    for direction, s in (("image_retrieval", sims.T), ("text_retrieval", sims)):  # query rows
        true = s[target, target][:, None]
        rank = (s > true).sum(axis=1)  # candidates scoring strictly higher than the true match
        for k in ks:
            out[f"{direction}_recall@{k}"] = float((rank < k).mean())
    for k in ks:
        out[f"mean_recall@{k}"] = 0.5 * (out[f"image_retrieval_recall@{k}"] + out[f"text_retrieval_recall@{k}"])
    return out


def run(task, ctx) -> dict[str, float]:
    data = read_evalset(task.data)
    if any(c is None for c in data["captions"]):
        raise UserError(f"task {task.name}: {task.data} needs a .txt caption per image for retrieval")
    image_emb = embed_images(ctx.model, ctx.preprocess, data["images"], ctx.device)
    return metrics(image_emb, encode_texts(ctx.model, ctx.tokenizer, data["captions"], ctx.device))
