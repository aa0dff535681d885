import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.synth.render import CLASSES, render, shape_mask
from pipeline.synth.world import DUPLICATES, EXPECTED_STATE, DefectRates, SynthConfig, plan_pool, pool_payload


def test_plan_is_deterministic_per_seed():
    a, b = plan_pool(SynthConfig(seed=1, n_pool=300)), plan_pool(SynthConfig(seed=1, n_pool=300))
    pd.testing.assert_frame_equal(a, b)
    c = plan_pool(SynthConfig(seed=2, n_pool=300))
    assert not a["uid"].equals(c["uid"])


@pytest.mark.e2e  # a statistical check over a 20,000-row plan: too slow for the fast tier
def test_defect_rates_match_the_documented_rates():
    cfg = SynthConfig(seed=0, n_pool=20_000)
    counts = plan_pool(cfg)["defect"].value_counts()
    for name in ("mismatch", "non_english", "http_404", "exact_duplicate", "eval_copy"):
        rate = getattr(cfg.rates, name)
        assert abs(counts[name] / cfg.n_pool - rate) < 4 * np.sqrt(rate / cfg.n_pool) + 1e-3, name
    assert counts["bomb"] == cfg.rates.bomb and counts["hang"] == cfg.rates.hang


def test_pool_uids_unique_and_captions_follow_their_defect():
    plan = plan_pool(SynthConfig(seed=3, n_pool=2000))
    assert plan["uid"].is_unique
    short = plan[plan.defect == "short_caption"]["text"]
    assert all(len(t.split()) <= 2 for t in short)  # fails DataComp's "more than 2 words"
    mism = plan[plan.defect == "mismatch"]
    assert (mism["caption_cls"] != mism["cls"]).all()
    good = plan[plan.defect == "none"]
    from pipeline.synth.captions import SYNONYMS
    assert all(any(s.lower() in t.lower() for s in SYNONYMS[c]) for t, c in zip(good["text"], good["cls"]))


def test_duplicates_share_their_source_image():
    plan = plan_pool(SynthConfig(seed=4, n_pool=1500))
    rows = plan.drop(columns=["source_uid"]).to_dict("records")
    by_index = {r["index"]: r for r in rows}
    exact = next(r for r in rows if r["defect"] == "exact_duplicate")
    assert pool_payload(exact) == pool_payload(by_index[exact["source"]])
    for kind in DUPLICATES[1:]:
        near = next(r for r in rows if r["defect"] == kind)
        src = Image.open(__import__("io").BytesIO(pool_payload(by_index[near["source"]])))
        dup = Image.open(__import__("io").BytesIO(pool_payload(near)))
        assert pool_payload(near) != pool_payload(by_index[near["source"]])
        assert abs(dup.size[0] / dup.size[1] - src.size[0] / src.size[1]) < 0.15


def test_every_class_has_a_distinct_silhouette_and_renders_deterministically():
    masks = [shape_mask(c, 96, 96, 48, 48, 36, 0) for c in CLASSES]
    for i in range(len(CLASSES)):
        for j in range(i + 1, len(CLASSES)):
            assert (masks[i] ^ masks[j]).mean() > 0.03, (CLASSES[i], CLASSES[j])
    from pipeline.synth.world import _spec_for
    spec = _spec_for(SynthConfig(), 1, 5)
    assert np.array_equal(np.asarray(render(spec)), np.asarray(render(spec)))


def test_bad_synth_configs_are_user_errors():
    with pytest.raises(UserError, match="n_classes"):
        SynthConfig(n_classes=5)
    with pytest.raises(UserError, match="loopback"):
        SynthConfig(base_url="http://example.com")
    with pytest.raises(UserError, match="add up"):
        SynthConfig(rates=DefectRates(mismatch=0.9, non_english=0.1))


@pytest.mark.e2e
def test_world_layout_and_disjoint_sets(tiny_world):
    import os
    world = tiny_world["path"]
    truth = pd.read_parquet(os.path.join(world, "truth.parquet"))
    urls = pd.read_parquet(os.path.join(world, "urls.parquet"))
    assert list(urls.columns) == ["url", "text", "uid"] and len(urls) == len(truth) == 240
    assert set(truth["defect"]) >= set(EXPECTED_STATE) | {"none", *DUPLICATES, "eval_copy", "mismatch"}
    from pipeline.data.shards import iter_tar, list_shards, read_table
    clean = pd.concat([read_table(os.path.join(world, "clean"), i) for i in list_shards(os.path.join(world, "clean"))])
    assert len(clean) == 24 and not set(clean["uid"]) & set(truth["uid"])
    classes = open(os.path.join(world, "eval", "classnames.txt")).read().split("\n")[:-1]
    assert classes == CLASSES
    evals = list(iter_tar(os.path.join(world, "eval", "test", "0.tar")))
    assert len(evals) == 24 and all(classes[int(s["cls"])] for s in evals)
    eval_bytes = {s["jpg"] for s in evals}
    site = os.path.join(world, "site")
    served = {r.uid: open(os.path.join(site, r.url.split("/", 3)[3]), "rb").read() for r in truth.itertuples()
              if os.path.exists(os.path.join(site, r.url.split("/", 3)[3]))}
    copies = {u for u, b in served.items() if b in eval_bytes}
    planted = set(truth.loc[truth.defect == "eval_copy", "uid"])
    assert copies and copies <= planted  # only planted contamination shares bytes with the eval set
