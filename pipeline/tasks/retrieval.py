"""Image-text retrieval as clip_benchmark's ``zeroshot_retrieval``: an image has one or more captions (one per line
of its ``.txt``). ``image_retrieval_recall@k`` (text -> image): every caption is a query, a hit when its image is in
the top k, averaged over captions; ``text_retrieval_recall@k`` (image -> text): a hit when any of the image's
captions is in the top k, averaged over images; ``mean_recall@k`` is their mean (DataComp's main retrieval metric
is ``mean_recall@1``). A tie with a true match is not a miss.

Per image (the eval item of :func:`per_image`): the image->text hit, the share of its captions whose text->image
query hits, and their mean; the mean over images equals the metric when every image has the same number of
captions (with unequal numbers, ``image_retrieval_recall@k`` weighs captions and the per-image values weigh
images)."""

from __future__ import annotations

import numpy as np

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.evalsets import read_evalset, split_captions
from winnow.pipeline.data.hf_cache import image_bytes, read_split
from winnow.pipeline.models.encode import embed_images, encode_texts

KIND = "retrieval"
METRICS = tuple(f"{d}_recall@{k}" for d in ("image_retrieval", "text_retrieval", "mean") for k in (1, 5, 10))


def hits(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray | None = None,
         ks=(1, 5, 10)) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per k: (per caption, its text->image query hits; per image, any of its captions is in its top k).
    ``text_image[j]`` is the image of caption j (default: caption i belongs to image i)."""
    sims = image_emb @ text_emb.T  # (images, captions)
    text_image = np.arange(sims.shape[1]) if text_image is None else np.asarray(text_image)
    true = sims[text_image, np.arange(sims.shape[1])]
    text_rank = (sims > true[None, :]).sum(axis=0)  # images scoring strictly higher than the caption's image
    best = np.full(len(sims), -np.inf)
    np.maximum.at(best, text_image, true)  # each image's best-scoring caption
    image_rank = (sims > best[:, None]).sum(axis=1)  # captions scoring strictly higher than it
    return {k: (text_rank < k, image_rank < k) for k in ks}


def metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks=(1, 5, 10),
            text_image: np.ndarray | None = None) -> dict[str, float]:
    return summarize(hits(image_emb, text_emb, text_image, ks))


def summarize(h: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The recalls of :func:`hits`."""
    out = {}
    for k, (text_hit, image_hit) in h.items():
        out[f"image_retrieval_recall@{k}"] = float(text_hit.mean())
        out[f"text_retrieval_recall@{k}"] = float(image_hit.mean())
    for k in h:
        out[f"mean_recall@{k}"] = 0.5 * (out[f"image_retrieval_recall@{k}"] + out[f"text_retrieval_recall@{k}"])
    return out


def per_image(h: dict[int, tuple[np.ndarray, np.ndarray]], text_image: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric, each image's part of it (see the module's docstring); ``text_image`` as in :func:`hits`."""
    n = len(next(iter(h.values()))[1])
    captions = np.bincount(text_image, minlength=n)
    out = {}
    for k, (text_hit, image_hit) in h.items():
        share = np.bincount(text_image, weights=text_hit, minlength=n) / captions
        out[f"image_retrieval_recall@{k}"] = share
        out[f"text_retrieval_recall@{k}"] = image_hit.astype(float)
        out[f"mean_recall@{k}"] = 0.5 * (share + image_hit)
    return out


def read(folder: str) -> dict:
    """Images and captions (one string per image, its captions one per line) of a retrieval set: clip_benchmark's
    export layout, or the Hugging Face cache of a dataset such as ``nlphuji/flickr_1k_test_image_text_retrieval``
    (a folder ``.../hf_cache/nlphuji___<name>``, as DataComp's ``download_evalsets.py`` leaves it)."""
    if "___" not in folder.rstrip("/").rsplit("/", 1)[-1]:
        return read_evalset(folder)

    hf_cache = folder.rstrip("/").rsplit("/", 1)[0]
    table = read_split(folder)
    images = [image_bytes(c, hf_cache) for c in table.column("image").to_pylist()]
    captions = ["\n".join(" ".join(str(t).split()) for t in (c if isinstance(c, list) else [c]))
                for c in table.column("caption").to_pylist()]
    return {"images": images, "captions": captions}


def run(task, ctx) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    data = read(task.data)
    if any(c is None or not c.splitlines() for c in data["captions"]):
        raise UserError(f"task {task.name}: {task.data} needs a .txt with at least one caption per image for retrieval")
    texts, text_image = split_captions(data["captions"])
    image_emb = embed_images(ctx.model, ctx.preprocess, data["images"], ctx.device)
    text_emb = encode_texts(ctx.model, ctx.tokenizer, texts, ctx.device)
    h = hits(image_emb, text_emb, text_image)
    return summarize(h), per_image(h, text_image)
