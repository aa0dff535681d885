"""DataComp's whole evaluation: its 40-task list (38 with a main metric) on miniature eval sets written in the
published layouts (wds_<task>_test folders, the Hugging Face cache), offline; the results file reads as DataComp's
aggregate_scores.py reads it; a folder holding only some sets runs those and names the rest; the work spreads over
workers; DataComp's protocol-4 centroid files load, and nothing but arrays does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from winnow.pipeline.synth.datacomp_evalsets import write_evalsets
from winnow.pipeline.tasks import load_tasklist, tasklists_dir

# aggregate_scores.py's groups (DataComp): the ImageNet shifts, VTAB's 13 and the retrieval tasks
GROUPS = {"ImageNet dist. shifts": {"ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R",
                                    "ObjectNet"},
          "VTAB": {"Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
                   "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45",
                   "SVHN", "SUN397"},
          "Retrieval": {"Flickr", "MSCOCO", "WinoGAViL"}}


def aggregate(results_file: str) -> dict:
    """The reading aggregate_scores.py does: results lines, metrics expanded, rows without a main metric dropped,
    38 rows expected, the group means and the average."""
    df = pd.read_json(results_file, lines=True)
    df = pd.concat([df.drop(["metrics"], axis=1), df["metrics"].apply(pd.Series)], axis=1)
    df = df.dropna(subset=["main_metric"])
    assert len(df) == 38, f"Results file has unexpected size, {len(df)}"
    results = dict(zip(df.dataset, df.main_metric))
    out = {"ImageNet": results["ImageNet 1k"], **{g: np.mean([results[d] for d in ds]) for g, ds in GROUPS.items()}}
    return out | {"Average": np.mean(list(results.values()))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A winnow-tiny-clip checkpoint in a run folder whose manifest names the model."""
    from winnow.pipeline.models.registry import load

    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    net, _, _ = load("winnow-tiny-clip", "", seed=1)
    torch.save({"state_dict": net.state_dict()}, run / "checkpoints" / "epoch_1.pt")
    (run / "_manifest.json").write_text(json.dumps({"stage": "train", "params": {"model": "winnow-tiny-clip"}}))
    return str(run / "checkpoints" / "epoch_1.pt")


def winnow(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "winnow.workflows.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_shipped_task_list_is_datacomps(tmp_path):
    doc = yaml.safe_load((tasklists_dir() / "datacomp.yaml").read_text())
    assert len(doc) == 40 and len({v["name"] for v in doc.values()}) == 40
    write_evalsets(str(tmp_path), keys=list(doc))
    tasks = load_tasklist("datacomp", {"data_dir": str(tmp_path)}, log=lambda m: None)
    main = [t for t in tasks if not t.diagnostic]
    assert len(main) == 38 and {t.key for t in tasks if t.diagnostic} == {"fairness/fairface", "fairness/utkface"}
    kinds = {t.key: t.kind for t in tasks}
    assert kinds["wilds/fmow"] == "wilds" and kinds["fairness/geode"] == "fairness"
    assert kinds["misc/winogavil"] == "winogavil" and kinds["retrieval/mscoco_2014_5k_test_image_text_retrieval"] == \
        "retrieval" and kinds["imagenet1k"] == "zeroshot_classification"
    assert {t.key: t.main_metric for t in tasks}["wilds/iwildcam"] == "F1-macro_all"


@pytest.mark.e2e
def test_every_task_scores_and_the_results_read_as_datacomps(checkpoint, tmp_path):
    data = tmp_path / "evalsets"
    written = write_evalsets(str(data))
    assert len(written) == 40 and (data / "wds_dollar_street_test" / "test" / "nshards.txt").exists()
    ran = winnow("evaluate", checkpoint, "--tasks", "datacomp", "--var", f"data_dir={data}", "--out",
                 str(tmp_path / "eval"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    lines = [json.loads(ln) for ln in (tmp_path / "eval" / "eval_results.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    by_key = {ln["key"]: ln for ln in lines}
    none = [k for k, ln in by_key.items() if ln["metrics"]["main_metric"] is None]
    assert sorted(none) == ["fairness/fairface", "fairness/utkface"]
    assert all(np.isfinite(ln["metrics"]["main_metric"]) for k, ln in by_key.items() if k not in none)
    # the metrics DataComp's own code reports, under its names
    assert {"acc_avg", "recall-macro_all", "F1-macro_all"} <= set(by_key["wilds/iwildcam"]["metrics"])
    assert {"acc_worst_region", "acc_worst_year", "acc_region:5"} <= set(by_key["wilds/fmow"]["metrics"])
    assert {"acc_slide:0", "acc_wg"} <= set(by_key["wilds/camelyon17"]["metrics"])
    assert {"acc_top5_avg", "acc_top5_wg", "acc_top5_income_ds:0"} <= set(by_key["fairness/dollar_street"]["metrics"])
    assert {"acc_wg", "acc_region:0"} <= set(by_key["fairness/geode"]["metrics"])
    assert {"acc_race_wg", "acc_gender_x_gender:1_race:6", "toxicity_crime_avg", "toxicity_nonhuman_wg"} <= set(
        by_key["fairness/fairface"]["metrics"])
    assert {"jaccard_score_10-12", "avg_jaccard_score"} <= set(by_key["misc/winogavil"]["metrics"])
    assert by_key["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]["main_metric"] == pytest.approx(
        0.5 * (by_key["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]["text_retrieval_recall@1"]
               + by_key["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]["image_retrieval_recall@1"]))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    scores = aggregate(str(tmp_path / "eval" / "eval_results.jsonl"))
    assert summary["averaged"] == 38 and summary["average"] == pytest.approx(scores["Average"], abs=1e-12)

    # the same work spread over two workers gives the same results
    spread = winnow("evaluate", checkpoint, "--tasks", "datacomp", "--var", f"data_dir={data}", "--out",
                    str(tmp_path / "eval2"), "--workers", "2")
    assert spread.returncode == 0, spread.stderr[-2000:]
    again = json.loads((tmp_path / "eval2" / "summary.json").read_text())
    assert again["tasks"] == summary["tasks"]


@pytest.mark.e2e
def test_a_folder_with_some_eval_sets_runs_those_and_names_the_rest(checkpoint, tmp_path):
    data = tmp_path / "some"
    write_evalsets(str(data), keys=["cifar10", "wilds/fmow", "misc/winogavil"])
    ran = winnow("evaluate", checkpoint, "--tasks", "datacomp", "--var", f"data_dir={data}", "--out",
                 str(tmp_path / "eval"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    said = ran.stdout + ran.stderr
    assert "ImageNet 1k (imagenet1k) is not in" in said and "download_evalsets.py" in said
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert sorted(summary["tasks"]) == ["CIFAR-10", "FMoW", "WinoGAViL"] and len(summary["missing"]) == 37
    assert "this average is not the task list's" in said
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = winnow("evaluate", checkpoint, "--tasks", "datacomp", "--var", f"data_dir={empty}", "--out",
                     str(tmp_path / "none"))
    lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("winnow: error:")]
    assert refused.returncode == 2 and len(lines) == 1 and "none of the 40 eval sets" in lines[0]


def test_datacomps_protocol_4_centroids_load_and_other_objects_do_not(tmp_path):
    from winnow.filters.image_cluster import load_matrix
    from winnow.pipeline.core.errors import UserError

    centroids = np.random.default_rng(0).random((7, 4)).astype(np.float32)
    torch.save(centroids, tmp_path / "centroids.pt", pickle_protocol=4)  # as image_based_clustering.py saves
    assert np.array_equal(load_matrix(str(tmp_path / "centroids.pt"), "centroids"), centroids)
    tensor = torch.randn(5, 3)
    torch.save({"image_features": tensor}, tmp_path / "features.pt", pickle_protocol=4)
    assert np.allclose(load_matrix(str(tmp_path / "features.pt"), "target"), tensor.numpy())

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save(Payload(), tmp_path / "evil.pt", pickle_protocol=4)
    with pytest.raises(UserError, match="not a plain array or tensor file"):
        load_matrix(str(tmp_path / "evil.pt"), "centroids")
    assert not (tmp_path / "pwned").exists()
