"""Dedup on the tiny pool: copy descriptor trained on the pool, embedded, duplicates and eval copies found."""

import os

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.data.uid import array_to_uids
from winnow.pipeline.models.copydetect import MODEL_NAME
from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.stages.copy_descriptor import CopyDescriptorConfig, train_descriptor
from winnow.pipeline.stages.dedup import DedupConfig, dedup, read_table
from winnow.pipeline.stages.embed import EmbedConfig, embed
from winnow.pipeline.stages.subset import load_recipe, subset
from winnow.pipeline.synth.truth import dedup_check

pytestmark = pytest.mark.e2e
# the demo's documented thresholds (manifests/demo.yaml)
CFG = DedupConfig(tag="copy", near_threshold=0.97, contamination_threshold=0.97)


@pytest.fixture(scope="module")
def deduped(tiny_pool, local_cluster, tmp_path_factory):
    pool, world = tiny_pool["pool"], tiny_pool["world"]
    desc = train_descriptor(pool, str(tmp_path_factory.mktemp("copy")), CopyDescriptorConfig(steps=60),
                            log=lambda m: None)
    embed(pool, EmbedConfig(model=MODEL_NAME, pretrained=desc, tag="copy", batch_size=64), local_cluster,
          log=lambda m: None)
    cfg = DedupConfig(**{**CFG.__dict__, "decontaminate": [os.path.join(world, "eval")]})
    out = str(tmp_path_factory.mktemp("dedup"))
    doc = dedup(pool, cfg, local_cluster, out=out, log=lambda m: None)
    return {**tiny_pool, "cfg": cfg, "out": out, "doc": doc,
            "table": read_table(os.path.join(out, "duplicates.parquet"))}


def test_planted_duplicates_and_every_eval_copy_are_found(deduped):
    check = dedup_check(deduped["pool"], deduped["world"], deduped["table"]).set_index("kind")
    for kind in ("exact_duplicate", "near_reencode", "near_resize"):
        assert check.loc[kind, "planted"] > 0 and check.loc[kind, "recall"] == 1.0, check
    contamination = check.loc["eval_copy (contaminated)"]
    assert contamination["planted"] > 0 and contamination["recall"] == 1.0, check
    assert check.loc["all duplicates (dropped)", "precision"] >= 0.8, check
    exact = deduped["table"].query("kind == 'exact_image'")
    assert (exact.groupby("group")["kept"].sum() == 1).all()  # one kept per group, and it names the group
    assert set(exact.loc[exact["kept"], "uid"]) == set(exact["group"])


def test_keep_policy_is_the_same_in_process_and_on_two_workers(deduped, tmp_path):
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        dedup(deduped["pool"], deduped["cfg"], runner, out=str(tmp_path / "sync"), log=lambda m: None)
    again = read_table(str(tmp_path / "sync" / "duplicates.parquet"))
    pd.testing.assert_frame_equal(again, deduped["table"])


def test_rerun_is_skipped_and_selection_excludes_the_dropped(deduped, local_cluster, tmp_path):
    doc = dedup(deduped["pool"], deduped["cfg"], local_cluster, out=deduped["out"], log=lambda m: None)
    assert doc["finished"] == deduped["doc"]["finished"]
    table = os.path.join(deduped["out"], "duplicates.parquet")
    recipe = load_recipe({"name": "dedup_only", "select": [
        {"exclude_duplicates": {"table": table, "kinds": ["exact_image", "near", "contaminated"]}}]})
    subset(recipe, deduped["pool"], str(tmp_path / "s"), local_cluster, log=lambda m: None)
    kept = set(array_to_uids(np.load(str(tmp_path / "s" / "uids.npy"), allow_pickle=False)))
    t = deduped["table"]
    dropped = set(t.loc[t["kind"].isin(["exact_image", "near", "contaminated"]) & ~t["kept"], "uid"])
    assert dropped and not (kept & dropped)
    assert set(t.loc[t["kept"] & t["kind"].isin(["exact_image", "near"]), "uid"]) - dropped <= kept


def test_a_descriptor_that_cannot_tell_copies_from_look_alikes_is_warned_about(deduped, tmp_path):
    """At a contamination threshold any two of the world's images pass (cosine -1), most of the pool 'copies'
    the eval set: the run says the descriptor cannot tell, instead of silently dropping the pool."""
    said = []
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        dedup(deduped["pool"], DedupConfig(**{**deduped["cfg"].__dict__, "contamination_threshold": -1.0}), runner,
              out=str(tmp_path / "loose"), log=said.append)
    warning = [m for m in said if m.startswith("warning:")]
    assert len(warning) == 1 and "probably cannot tell a copy from a look-alike" in warning[0]
