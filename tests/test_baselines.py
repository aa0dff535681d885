"""Every shipped DataComp baseline on a DataComp-shaped metadata folder written here, against DataComp's rules
computed directly (pandas and numpy per row, as ``baselines/apply_filter.py`` does)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from winnow.filters.english import languages
from winnow.filters.text_match import imagenet21k_words
from winnow.pipeline.data.uid import UID_DTYPE
from winnow.pipeline.stages.subset import subset

CAPTIONS = ["a golden retriever on the beach", "un chien sur la plage avec son maître", "dog", "a b",
            "vintage red dress for sale", "home sweet home sign", "ein Hund im Garten mit Ball", "the\nkitchen table",
            "Photo of wolves in the snow", "image", "cat", "a cat, sleeping", "café with people outside",
            "free download best picture ever", "the top of a mountain at sunset", "x"]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metadata")
    rng = np.random.default_rng(7)
    frames = []
    for j in range(3):
        n = 160
        uid = [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(n)]
        uid[0] = uid[0].upper()  # DataComp reads upper-case uids as numbers too
        frame = pd.DataFrame({
            "uid": uid, "url": [f"http://example.com/{u}.jpg" for u in uid],
            "text": [CAPTIONS[i % len(CAPTIONS)] for i in range(j, j + n)],
            "original_width": rng.choice([150, 199, 200, 400, 640, 1200], n),
            "original_height": rng.choice([150, 200, 300, 480, 601], n),
            "clip_b32_similarity_score": rng.uniform(0.15, 0.4, n),
            "clip_l14_similarity_score": rng.uniform(0.1, 0.35, n),
            "face_bboxes": [[] for _ in range(n)], "sha256": ["0" * 64] * n})
        frame.loc[5, "clip_l14_similarity_score"] = np.nan  # a row without a score counts in top_fraction's n
        stem = f"{j:032x}"
        frame.to_parquet(folder / f"{stem}.parquet")
        img = rng.normal(size=(n, 8))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        np.savez(folder / f"{stem}.npz", l14_img=img.astype(np.float16), l14_txt=img.astype(np.float16),
                 b32_img=img.astype(np.float16), b32_txt=img.astype(np.float16))
        frame["img"] = list(np.asarray(img.astype(np.float16), np.float32))
        frames.append(frame)
    centroids = rng.normal(size=(12, 8)).astype(np.float32)
    torch.save(centroids, folder.parent / "centroids.pt")  # DataComp ships its centroids as a torch-saved array
    target = centroids[:4] + 0.01 * rng.normal(size=(4, 8)).astype(np.float32)
    torch.save({"image_features": torch.from_numpy(target)}, folder.parent / "in1k.pt")  # DataComp's layout
    return {"folder": str(folder), "frame": pd.concat(frames, ignore_index=True), "centroids": centroids,
            "target": target, "centroids_path": str(folder.parent / "centroids.pt"),
            "target_path": str(folder.parent / "in1k.pt")}


def _uids(values) -> np.ndarray:
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in values], UID_DTYPE)
    arr.sort()
    return arr


def _english(frame):
    return np.array(languages(frame["text"].tolist())) == "en"


def _fasttext_tokens(text: str) -> int:
    runs = "".join(" " if c in " \n\r\t\x0b\x0c\x00" else c for c in text).split(" ")
    return sum(bool(r) for r in runs) + text.count("\n")


def _expected(name, m) -> np.ndarray:
    f = m["frame"]
    text, w, h = f["text"], f["original_width"], f["original_height"]
    if name == "no_filter":
        keep = np.ones(len(f), bool)
    elif name == "basic":
        keep = _english(f) & (text.str.split().str.len() > 2) & (text.str.len() > 5) & (np.minimum(w, h) >= 200) \
            & (np.maximum(w, h) / np.minimum(w, h) <= 3.0)
    elif name == "clip_l14_30pct":
        values = f["clip_l14_similarity_score"].to_numpy()
        keep = values >= -np.sort(-values)[int(len(values) * 0.3)]  # get_threshold
    elif name == "clip_b32_threshold":
        keep = f["clip_b32_similarity_score"] >= 0.25
    elif name == "laion2b":  # DataComp's uses gcld3 for English; Winnow's recipe uses fastText
        keep = _english(f) & (f["clip_b32_similarity_score"] >= 0.28)
    elif name == "text_based":
        words = imagenet21k_words()
        keep = _english(f) & text.apply(lambda t: any(x.lower() in words for x in t.split()))
    elif name == "image_based":
        caption = _english(f) & (text.apply(_fasttext_tokens) > 1) & (text.str.len() > 5)
        target_clusters = np.unique(np.argmax(m["target"] @ m["centroids"].T, axis=1))
        clusters = np.argmax(np.stack(f["img"]) @ m["centroids"].T, axis=1)
        keep = caption & np.isin(clusters, target_clusters)
    else:
        return np.intersect1d(_expected("image_based", m), _expected("clip_l14_30pct", m))
    return _uids(f.loc[np.asarray(keep, bool), "uid"])


@pytest.mark.parametrize("name", ["no_filter", "basic", "clip_l14_30pct", "clip_b32_threshold", "laion2b",
                                  "text_based", "image_based", "image_based_and_clip"])
def test_shipped_baseline_equals_datacomps_rule(name, metadata, tmp_path):
    variables = {"imagenet1k": metadata["target_path"], "centroids": metadata["centroids_path"]}
    used = {k: v for k, v in variables.items() if name.startswith("image_based")}
    doc = subset(name, metadata["folder"], str(tmp_path / name), None, variables=used, log=lambda m: None)
    got = np.load(tmp_path / name / "uids.npy", allow_pickle=False)
    expected = _expected(name, metadata)
    assert got.dtype == UID_DTYPE and np.array_equal(got, expected)
    assert doc["rows"] == len(metadata["frame"]) and doc["kept"] == len(expected)
    assert 0 < len(expected) < len(metadata["frame"]) or name == "no_filter"


def test_the_score_cache_stays_outside_the_metadata_folder_and_is_reused(metadata, tmp_path):
    before = sorted(os.listdir(metadata["folder"]))
    cache = tmp_path / "cache"
    first = subset("clip_l14_30pct", metadata["folder"], str(tmp_path / "a"), None, cache=str(cache),
                   log=lambda m: None)
    assert sorted(os.listdir(metadata["folder"])) == before  # nothing written into the user's input
    cached = {p: os.path.getmtime(p) for p in (str(x) for x in cache.rglob("*.np[yz]"))}
    assert cached and all(".npy" in p or ".npz" in p for p in cached)
    second = subset("clip_l14_30pct", metadata["folder"], str(tmp_path / "b"), None, variables={"fraction": "0.1"},
                    cache=str(cache), log=lambda m: None)
    assert {p: os.path.getmtime(p) for p in cached} == cached  # the same scores, not recomputed
    assert second["kept"] < first["kept"]
    values = metadata["frame"]["clip_l14_similarity_score"].to_numpy()
    assert second["kept"] == (values >= -np.sort(-values)[int(len(values) * 0.1)]).sum()
