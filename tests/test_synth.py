import io
import json
import os
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.synth.render import CLASSES, COLORS, render, shape_mask
from winnow.pipeline.synth.world import (
    DUPLICATES,
    EXPECTED_STATE,
    DefectRates,
    SynthConfig,
    _spec_for,
    class_table,
    plan_pool,
    pool_payload,
)


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
    from winnow.pipeline.synth.captions import SYNONYMS
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
    spec = _spec_for(SynthConfig(), 1, 5)
    assert np.array_equal(np.asarray(render(spec)), np.asarray(render(spec)))


def test_bad_synth_configs_are_user_errors():
    with pytest.raises(UserError, match="n_classes"):
        SynthConfig(n_classes=5)
    with pytest.raises(UserError, match="loopback"):
        SynthConfig(base_url="http://example.com")
    with pytest.raises(UserError, match="add up"):
        SynthConfig(rates=DefectRates(mismatch=0.9, non_english=0.1))
    with pytest.raises(UserError, match="class_zipf"):
        SynthConfig(class_zipf=-1)


@pytest.mark.e2e
def test_world_layout_and_disjoint_sets(tiny_world):
    world = tiny_world["path"]
    truth = pd.read_parquet(os.path.join(world, "truth.parquet"))
    urls = pd.read_parquet(os.path.join(world, "urls.parquet"))
    assert list(urls.columns) == ["url", "text", "uid"] and len(urls) == len(truth) == 240
    assert set(truth["defect"]) >= set(EXPECTED_STATE) | {"none", *DUPLICATES, "eval_copy", "mismatch",
                                                          "boilerplate", "uninformative"}
    classes = pd.read_parquet(os.path.join(world, "classes.parquet"))
    assert classes.set_index("class")["pool"].to_dict() == truth["cls"].value_counts().to_dict()
    assert (truth.loc[truth.defect == "boilerplate", "cluster"] >= 0).all()
    from winnow.pipeline.data.shards import iter_tar, list_shards, read_table
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


# ---------------------------------------------------------------------- long tail, boilerplate, uninformative


def test_pool_classes_follow_the_long_tail_and_every_class_is_there():

    cfg = SynthConfig(seed=5, n_pool=3000)
    plan, table = plan_pool(cfg), class_table(cfg)
    # every row keeps its planned class, copies and eval copies included: each class's count is its quota
    counts = plan["cls"].value_counts()
    assert dict(zip(table["class"], table["pool"])) == counts.to_dict() and len(counts) == cfg.n_classes
    assert table["pool"].sum() == cfg.n_pool and (np.diff(table["pool"]) <= 0).all()
    assert np.abs(table["pool"] / cfg.n_pool - 1 / np.arange(1, 13) / np.sum(1 / np.arange(1, 13))).max() < 1 / 3000
    assert table["pool"].iloc[0] > 10 * table["pool"].iloc[-1]  # rank 1 vs rank 12 under Zipf 1: 12x
    assert list(table["group"]) == ["head"] * 4 + ["middle"] * 4 + ["tail"] * 4
    assert set(table["class"]) == set(CLASSES) and list(table["label"]) == [CLASSES.index(c) for c in table["class"]]
    assert list(class_table(SynthConfig(seed=6))["class"]) != list(table["class"])  # the tail is a seeded draw
    flat = class_table(SynthConfig(n_pool=1000, class_zipf=0))["pool"]
    assert flat.max() - flat.min() <= 1
    steep = class_table(SynthConfig(n_pool=40, class_zipf=3))["pool"]  # rounding alone would leave some out
    assert steep.sum() == 40 and steep.min() == 1
    copies = plan[plan["defect"] == "eval_copy"]
    n = cfg.n_classes
    assert [CLASSES[e % n] for e in copies["eval_index"]] == list(copies["cls"])


def test_boilerplate_clusters_are_near_identical_samples_of_one_class():

    cfg = SynthConfig(seed=6, n_pool=1500)
    plan = plan_pool(cfg)
    bp = plan[plan["defect"] == "boilerplate"]
    assert len(bp) == round(cfg.rates.boilerplate * cfg.n_pool) and set(bp["cluster"]) == {0, 1, 2}
    assert (plan.loc[plan["defect"] != "boilerplate", "cluster"] == -1).all()

    def pixels(row) -> np.ndarray:
        img = Image.open(io.BytesIO(pool_payload(row))).convert("RGB").resize((32, 32), Image.BILINEAR)
        return np.asarray(img, np.float32)

    for _, members in bp.groupby("cluster"):
        assert members["cls"].nunique() == 1 and (members["caption_cls"] == members["cls"]).all()
        texts = list(members["text"])
        assert len(set(texts)) > 1 and len(os.path.commonprefix(texts)) >= min(map(len, texts)) - 12
        rows = members.drop(columns=["source_uid"]).to_dict("records")[:5]
        others = plan[(plan["defect"] == "none") & (plan["cls"] == rows[0]["cls"])].drop(columns=["source_uid"])
        imgs = [pixels(r) for r in rows]
        within = max(np.abs(a - b).mean() for i, a in enumerate(imgs) for b in imgs[i + 1:])
        across = np.median([np.abs(imgs[0] - pixels(r)).mean() for r in others.to_dict("records")[:10]])
        assert within < 10 and within < across / 4, (within, across)  # mean |difference| of 32 px thumbnails


def test_uninformative_captions_name_no_class_and_mostly_pass_the_basic_filter():
    from winnow.pipeline.synth.captions import SYNONYMS, TEXTURE_WORDS, uninformative

    words = [w.lower() for w in [*sum(SYNONYMS.values(), []), *COLORS, *sum(TEXTURE_WORDS.values(), [])]]
    rng = np.random.default_rng(0)
    drawn = [uninformative(rng) for _ in range(2000)]
    bad = [(t, w) for t in drawn for w in words if w in t.lower()]
    assert not bad, bad[:5]
    long_enough = np.mean([len(t.split()) > 2 and len(t) > 5 for t in drawn])
    assert 0.5 < long_enough < 1  # unlike short_caption, most pass DataComp's caption-length rule
    plan = plan_pool(SynthConfig(seed=3, n_pool=2000))
    rows = plan[plan["defect"] == "uninformative"]
    assert len(rows) > 40 and rows["caption_cls"].isna().all() and (rows["lang"] == "en").all()
    assert not [(t, w) for t in rows["text"] for w in words if w in t.lower()]


def test_per_class_accuracy_on_fixed_embeddings():
    from winnow.pipeline.tasks.zeroshot import metrics, per_class

    weights = np.eye(3)
    # class a: 2 images, both right; class b: 3 images, one right; class c: 1 image, wrong (taken for a)
    images = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.8, 0.2, 0], [0, 0.3, 0.9], [1, 0, 0.2]])
    labels = np.array([0, 0, 1, 1, 1, 2])
    got = per_class(images, weights, labels, ["a", "b", "c"])
    assert got == {"acc1_class_a": 1.0, "acc1_class_b": pytest.approx(1 / 3), "acc1_class_c": 0.0}
    assert np.mean(list(got.values())) == pytest.approx(metrics(images, weights, labels)["mean_per_class_recall"])
    assert set(per_class(images[:2], weights, labels[:2], ["a", "b", "c"])) == {"acc1_class_a"}  # only classes seen


def test_report_shows_head_and_tail_accuracy_from_the_worlds_class_frequencies(tmp_path):

    from winnow.pipeline.core import fsio
    from winnow.pipeline.data.shards import write_table
    from winnow.pipeline.tasks import Task
    from winnow.workflows.compare import find_runs, group_runs
    from winnow.workflows.report import html_report, tail_tables

    table = class_table(SynthConfig())
    write_table(str(tmp_path / "world" / "classes.parquet"), table)
    task = Task("shapes", "zeroshot_classification", str(tmp_path / "world" / "eval"), "acc1", 1 / 12)
    head, tail = set(table.loc[table["group"] == "head", "class"]), set(table.loc[table["group"] == "tail", "class"])
    # subset "flat": every class 0.5; subset "skewed": head classes 0.9 + seed / 10, tail 0.1, middle 0.5
    runs = []
    for subset in ("flat", "skewed"):
        for seed in (0, 1):
            acc = {c: 0.5 if subset == "flat" or c not in head | tail else 0.9 + seed / 10 if c in head else 0.1
                   for c in CLASSES}
            out = str(tmp_path / "logs" / f"{subset}-seed{seed}" / "eval")
            mean = float(np.mean(list(acc.values())))
            fsio.write_json(os.path.join(out, "summary.json"), {"average": mean, "tasks": {"shapes": mean}})
            metrics = {"acc1": mean, "main_metric": mean, **{f"acc1_class_{c}": v for c, v in acc.items()}}
            fsio.write_bytes(os.path.join(out, "eval_results.jsonl"),
                             (json.dumps({"key": "shapes", "dataset": "shapes", "metrics": metrics}) + "\n").encode())
            fsio.write_json(os.path.join(out, "_manifest.json"), {"stage": "evaluate", "params": {
                "model": "m", "pretrained": "x.pt", "tasks": [asdict(task)]}})
            runs.append(out)
    [(name, _, df)] = tail_tables(group_runs(find_runs(runs)))
    assert name == "shapes" and list(df["subset"]) == ["flat", "skewed"] and list(df["seeds"]) == [2, 2]
    assert df["head classes"].tolist() == pytest.approx([0.5, 0.95]) and df["tail classes"].tolist() == pytest.approx(
        [0.5, 0.1])
    assert df["tail - head"].tolist() == pytest.approx([0.0, -0.85])
    page = open(html_report(runs, str(tmp_path / "r.html"), log=lambda m: None)).read()
    assert "Head and tail classes: shapes" in page and "-0.850" in page and ", ".join(table["class"][:4]) in page
