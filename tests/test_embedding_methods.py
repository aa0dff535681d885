"""negCLIPLoss and NormSim (Wang et al. 2024): each formula against a hand computation, the batches' determinism,
the within-part estimate, and each filter with its recipes on a DataComp-shaped metadata folder written here."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest

from winnow.filters import build
from winnow.filters.neg_clip_loss import NegClipLossFilter, draw_batches, normaliser
from winnow.filters.norm_sim import norm_sim_inf
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.parts import list_parts
from winnow.pipeline.data.uid import UID_DTYPE, uids_to_array
from winnow.pipeline.select.score import PoolContext
from winnow.pipeline.stages.subset import subset

QUIET = lambda m: None  # noqa: E731


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _hex_uids(rng, n):
    return [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(n)]


def _pairs(rng, n, d=8, clusters=4):
    """Image and text embeddings with clusters (so the batch term varies) and varying caption quality."""
    centres = rng.normal(size=(clusters, d))
    img = _unit(centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d)))
    noise = rng.uniform(0.1, 2.0, (n, 1))
    return img, _unit(img + noise * rng.normal(size=(n, d)))


def _hand_neg_clip_loss(img, txt, batches, tau, b):
    """negCLIPLoss by the paper's formula with explicit loops (in a batch of m rows the others' terms scaled by
    (b-1)/(m-1))."""
    out = []
    for i in range(len(img)):
        terms = []
        for repeat in batches:
            batch = next(list(map(int, rows)) for rows in repeat if i in rows)
            w = (b - 1) / (len(batch) - 1) if len(batch) > 1 else 1
            own = math.exp(float(img[i] @ txt[i]) / tau)
            to_texts = own + w * sum(math.exp(float(img[i] @ txt[j]) / tau) for j in batch if j != i)
            to_images = own + w * sum(math.exp(float(img[j] @ txt[i]) / tau) for j in batch if j != i)
            terms.append(tau / 2 * (math.log(to_texts) + math.log(to_images)))
        out.append(float(img[i] @ txt[i]) - sum(terms) / len(terms))
    return np.array(out)


def _reference(img, txt, batches, tau, b):
    """The same formula vectorised with numpy (for the recipe tests' larger arrays)."""
    r = np.zeros(len(img))
    for repeat in batches:
        for rows in repeat:
            logits = img[rows].astype(np.float64) @ txt[rows].T.astype(np.float64) / tau
            weights = np.full(logits.shape, (b - 1) / max(1, len(rows) - 1))
            np.fill_diagonal(weights, 1.0)
            top = logits.max()
            terms = weights * np.exp(logits - top)
            r[rows] += tau / 2 * (np.log(terms.sum(1)) + np.log(terms.sum(0)) + 2 * top)
    return np.einsum("ij,ij->i", img.astype(np.float64), txt.astype(np.float64)) - r / len(batches)


def _score(filt, img, txt, uids, tag="l14"):
    frame = pd.DataFrame({"uid": uids})
    return filt(frame, {tag: {"img": img, "txt": txt}})[filt.column].to_numpy()


def test_neg_clip_loss_of_one_batch_is_the_clip_score_minus_the_papers_normalisation():
    img = _unit(np.array([[1.0, 0.2], [0.3, 1.0], [-0.5, 0.8]]))
    txt = _unit(np.array([[0.9, 0.1], [0.1, 1.0], [1.0, -0.2]]))
    tau = 0.5
    got = _score(NegClipLossFilter(tau=tau, batches=1, batch_size=3), img, txt, ["1", "2", "3"])
    # the whole part is one batch: -tau * CLIPLoss(i), written out for row 0
    s = img @ txt.T
    row0 = s[0, 0] - tau / 2 * (math.log(sum(math.exp(s[0, j] / tau) for j in range(3)))
                                + math.log(sum(math.exp(s[j, 0] / tau) for j in range(3))))
    assert got[0] == pytest.approx(row0, abs=1e-6)
    assert np.allclose(got, _hand_neg_clip_loss(img, txt, [[np.arange(3)]], tau, 3), atol=1e-6)
    assert (got <= 0).all()  # -tau times a cross-entropy


def test_neg_clip_loss_averages_random_batches_and_scales_a_short_batch_to_the_batch_size():
    rng = np.random.default_rng(0)
    img, txt = _pairs(rng, 7, d=3)
    uids = _hex_uids(rng, 7)
    filt = NegClipLossFilter(tau=0.1, batches=3, batch_size=3, seed=5)
    batches = draw_batches(uids_to_array(uids, sort=False), 3, 3, seed=5)
    assert [sorted(len(r) for r in repeat) for repeat in batches] == [[2, 2, 3]] * 3  # ceil(7/3) near-equal batches
    got = _score(filt, img, txt, uids)
    assert np.allclose(got, _hand_neg_clip_loss(img, txt, batches, 0.1, 3), atol=1e-5)
    # rows without an embedding join no batch and score NaN; the others keep their batches' values
    img_nan = img.copy()
    img_nan[2] = np.nan
    got_nan = _score(filt, img_nan, txt, uids)
    keep = np.arange(7) != 2
    kept_batches = draw_batches(uids_to_array(uids, sort=False)[keep], 3, 3, seed=5)
    assert np.isnan(got_nan[2])
    assert np.allclose(got_nan[keep], _hand_neg_clip_loss(img[keep], txt[keep], kept_batches, 0.1, 3), atol=1e-5)


def test_batches_depend_on_the_uids_only():
    rng = np.random.default_rng(1)
    uids = uids_to_array(_hex_uids(rng, 50), sort=False)
    batches = draw_batches(uids, 8, 4, seed=0)
    for repeat in batches:  # each repeat is a partition of the rows into near-equal batches
        assert sorted(np.concatenate(repeat).tolist()) == list(range(50))
        assert max(map(len, repeat)) - min(map(len, repeat)) <= 1 and len(repeat) == math.ceil(50 / 8)
    perm = rng.permutation(50)
    shuffled = draw_batches(uids[perm], 8, 4, seed=0)
    as_sets = lambda bs, ids: [sorted(sorted(map(tuple, ids[r].tolist())) for r in rep) for rep in bs]  # noqa
    assert as_sets(shuffled, uids[perm]) == as_sets(batches, uids)  # same uids, same batches
    assert as_sets(draw_batches(uids, 8, 4, seed=1), uids) != as_sets(batches, uids)
    assert as_sets(batches[:1], uids) != as_sets(batches[1:2], uids)  # repeats draw different batches

    img, txt = _pairs(rng, 50)
    hexes = np.array(_hex_uids(rng, 50))
    filt = NegClipLossFilter(batches=4, batch_size=8)
    assert np.allclose(_score(filt, img[perm], txt[perm], hexes[perm]), _score(filt, img, txt, hexes)[perm])


def test_batches_within_a_part_estimate_the_pools_normalisation():
    """A part is a random sample of the pool: R from batches within it matches R from batches over the whole
    pool, and a part smaller than the batch size is put on the same scale."""
    rng = np.random.default_rng(2)
    n, b, k, tau = 3000, 100, 30, 0.1
    img, txt = _pairs(rng, n, d=6)
    uids = uids_to_array(_hex_uids(rng, n), sort=False)
    whole = [np.array_split(rng.permutation(n), n // b) for _ in range(k)]
    r_pool = normaliser(img, txt, whole, tau, b)
    r_parts = np.empty(n)
    for rows in np.array_split(rng.permutation(n), 5):  # five random parts of 600
        r_parts[rows] = normaliser(img[rows], txt[rows], draw_batches(uids[rows], b, k), tau, b)
    spread = np.std(r_pool)
    assert np.corrcoef(r_pool, r_parts)[0, 1] > 0.95
    assert abs(np.mean(r_parts - r_pool)) < 0.05 * spread and np.mean(np.abs(r_parts - r_pool)) < 0.3 * spread

    small, large = np.arange(50), np.arange(50, 1050)  # a 50-row part against 1000-row batches
    r_small = normaliser(img[small], txt[small], draw_batches(uids[small], 1000, 1), tau, 1000)
    r_large = normaliser(img[large], txt[large], draw_batches(uids[large], 1000, 1), tau, 1000)
    gap = abs(r_small.mean() - r_large.mean())
    unscaled = normaliser(img[small], txt[small], draw_batches(uids[small], 50, 1), tau, 50)
    assert gap < 0.2 * abs(unscaled.mean() - r_large.mean())  # without the scaling, the small part's R is far lower


def test_norm_sim_p2_and_inf_by_hand(tmp_path):
    x = _unit(np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.1]]))
    target = _unit(np.array([[1.0, 0.1], [0.0, 1.0], [0.7, 0.7], [0.9, -0.4]]))
    np.save(tmp_path / "target.npy", target)
    frame = pd.DataFrame({"uid": ["1", "2", "3"]})
    emb = {"l14": {"img": x, "txt": x}}
    got = {}
    for p in (2, math.inf):
        filt = build({"key": "norm_sim", "params": {"target": str(tmp_path / "target.npy"), "p": p}})
        out = tmp_path / f"state{p}"
        out.mkdir()
        filt.prepare(PoolContext("", [], None, str(out), QUIET))
        got[p] = filt(frame, emb)[filt.column].to_numpy()
    sims = [[float(x[i] @ target[t]) for t in range(4)] for i in range(3)]
    assert np.allclose(got[2], [math.sqrt(sum(s * s for s in row)) for row in sims], atol=1e-6)
    assert np.allclose(got[math.inf], [max(abs(s) for s in row) for row in sims], atol=1e-6)
    assert got[math.inf][2] == pytest.approx(abs(sims[2][0]), abs=1e-6)  # a norm: the largest magnitude counts
    assert build({"key": "norm_sim", "params": {"p": "inf"}}).column == "norm_sim_inf_l14_score"
    assert build({"key": "norm_sim", "params": {"p": 2, "tag": "b32"}}).column == "norm_sim_2_b32_score"


def test_norm_sim_inf_reads_the_target_in_chunks(tmp_path):
    rng = np.random.default_rng(3)
    x, target = _unit(rng.normal(size=(37, 5))), _unit(rng.normal(size=(101, 5)))
    np.save(tmp_path / "t.npy", target)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r")
    expected = np.abs(x.astype(np.float64) @ target.T.astype(np.float64)).max(axis=1)
    for cells in (37, 37 * 7, 10**6):  # one target row at a time, seven, all
        assert np.allclose(norm_sim_inf(x, mapped, cells=cells), expected, atol=1e-6)


def test_norm_sim_reads_a_target_folder_block_by_block_and_drops_rows_without_a_value(tmp_path):
    """A target of several files (an .npy and an .npz) is read a block at a time; the scores equal those of the
    whole target held at once, and rows with a NaN are left out."""
    from winnow.filters.image_cluster import each_target

    rng = np.random.default_rng(5)
    x, target = _unit(rng.normal(size=(9, 6))), _unit(rng.normal(size=(23, 6))).astype(np.float32)
    folder = tmp_path / "target"
    folder.mkdir()
    with_nan = target[:15].copy()
    with_nan[4] = np.nan
    np.save(folder / "a.npy", with_nan)
    np.savez(folder / "b.npz", l14_img=target[15:].astype(np.float16))
    blocks = list(each_target(str(folder), "l14", rows=4))
    assert max(len(b) for b in blocks) <= 4 and sum(len(b) for b in blocks) == 22
    kept = np.concatenate([np.delete(target[:15], 4, axis=0), target[15:].astype(np.float16).astype(np.float32)])
    sims = np.abs(x.astype(np.float64) @ kept.T.astype(np.float64))
    for p, expected in ((2, np.sqrt((sims ** 2).sum(axis=1))), (math.inf, sims.max(axis=1))):
        filt = build({"key": "norm_sim", "params": {"target": str(folder), "p": p}})
        out = tmp_path / f"state{p}"
        out.mkdir()
        filt.prepare(PoolContext("", [], None, str(out), QUIET))
        assert np.allclose(filt(pd.DataFrame({"uid": [str(i) for i in range(9)]}),
                                {"l14": {"img": x, "txt": x}})[filt.column].to_numpy(), expected, atol=1e-5)
    assert np.load(tmp_path / "stateinf" / "target.npy").shape == (22, 6)


def test_bad_parameters_and_targets_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="p is 2 or inf"):
        build({"key": "norm_sim", "params": {"p": 3}})
    with pytest.raises(UserError, match="tau"):
        build({"key": "neg_clip_loss", "params": {"tau": 0}})
    with pytest.raises(UserError, match="--var target=PATH"):
        build({"key": "norm_sim"}).prepare(PoolContext("", [], None, str(tmp_path), QUIET))
    filt = build({"key": "norm_sim", "params": {"target": str(tmp_path / "missing.npy")}})
    with pytest.raises(UserError, match=r"^norm_sim\.target"):
        filt.prepare(PoolContext("", [], None, str(tmp_path), QUIET))
    np.save(tmp_path / "t.npy", np.ones((3, 4), np.float32))
    filt = build({"key": "norm_sim", "params": {"target": str(tmp_path / "t.npy")}})
    filt.prepare(PoolContext("", [], None, str(tmp_path), QUIET))
    with pytest.raises(UserError, match="4 dimensions.*embeddings 8"):
        filt(pd.DataFrame({"uid": ["1"]}), {"l14": {"img": np.ones((1, 8), np.float32)}})


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """A DataComp-shaped metadata folder: parquet parts with uid and text, and .npz beside each with l14 and dfn
    image and text embeddings (float16, as DataComp ships them); plus a target set of image embeddings."""
    folder = tmp_path_factory.mktemp("metadata")
    rng = np.random.default_rng(4)
    frames, embs = [], []
    for j, n in enumerate((300, 260, 340)):
        uid = _hex_uids(rng, n)
        img, txt = _pairs(rng, n)
        dfn_img, dfn_txt = _pairs(rng, n)
        img[7] = np.nan  # a row without an image
        stem = f"{j:032x}"
        pd.DataFrame({"uid": uid, "text": [f"caption {i}" for i in range(n)]}).to_parquet(folder / f"{stem}.parquet")
        arrays = {"l14_img": img, "l14_txt": txt, "dfn_img": dfn_img, "dfn_txt": dfn_txt}
        np.savez(folder / f"{stem}.npz", **{k: v.astype(np.float16) for k, v in arrays.items()})
        frames.append(pd.DataFrame({"uid": uid}))
        embs.append({k: v.astype(np.float16).astype(np.float32) for k, v in arrays.items()})
    target = _unit(rng.normal(size=(40, 8)))
    np.save(folder.parent / "target.npy", target)
    return {"folder": str(folder), "frames": frames, "embs": embs, "target": target,
            "target_path": str(folder.parent / "target.npy")}


def _top(values, fraction):
    """DataComp's get_threshold rule over the whole pool (NaN sorts last)."""
    order = -np.sort(-values)
    return values >= np.nan_to_num(order[int(len(values) * fraction)], nan=np.inf)


def _expected_scores(m, batch_size, k=10, tau=0.01):
    neg, sim2, siminf, dfn = [], [], [], []
    for frame, e in zip(m["frames"], m["embs"]):
        img, txt = e["l14_img"], e["l14_txt"]
        ok = np.isfinite(img).all(axis=1)
        score = np.full(len(frame), np.nan)
        batches = draw_batches(uids_to_array(frame["uid"][ok].tolist(), sort=False), batch_size, k)
        score[ok] = _reference(img[ok], txt[ok], batches, tau, batch_size)
        neg.append(score)
        sims = img.astype(np.float64) @ m["target"].T.astype(np.float64)
        sim2.append(np.sqrt((sims**2).sum(axis=1)))
        siminf.append(np.abs(sims).max(axis=1))
        dfn.append(np.einsum("ij,ij->i", e["dfn_img"], e["dfn_txt"]))
    uids = pd.concat(m["frames"], ignore_index=True)["uid"]
    return uids, {k: np.concatenate(v) for k, v in
                  {"neg": neg, "sim2": sim2, "siminf": siminf, "dfn": dfn}.items()}


def _as_uids(values):
    return uids_to_array(list(values))


@pytest.mark.parametrize("name, variables", [
    ("negcliploss_30pct", {"batch_size": "64"}),
    ("negcliploss_normsim", {"batch_size": "64", "p": "inf"}),
    ("negcliploss_normsim", {"batch_size": "64", "p": "2", "normsim_fraction": "0.5"}),
    ("dfn_and_negcliploss", {"batch_size": "64"}),
])
def test_recipe_on_a_metadata_folder_keeps_the_papers_rule(name, variables, metadata, tmp_path):
    if name == "negcliploss_normsim":
        variables = {**variables, "target": metadata["target_path"]}
    doc = subset(name, metadata["folder"], str(tmp_path / "out"), None, variables=variables, log=QUIET)
    got = np.load(tmp_path / "out" / "uids.npy", allow_pickle=False)
    uids, s = _expected_scores(metadata, batch_size=64)
    keep = _top(s["neg"], 0.3)
    if name == "negcliploss_normsim":  # NormSim ranks within negCLIPLoss's rows (the paper's 30% then 20%)
        sim = np.where(keep, s["siminf"] if variables["p"] == "inf" else s["sim2"], np.nan)
        fraction = float(variables.get("normsim_fraction", 0.667))
        keep &= sim >= -np.sort(-sim[keep])[int(keep.sum() * fraction)]
    if name == "dfn_and_negcliploss":
        keep &= _top(s["dfn"], 0.3)
    expected = _as_uids(uids[keep])
    assert got.dtype == UID_DTYPE and np.array_equal(got, expected)
    assert 0 < doc["kept"] == len(expected) <= int(0.3 * len(uids)) + 1  # DataComp keeps n + 1
    if name != "negcliploss_30pct":
        assert len(expected) < _top(s["neg"], 0.3).sum()


def test_neg_clip_loss_changes_the_clip_score_ranking(metadata):
    """The batch term matters: the top 30% differs from the CLIP score's (the paper's point)."""
    _, s = _expected_scores(metadata, batch_size=64)
    clip = np.concatenate([np.einsum("ij,ij->i", e["l14_img"], e["l14_txt"]) for e in metadata["embs"]])
    clip = np.where(np.isfinite(clip), clip, np.nan)
    assert (_top(s["neg"], 0.3) != _top(clip, 0.3)).any()


def test_the_filters_read_embeddings_from_a_separate_folder(metadata, tmp_path):
    """The Winnow layout: embeddings in their own folder (``winnow embed``'s POOL/embeddings/TAG)."""

    pool = tmp_path / "pool"
    emb = tmp_path / "emb"
    pool.mkdir()
    emb.mkdir()
    for part in list_parts(metadata["folder"]):
        shutil.copy(part.parquet, pool)
        shutil.copy(part.parquet.replace(".parquet", ".npz"), emb)
    recipe = {"name": "t", "filters": [{"key": "norm_sim", "params": {"target": metadata["target_path"], "p": 2}}],
              "select": [{"top_fraction": {"column": "norm_sim_2_l14_score", "fraction": 0.25}}]}
    subset(recipe, str(pool), str(tmp_path / "out"), None, embeddings={"l14": str(emb)}, log=QUIET)
    uids, s = _expected_scores(metadata, batch_size=64)
    got = np.load(tmp_path / "out" / "uids.npy", allow_pickle=False)
    assert np.array_equal(got, _as_uids(uids[_top(s["sim2"], 0.25)]))
