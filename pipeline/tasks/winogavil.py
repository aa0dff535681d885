"""WinoGAViL as DataComp scores it: for each instance, the cue ("A cue" / "An cue", lower case) is compared with
every candidate image; the k most similar are the prediction, k being the number of true associations; the score
is the Jaccard index of predicted and true sets (scikit-learn's binary ``jaccard_score``). Reported over all
instances and by number of candidates (5, 6, 10, 12, 5-6, 10-12); DataComp's main metric is ``jaccard_score_10-12``.

Read from the Hugging Face cache of ``nlphuji/winogavil`` (:mod:`winnow.pipeline.data.hf_cache`: ``cue``,
``candidates``,
``associations``, ``candidate_images``). Per item: each instance's score, over the instances the main metric
averages (10 or 12 candidates).
"""

from __future__ import annotations

import numpy as np

from winnow.pipeline.data.hf_cache import image_bytes, read_split
from winnow.pipeline.models.encode import embed_images, encode_texts

KIND = "winogavil"
GROUPS = {"5": (5, 5), "6": (6, 6), "10": (10, 10), "12": (12, 12), "5-6": (5, 6), "10-12": (10, 12)}
METRICS = ("avg_jaccard_score", *(f"jaccard_score_{g}" for g in GROUPS))
CHUNK = 64  # instances embedded together


def prompt(cue: str) -> str:
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" else f"A {cue}"


def jaccard(true: np.ndarray, pred: np.ndarray) -> float:
    union = (true | pred).sum()
    return float((true & pred).sum() / union) if union else 0.0


def scores(sims: list[np.ndarray], truths: list[np.ndarray]) -> np.ndarray:
    """Each instance's Jaccard index: its ``k = sum(true)`` most similar candidates against the true ones."""
    out = []
    for s, true in zip(sims, truths):
        k = int(true.sum())
        pred = np.isin(np.arange(len(s)), np.argsort(s)[len(s) - k:]) if k else np.zeros(len(s), bool)
        out.append(jaccard(true, pred))
    return np.array(out)


def summarize(values: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    out = {"avg_jaccard_score": float(values.mean())}
    for name, (lo, hi) in GROUPS.items():
        chosen = values[(sizes >= lo) & (sizes <= hi)]
        out[f"jaccard_score_{name}"] = float(chosen.mean()) if len(chosen) else float("nan")
    return out


def run(task, ctx) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    hf_cache = task.data.rstrip("/").rsplit("/", 1)[0]
    table = read_split(task.data)
    values, sizes = [], []
    for start in range(0, table.num_rows, CHUNK):
        rows = table.slice(start, CHUNK).select(["cue", "candidates", "associations", "candidate_images"]).to_pylist()
        images = [image_bytes(c, hf_cache) for r in rows for c in r["candidate_images"]]
        image_emb = embed_images(ctx.model, ctx.preprocess, images, ctx.device)
        text_emb = encode_texts(ctx.model, ctx.tokenizer, [prompt(r["cue"]) for r in rows], ctx.device)
        bounds = np.cumsum([0] + [len(r["candidate_images"]) for r in rows])
        sims = [image_emb[a:b] @ text_emb[i] for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        truths = [np.isin(r["candidates"], r["associations"]) for r in rows]
        values.append(scores(sims, truths))
        sizes += [len(r["candidate_images"]) for r in rows]
    values, sizes = np.concatenate(values), np.array(sizes)
    per_item = {name: values[(sizes >= lo) & (sizes <= hi)] for name, (lo, hi) in GROUPS.items()}
    return summarize(values, sizes), {f"jaccard_score_{k}": v for k, v in per_item.items()} | {
        "avg_jaccard_score": values}
