"""DiST: texture syntheses keep texture statistics and lose the layout; the odd-one-out test; the sanity checks."""

import io
import os
import tarfile
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.data.evalsets import read_triplets
from winnow.pipeline.evalsets import dist
from winnow.pipeline.tasks import load_tasklist, odd_one_out


def test_histogram_and_colour_matching_give_the_source_values_exactly():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img = rng.normal(100, 30, (24, 24, 3))
    out = dist.match_colours(img, ref, np.random.default_rng(1))
    assert out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(np.sort(out[..., c], axis=None), np.sort(ref[..., c], axis=None))
    start = dist.phase_randomize(ref, np.random.default_rng(2))
    assert np.array_equal(np.sort(start, axis=None), np.sort(ref, axis=None)) and not np.array_equal(start, ref)


def test_odd_one_out_scores_the_original_and_splits_ties():
    base = np.random.default_rng(0).normal(size=(5, 16))
    twin = base + 0.01
    odd = np.random.default_rng(1).normal(size=(5, 16))
    right = np.stack([odd, base, twin], axis=1)  # the original (index 0) is the odd one
    wrong = np.stack([base, twin, odd], axis=1)
    assert odd_one_out.odd_one_out(right).tolist() == [1.0] * 5
    assert odd_one_out.odd_one_out(wrong).tolist() == [0.0] * 5
    same = np.stack([base, base, base], axis=1)  # a model that sees no difference: chance, not index 0
    assert odd_one_out.odd_one_out(same) == pytest.approx(np.full(5, 1 / 3))
    m = odd_one_out.metrics(np.concatenate([right, wrong]))
    assert m["acc"] == 0.5 and m["acc_ci_low"] <= 0.5 <= m["acc_ci_high"] and m["n"] == 10


def test_texture_network_is_fixed_by_its_seed_and_sized_to_the_image():
    import torch

    x = torch.rand(1, 3, 32, 32)
    a, b, c = dist.texture_net(5, 2), dist.texture_net(5, 2), dist.texture_net(6, 2)
    assert all(torch.equal(p, q) for p, q in zip(a(x), b(x)))
    assert not torch.equal(a(x)[-1], c(x)[-1])
    assert [dist.stages_for(s) for s in (32, 64, 128, 224, 256)] == [2, 3, 4, 4, 5]


@pytest.fixture(scope="module")
def demo_dist(tmp_path_factory):  # minutes of L-BFGS on 2 cores: its tests get a long hang guard (900 s)
    """The demo's DiST set: the demo world's evaluation images (rendered alone) through the demo's settings."""
    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.synth.world import build_world
    from winnow.workflows.settings import load

    cfg = load(None, [])
    synth = replace(cfg.synth, n_pool=12, n_clean=1)  # the evaluation set does not depend on the pool size
    world = str(tmp_path_factory.mktemp("demo_world"))
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        build_world(synth, world, runner, log=lambda m: None)
    out = str(tmp_path_factory.mktemp("dist"))
    summary = dist.build_dist(os.path.join(world, "eval"), out, cfg.demo.dist, log=lambda m: None)
    return {"world": world, "out": out, "summary": summary, "cfg": cfg.demo.dist}


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_demo_set_is_written_with_its_manifest_and_passes_its_gates(demo_dist):
    out, summary, cfg = demo_dist["out"], demo_dist["summary"], demo_dist["cfg"]
    manifest = pd.read_parquet(os.path.join(out, "manifest.parquet"))
    n_classes = 12
    assert len(manifest) == summary["sources"] == cfg.per_class * n_classes
    kept = manifest[manifest["status"] == "kept"]
    assert len(kept) == summary["kept"] and summary["kept"] + summary["dropped"] == summary["sources"]
    assert summary["kept"] >= 0.8 * summary["sources"]  # the gates pass for most sources, redone or not
    assert (kept["failed"] == "").all() and (kept[["gram_a", "gram_b"]].max(axis=1) <= cfg.gram_max).all()
    # each synthesis is far closer to its source's texture statistics than an unrelated source is
    assert (kept[["gram_a", "gram_b"]].max(axis=1) < kept["gram_unrelated"] / 10).all()
    band = kept["structure_unrelated"].abs() + cfg.structure_margin
    assert (kept["structure_a"].abs() <= band).all() and (kept["structure_b"].abs() <= band).all()
    assert (kept["pair_correlation"] <= cfg.pair_max).all() and (kept["seed_a"] != kept["seed_b"]).all()
    assert (manifest.loc[manifest["status"] == "dropped", "failed"] != "").all()
    with tarfile.open(os.path.join(out, "test", "0.tar")) as tar:
        names = tar.getnames()
    assert len(names) == 4 * summary["kept"]
    triplets, labels = read_triplets(out)
    assert len(triplets) == summary["kept"] and sorted(set(labels.tolist())) == sorted(set(kept["label"]))

    from PIL import Image

    assert {Image.open(io.BytesIO(b)).size for t in triplets[:5] for b in t} == {(cfg.size, cfg.size)}


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_reference_models_score_near_chance_on_the_demo_set(demo_dist):
    """Raw pixels and another network's texture statistics cannot find the original: the syntheses leak no
    low-level or texture cue (95% interval contains chance, and the accuracy stays within 0.12 of it)."""

    from PIL import Image

    triplets, _ = read_triplets(demo_dist["out"])
    arr = np.stack([[np.asarray(Image.open(io.BytesIO(b))) for b in t] for t in triplets])
    scores = dist.baseline_scores(arr)
    assert scores == demo_dist["summary"]["baselines"]
    for kind, m in scores.items():
        assert m["acc_ci_low"] <= 1 / 3 <= m["acc_ci_high"] and abs(m["acc"] - 1 / 3) < 0.12, (kind, m)
    # the check can fail: syntheses that are the original blurred are found by both reference models
    from PIL import ImageFilter

    blur = lambda r: np.stack([np.asarray(Image.fromarray(o).filter(ImageFilter.GaussianBlur(r))) for o in arr[:, 0]])  # noqa: E731
    leaky = np.stack([arr[:, 0], blur(1.5), blur(2.5)], axis=1)
    for kind, m in dist.baseline_scores(leaky).items():
        assert m["acc_ci_low"] > 0.6, (kind, m)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_build_is_deterministic_and_evaluates_as_a_task(demo_dist, tmp_path):
    from winnow.pipeline.stages.evaluate import evaluate

    cfg = replace(demo_dist["cfg"], per_class=1, steps=20, retries=0)
    source = os.path.join(demo_dist["world"], "eval")
    first = dist.build_dist(source, str(tmp_path / "a"), cfg, log=lambda m: None)
    dist.build_dist(source, str(tmp_path / "b"), cfg, log=lambda m: None)
    for name in ("test/0.tar", "manifest.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tasks = load_tasklist(str(tmp_path / "a" / "tasks.yaml"))
    assert [(t.kind, t.main_metric) for t in tasks] == [("odd_one_out", "acc")]
    summary = evaluate("winnow-tiny-clip", "", tasks, str(tmp_path / "ev"), device="cpu", log=lambda m: None)
    assert 0 <= summary["tasks"]["dist"] <= 1 and first["kept"] >= 1
