"""Faces and NSFW: the detectors on real photographs, the filters over their stored scores, the safe recipe, the
embedding head, the caption word list, and blurring in reshard."""

from __future__ import annotations

import io
import os
import tarfile

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
from helpers import make_pool
from PIL import Image

from winnow.filters import build
from winnow.filters.embedding_head import load_head
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.models.detect import Detector
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.select.score import score
from winnow.pipeline.stages.reshard import reshard
from winnow.pipeline.stages.subset import subset
from winnow.pipeline.synth.world import SynthConfig, _jpeg, _spec_for


def _lfw_on_canvas(crop: np.ndarray) -> np.ndarray:
    face = cv2.resize((np.clip(crop, 0, 1) * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((200, 200), 128, np.uint8)
    canvas[50:150, 50:150] = face
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)


def test_faces_are_found_on_real_photographs():
    detect = Detector(("faces",))
    boxes = detect(skimage.data.astronaut())["face_bboxes"]
    assert len(boxes) == 1
    x0, y0, x1, y1 = boxes[0]  # Eileen Collins' face: upper middle of the 512 x 512 portrait
    assert 0.25 < x0 < x1 < 0.65 and 0.05 < y0 < y1 < 0.45
    lfw = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces
    found = [bool(detect(_lfw_on_canvas(x))["face_bboxes"]) for x in lfw]
    assert sum(found[:100]) >= 85 and sum(found[100:]) <= 5, (sum(found[:100]), sum(found[100:]))


def test_nsfw_scores_are_low_on_benign_images():
    detect = Detector(("nsfw",))
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        assert detect(getattr(skimage.data, name)())["nsfw"] < 0.2, name
    cfg = SynthConfig()
    shapes = [detect(np.asarray(Image.open(io.BytesIO(_jpeg(_spec_for(cfg, 1, i)))).convert("RGB")))["nsfw"]
              for i in range(20)]
    assert max(shapes) < 0.5


def _metadata(folder, nsfw: np.ndarray, captions: list[str]) -> None:
    """A DataComp-shaped metadata folder: one part with b32 embeddings and stored detector outputs."""
    n = len(nsfw)
    rng = np.random.default_rng(0)
    pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "text": captions}).to_parquet(folder / f"{'a' * 32}.parquet")
    v = rng.normal(size=(n, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.savez(folder / f"{'a' * 32}.npz", b32_img=v.astype(np.float16), b32_txt=v[::-1].astype(np.float16),
             b32_nsfw=nsfw.astype(np.float32), b32_face_count=np.arange(n, dtype=np.float32) % 3)


def test_the_safe_recipe_drops_rows_over_the_threshold_and_explicit_captions(tmp_path):
    nsfw = np.array([0.0, 0.1, 0.49, 0.5, 0.51, 0.9, 0.0, 0.0])
    captions = ["a red star"] * 6 + ["Hardcore PORN video", "a sextant on an xxxl shirt"]
    _metadata(tmp_path, nsfw, captions)
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        doc = subset("safe", str(tmp_path), str(tmp_path / "out"), runner, cache=str(tmp_path / "cache"),
                     log=lambda m: None)
    kept = doc["kept"]
    # rows 0-3 (scores <= 0.5) pass the image rule; rows 6 and 7 have clean images but row 6's caption is explicit;
    # row 7 holds listed words only inside other words ("xxx" in "xxxl"): whole-word matching keeps it
    assert kept == 5
    assert [s["kept"] for s in doc["steps"]][-2:] == [6, 5]


def test_face_count_is_a_score(tmp_path):
    _metadata(tmp_path, np.zeros(6), ["x"] * 6)
    found = score(str(tmp_path), [{"key": "face_count", "params": {"tag": "b32"}}], None,
                  cache=str(tmp_path / "cache"), log=lambda m: None)
    part = found.parts[0]
    assert list(found.column("face_count_b32_score", part)) == [0, 1, 2, 0, 1, 2]


def test_an_embedding_head_applies_its_layers_from_a_file_without_pickle(tmp_path):
    rng = np.random.default_rng(1)
    w0, b0, w1, b1 = rng.normal(size=(8, 5)), rng.normal(size=5), rng.normal(size=(1, 5)), np.array([0.3])
    np.savez(tmp_path / "head.npz", w0=w0, b0=b0, w1=w1, b1=b1)  # w1 in torch's (out, in) layout
    _metadata(tmp_path, np.zeros(6), ["x"] * 6)
    spec = {"key": "embedding_head", "params": {"tag": "b32", "path": str(tmp_path / "head.npz"),
                                                "name": "toy", "output": "sigmoid"}}
    found = score(str(tmp_path), [spec], None, cache=str(tmp_path / "cache"), log=lambda m: None)
    x = np.load(tmp_path / f"{'a' * 32}.npz")["b32_img"].astype(np.float32)
    expected = 1 / (1 + np.exp(-(np.maximum(x @ w0 + b0, 0) @ w1.T + b1)[:, 0]))
    got = found.column("embedding_head_b32_toy_score", found.parts[0])
    assert np.allclose(got, expected, atol=1e-5)
    np.savez(tmp_path / "head.npz", w0=w0, b0=b0, w1=w1, b1=b1 + 5)  # retrained: scored again
    again = score(str(tmp_path), [spec], None, cache=str(tmp_path / "cache"), log=lambda m: None)
    assert not np.allclose(again.column("embedding_head_b32_toy_score", again.parts[0]), got)
    np.save(tmp_path / "evil.npy", np.array([object()], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "evil.npy", tmp_path / "evil.npz")
    with pytest.raises(UserError, match="cannot read"):
        load_head(str(tmp_path / "evil.npz"))


def test_caption_words_are_whole_words():
    filt = build({"key": "caption_nsfw"})
    part = pd.DataFrame({"caption": ["NSFW xxx pics", "a sextant and a pornographer's dictionary", None, "porn"]})
    assert list(filt(part)["caption_nsfw_score"]) == [2, 0, 0, 1]


def test_reshard_blurs_face_boxes_and_copies_the_rest(tmp_path):
    pool = make_pool(tmp_path / "pool", [f"{i:032x}" for i in range(3)])
    table_path = tmp_path / "pool" / "00000000.parquet"
    table = pd.read_parquet(table_path)
    face = [[0.34, 0.13, 0.53, 0.32]]
    table["face_bboxes"] = [face, [], None]
    table.to_parquet(table_path)
    portrait = Image.fromarray(skimage.data.astronaut())
    buf = io.BytesIO()
    portrait.save(buf, "JPEG", quality=95)
    _replace_image(tmp_path / "pool" / "00000000.tar", table["key"][0], buf.getvalue())
    uids = np.array([(0, i) for i in range(3)], dtype=[("f0", "<u8"), ("f1", "<u8")])
    np.save(tmp_path / "uids.npy", uids)
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        doc = reshard(pool, str(tmp_path / "uids.npy"), str(tmp_path / "out"), runner, blur_faces=True,
                      log=lambda m: None)
        plain = reshard(pool, str(tmp_path / "uids.npy"), str(tmp_path / "plain"), runner, log=lambda m: None)
    assert "blurred_samples" not in plain["rows"]
    assert doc["rows"]["blurred_samples"] == 1 and doc["rows"]["blurred_faces"] == 1
    out = _images(tmp_path / "out" / "00000000.tar")
    src = _images(tmp_path / "plain" / "00000000.tar")
    first = sorted(out)[0]
    assert out[first] != src[first] and [out[k] == src[k] for k in sorted(out)[1:]] == [True, True]
    a, b = (np.asarray(Image.open(io.BytesIO(x[first])).convert("L"), dtype=float) for x in (out, src))
    h, w = a.shape
    inside = (slice(int(0.16 * h), int(0.29 * h)), slice(int(0.37 * w), int(0.5 * w)))
    outside = (slice(int(0.6 * h), h), slice(0, w))
    assert np.abs(a[inside] - b[inside]).mean() > 10 * np.abs(a[outside] - b[outside]).mean()
    with pytest.raises(UserError, match="--detect faces"):
        bare = make_pool(tmp_path / "bare", ["f" * 32])
        np.save(tmp_path / "one.npy", np.array([(2**64 - 1, 2**64 - 1)], dtype=uids.dtype))
        with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
            reshard(bare, str(tmp_path / "one.npy"), str(tmp_path / "o2"), runner, blur_faces=True,
                    log=lambda m: None)


def _replace_image(tar_path, key: str, data: bytes) -> None:
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for m, payload in members:
            if m.name == f"{key}.jpg":
                payload = data
                m.size = len(data)
            tar.addfile(m, io.BytesIO(payload))


def _images(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers()
                if m.name.endswith(".jpg")}


def test_embed_detectors_are_config_checked():
    from winnow.pipeline.stages.embed import EmbedConfig

    with pytest.raises(UserError, match="unknown detector 'weapons'"):
        EmbedConfig(detect=["faces", "weapons"])
    assert EmbedConfig(detect=["faces"]).detect == ["faces"]


def test_ingest_drops_an_image_over_the_nsfw_limit():
    """The download thread's plumbing: a detector's score over ingest.nsfw_max ends the row ``nsfw`` before the
    resizer runs (a stand-in detector: the real one scores benign images near 0, see above)."""
    from winnow.pipeline.web.ingest_child import _prepare

    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, "JPEG")
    cfg = {"max_pixels": 10**8, "check_truncation": True, "nsfw_max": 0.5, "extract_exif": False}

    def resizer(stream, bbox):
        raise AssertionError("an nsfw image is never resized or written")

    resized, _ = _prepare(buf.getvalue(), cfg, resizer, None, None, spot=lambda rgb: {"nsfw": 0.93})
    assert resized[-1].startswith("nsfw: ") and "0.93 > ingest.nsfw_max 0.5" in resized[-1]
