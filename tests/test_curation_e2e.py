"""Embed -> score -> subset -> reshard -> train with open_clip_train, on the tiny pool and a real LocalCluster."""

import io
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.data import shards
from winnow.pipeline.data.parts import load_npz
from winnow.pipeline.data.uid import array_to_uids
from winnow.pipeline.stages.embed import EmbedConfig, embed
from winnow.pipeline.stages.reshard import reshard
from winnow.pipeline.stages.subset import subset, write_subset

pytestmark = pytest.mark.e2e
TINY = EmbedConfig(model="winnow-tiny-clip", pretrained="", tag="tiny", batch_size=32, decode_threads=2)


@pytest.fixture(scope="module")
def embedded(tiny_pool, local_cluster):
    doc = embed(tiny_pool["pool"], TINY, local_cluster, log=lambda m: None)
    return {**tiny_pool, "embed": doc, "emb_dir": os.path.join(tiny_pool["pool"], "embeddings", "tiny")}


def test_embeddings_are_row_aligned_float16_and_nan_where_no_image(embedded):
    pool = embedded["pool"]
    for i in shards.list_shards(pool):
        table = shards.read_table(pool, i)
        with np.load(os.path.join(embedded["emb_dir"], f"{i:08d}.npz"), allow_pickle=False) as z:
            assert sorted(z.files) == ["tiny_img", "tiny_txt"] and z["tiny_img"].dtype == np.float16
            img = z["tiny_img"].astype(np.float32)
        assert img.shape == (len(table), 128)
        ok = (table["state"] == "ok").to_numpy()
        assert np.isfinite(img[ok]).all() and np.isnan(img[~ok]).all()
        assert np.allclose(np.linalg.norm(img[ok], axis=1), 1, atol=1e-2)
        ledger = pd.read_parquet(os.path.join(embedded["emb_dir"], f"{i:08d}.parquet"))
        assert list(ledger["uid"]) == list(table["uid"]) and set(ledger["state"]) <= {"ok", "not_downloaded"}
    assert embedded["embed"]["rows"]["embedded_images"] == embedded["manifest"]["rows"]["ok"]


def test_embedding_is_deterministic_and_matches_a_bare_forward_pass(embedded):

    import torch
    from PIL import Image

    from winnow.pipeline.models.registry import load

    model, preprocess, _ = load("winnow-tiny-clip", "", seed=0)
    sample = next(shards.iter_tar(shards.paths(embedded["pool"], 0)["tar"]))
    row = shards.read_table(embedded["pool"], 0)["key"].tolist().index(sample["__key__"])
    with torch.no_grad():
        ref = model.encode_image(preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))[None],
                                 normalize=True)[0].numpy()
    stored = load_npz(os.path.join(embedded["emb_dir"], "00000000.npz"), "tiny")["img"][row]
    assert np.allclose(stored, ref, atol=2e-3)


def test_corrupt_image_found_at_embed_time_becomes_a_ledger_entry(embedded, local_cluster, tmp_path):
    pool = str(tmp_path / "pool")
    shutil.copytree(embedded["pool"], pool, ignore=shutil.ignore_patterns("embeddings", "scores"))
    tar_path = shards.paths(pool, 0)["tar"]
    samples = list(shards.iter_tar(tar_path))
    broken_key = samples[0]["__key__"]
    with shards.TarWriter(tar_path) as tar:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    tar.add(f"{s['__key__']}.{ext}",
                            b"\xff\xd8\xff garbage" if (s["__key__"], ext) == (broken_key, "jpg") else data)
    doc = embed(pool, TINY, local_cluster, log=lambda m: None)
    ledger = pd.read_parquet(os.path.join(pool, "embeddings", "tiny", "00000000.parquet")).set_index("key")
    assert ledger.loc[broken_key, "state"] == "decode_error" and doc["rows"]["decode_errors"] == 1


def test_subset_reshard_and_train_with_open_clip_train(embedded, local_cluster, tmp_path):
    pool = embedded["pool"]
    out = str(tmp_path / "clip30")
    recipe = {"name": "clip30", "filters": [{"key": "clip", "params": {"tag": "tiny"}}],
              "select": [{"top_fraction": {"column": "clip_tiny_score", "fraction": 0.5}}]}
    doc = subset(recipe, pool, out, local_cluster, log=lambda m: None)
    uids = array_to_uids(np.load(os.path.join(out, "uids.npy"), allow_pickle=False))
    ok = embedded["manifest"]["rows"]["ok"]
    assert doc["kept"] == len(uids) and int(ok * 0.5) <= len(uids) <= int(ok * 0.5) + 2

    # repeat one uid three times: DataComp's upsampling
    write_subset(str(tmp_path / "rep"), uids + [uids[0]] * 2, {})
    shard_dir = str(tmp_path / "shards")
    man = reshard(pool, str(tmp_path / "rep" / "uids.npy"), shard_dir, local_cluster, shard_size=16,
                  log=lambda m: None)
    assert man["rows"]["samples"] == len(uids) + 2
    sizes = pd.read_json(os.path.join(shard_dir, "sizes.json"), typ="series")
    assert sizes.sum() == len(uids) + 2 and (sizes.iloc[:-1] == 16).all()
    keys = [s["__key__"] for i in range(len(sizes)) for s in shards.iter_tar(os.path.join(shard_dir, f"{i:08d}.tar"))]
    assert {f"{uids[0]}-0", f"{uids[0]}-1", f"{uids[0]}-2"} <= set(keys) and len(keys) == len(set(keys))

    # bytes are copied, not re-encoded
    source = {}
    table = pd.concat(shards.read_table(pool, i) for i in shards.list_shards(pool)).set_index("key")
    for i in shards.list_shards(pool):
        for s in shards.iter_tar(shards.paths(pool, i)["tar"]):
            source[table.loc[s["__key__"], "uid"]] = s["jpg"]
    first = next(shards.iter_tar(os.path.join(shard_dir, "00000000.tar")))
    assert first["jpg"] == source[first["__key__"].rsplit("-", 1)[0]]

    from winnow.pipeline.models.registry import load
    from winnow.pipeline.stages.train import TrainConfig, train

    for arch in ("winnow-tiny-clip", "winnow-tiny-vitamin"):  # a plain ViT and a ViTamin tower
        ckpt = train(shard_dir, str(tmp_path / "logs"), arch, TrainConfig(model=arch, samples_seen=64, batch_size=16,
                                                                          warmup=1), log=lambda m: None)
        model, _, _ = load(arch, ckpt)
        start, _, _ = load(arch, "", seed=0)  # the trainer's seed-0 initialisation
        trained = {k: v for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        assert any(not v.equal(start.state_dict()[k]) for k, v in trained.items()), "training changed no weight"
        from winnow.pipeline.stages.evaluate import evaluate
        from winnow.pipeline.tasks import load_tasklist
        from winnow.workflows.settings import demo_config_path

        tasks = load_tasklist(str(demo_config_path().parent / "tasks" / "demo.yaml"),
                              {"world": embedded["world"]})
        summary = evaluate(arch, ckpt, tasks, str(tmp_path / "eval" / arch), device="cpu", log=lambda m: None)
        from winnow.pipeline.tasks import Context, run_task

        direct = run_task(tasks[0], Context(model, *load(arch, ckpt)[1:], device="cpu"))  # the same model, by hand
        assert summary["tasks"]["synthetic-shapes"] == pytest.approx(direct["acc1"], abs=1e-9)
    # the same shards, config and seed give the same weights
    again = train(shard_dir, str(tmp_path / "logs2"), arch, TrainConfig(model=arch, samples_seen=64, batch_size=16,
                                                                        warmup=1), log=lambda m: None)
    first, second = (load(arch, c)[0].state_dict() for c in (ckpt, again))
    assert all(first[k].equal(second[k]) for k in first)
    # the Patch Mixing augmentation runs inside the same trainer
    train(shard_dir, str(tmp_path / "logs"), "pm", TrainConfig(samples_seen=64, batch_size=16, warmup=1,
                                                              patch_mixing=1.0), log=lambda m: None)
    assert "Patch Mixing: p=1.0" in (tmp_path / "logs" / "pm" / "out.log").read_text()
    from winnow.pipeline.core.errors import UserError
    with pytest.raises(UserError, match="exists"):  # open_clip_train would silently skip a reused name
        train(shard_dir, str(tmp_path / "logs"), arch, TrainConfig(model=arch, samples_seen=64, batch_size=16),
              log=lambda m: None)


def test_new_subsets_from_stored_scores_read_no_image(embedded, local_cluster, tmp_path):
    pool = str(tmp_path / "pool")
    shutil.copytree(embedded["pool"], pool)
    recipe = {"name": "a", "filters": [{"key": "clip", "params": {"tag": "tiny"}}, {"key": "english"}],
              "select": [{"threshold": {"column": "english_score", "min": 1}}]}
    subset(recipe, pool, str(tmp_path / "a"), local_cluster, log=lambda m: None)
    for name in os.listdir(pool):
        if name.endswith(".tar"):
            os.remove(os.path.join(pool, name))  # no pixels left at all
    other = {**recipe, "name": "b", "select": [{"top_fraction": {"column": "clip_tiny_score", "fraction": 0.2}}]}
    doc = subset(other, pool, str(tmp_path / "b"), local_cluster, log=lambda m: None)
    assert doc["kept"] > 0


def test_datacomp_metadata_is_filtered_as_is(tmp_path, local_cluster):
    """A DataComp-style metadata folder: <hex>.parquet (the nine columns) beside <hex>.npz (b32_img, ...)."""
    rng = np.random.default_rng(0)
    n = 50
    meta = pd.DataFrame({
        "uid": [f"{rng.integers(2**63):016x}{i:016x}" for i in range(n)],
        "url": [f"http://x/{i}.jpg" for i in range(n)], "text": ["a photo of a cat on a mat"] * n,
        "original_width": rng.integers(100, 800, n), "original_height": rng.integers(100, 800, n),
        "clip_b32_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
        "clip_l14_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
        "face_bboxes": [[] for _ in range(n)], "sha256": ["0" * 64] * n})
    stem = "0123456789abcdef0123456789abcdef"
    meta.to_parquet(tmp_path / f"{stem}.parquet")
    vecs = rng.normal(size=(n, 16)).astype(np.float16)
    np.savez(tmp_path / f"{stem}.npz", b32_img=vecs, b32_txt=vecs, l14_img=vecs, l14_txt=vecs)
    doc = subset("clip_b32_threshold", str(tmp_path), str(tmp_path / "out"), local_cluster, log=lambda m: None)
    assert doc["kept"] == int((meta["clip_b32_similarity_score"] >= 0.25).sum())
    doc = subset("clip_l14_30pct", str(tmp_path), str(tmp_path / "out2"), local_cluster, log=lambda m: None)
    assert doc["kept"] == 16  # n = int(50 * 0.3) = 15 -> the 16 largest (no ties in random floats)
    basic = subset("basic", str(tmp_path), str(tmp_path / "out3"), local_cluster, log=lambda m: None)
    w, h = meta["original_width"], meta["original_height"]
    assert basic["kept"] == int(((np.minimum(w, h) >= 200) & (np.maximum(w, h) / np.minimum(w, h) <= 3)).sum())


def test_dfn_training_then_dfn_score_on_the_tiny_pool(embedded, local_cluster, tmp_path):
    """A filtering network trained on the clean set, embedding the pool under tag dfn, feeds the DFN recipes."""
    from winnow.pipeline.stages.dfn import train_dfn
    from winnow.pipeline.stages.train import TrainConfig

    clean = os.path.join(embedded["world"], "clean")
    ckpt = train_dfn(clean, str(tmp_path / "dfn"), "dfn", TrainConfig(samples_seen=48, batch_size=16, warmup=1),
                     local_cluster, log=lambda m: None)
    dfn = EmbedConfig(model="winnow-tiny-clip", pretrained=ckpt, tag="dfn", batch_size=32, decode_threads=2)
    embed(embedded["pool"], dfn, local_cluster, log=lambda m: None)
    doc = subset("dfn_30pct", embedded["pool"], str(tmp_path / "dfn30"), local_cluster, log=lambda m: None)
    ok = embedded["manifest"]["rows"]["ok"]
    assert doc["steps"][-1]["rule"].endswith("dfn_dfn_score") and int(ok * 0.3) <= doc["kept"] <= int(ok * 0.3) + 2
    both = subset("dfn_and_basic", embedded["pool"], str(tmp_path / "both"), local_cluster, log=lambda m: None)
    assert both["kept"] <= doc["kept"]


def test_the_demos_method_recipes_keep_thirty_percent_of_a_real_pool(embedded, local_cluster, tmp_path):
    """make demo-methods' recipes (negCLIPLoss, negCLIPLoss then NormSim with the clean set as target, density
    pruning, MetaCLIP) on the ingested tiny pool, embedded (and its clean set) under the demo's tag, on the
    LocalCluster: each keeps 30% of the downloaded rows, the size the comparison holds fixed."""
    pool, world = str(tmp_path / "pool"), embedded["world"]
    shutil.copytree(embedded["pool"], pool)
    clean = str(tmp_path / "clean")
    shutil.copytree(os.path.join(world, "clean"), clean)
    demo = EmbedConfig(model="winnow-tiny-clip", pretrained="", tag="demo", batch_size=32, decode_threads=2)
    for folder in (pool, clean):
        embed(folder, demo, local_cluster, log=lambda m: None)
    fake_world = str(tmp_path / "world")
    os.makedirs(fake_world)
    os.symlink(clean, os.path.join(fake_world, "clean"))
    ok = embedded["manifest"]["rows"]["ok"]
    kept = {}
    for name in ("demo_negcliploss30", "demo_negcliploss_normsim30", "demo_density30", "demo_metaclip30"):
        doc = subset(name, pool, str(tmp_path / name), local_cluster, variables={"world": fake_world},
                     log=lambda m: None)
        kept[name] = doc["kept"]
        uids = np.load(tmp_path / name / "uids.npy", allow_pickle=False)
        assert len(uids) == doc["kept"] and len(np.unique(uids)) == len(uids)
    assert int(ok * 0.3) <= kept["demo_negcliploss30"] <= int(ok * 0.3) + 1
    assert kept["demo_density30"] == int(ok * 0.3)  # exact budgets (every downloaded row has an embedding)
    assert int(int(ok * 0.45) * 0.667) <= kept["demo_negcliploss_normsim30"] <= int(int(ok * 0.45) * 0.667) + 3
    assert 0.15 * ok < kept["demo_metaclip30"] <= int(ok * 0.3) + 1  # only English captions matching an entry
