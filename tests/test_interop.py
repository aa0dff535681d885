"""Interoperability of evaluation: DataComp's tasklist.yml and results rows, clip_benchmark's multi-caption
retrieval, per-item samples, one average, shipped task lists by name."""

import json
import os

import numpy as np
import pytest
from test_tasks import COLOURS, ColourModel, png, preprocess, tokenizer, write_set

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.tasks import Context, Task, average_of, load_tasklist, run_task_samples, samples_path
from winnow.pipeline.tasks.retrieval import hits, per_image
from winnow.pipeline.tasks.retrieval import metrics as retrieval_metrics
from winnow.pipeline.tasks.zeroshot import metrics as zeroshot_metrics
from winnow.pipeline.tasks.zeroshot import per_image as zeroshot_per_image

# DataComp's tasklist.yml shape (keys, fields, document markers); entries copied in kind, not in full
DATACOMP_TASKLIST = """---

# Caltech-101
vtab/caltech101:
  name: Caltech-101
  size: 8
  main_metric: mean_per_class_recall
  time: 29
  num_classes: 6
  random_score: 0.166667
  tags:
    - vtab_natural

# ImageNet 1k
imagenet1k:
  name: ImageNet 1k
  size: 8
  time: 84
  num_classes: 6
  random_score: 0.166667

# Flickr30k
retrieval/flickr_1k_test_image_text_retrieval:
  name: Flickr
  size: 6
  main_metric: mean_recall@1
  tags:
    - retrieval

# WinoGAViL
misc/winogavil:
  name: WinoGAViL
  main_metric: jaccard_score_10-12
  tags:
    - retrieval

# FairFace
fairness/fairface:
  name: FairFace
  tags:
    - fairness

...
"""
LABELS = [0, 1, 2, 3, 4, 5, 2, 1]


def datacomp_data(data_dir):
    """Small eval sets where DataComp's downloader puts them: wds_<key, / as ->_test."""
    for folder in ("wds_vtab-caltech101_test", "wds_imagenet1k_test"):
        write_set(os.path.join(data_dir, folder), [{"png": png(lab), "cls": str(lab).encode()} for lab in LABELS])
    write_set(os.path.join(data_dir, "wds_retrieval-flickr_1k_test_image_text_retrieval_test"),
              [{"png": png(lab), "txt": f"a {COLOURS[lab]} square\na {COLOURS[lab]} patch".encode()}
               for lab in range(6)])


def test_multi_caption_retrieval_recall_by_hand():
    images = np.eye(3)
    # captions 0-1 are image 0's, 2-3 image 1's, 4-6 image 2's
    texts = np.array([[1, 0, 0], [0, 1, 0], [0, .9, .1], [0, 0, 1], [.6, 0, .8], [.8, 0, .6], [.7, .7, 0]])
    owner = np.array([0, 0, 1, 1, 2, 2, 2])
    m = retrieval_metrics(images, texts, ks=(1, 2, 3), text_image=owner)
    # text -> image, one query per caption: captions 0, 2, 4 find their image first; 1, 3, 5 second; 6 third
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 7)
    assert m["image_retrieval_recall@2"] == pytest.approx(6 / 7) and m["image_retrieval_recall@3"] == 1.0
    # image -> text, a hit when any of the image's captions is in its top k: image 0's best caption is first;
    # images 1 and 2 each have one other image's caption (1 and 3) above their best one
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3) and m["text_retrieval_recall@2"] == 1.0
    assert m["mean_recall@1"] == pytest.approx(0.5 * (3 / 7 + 1 / 3))
    per = per_image(hits(images, texts, owner, ks=(1, 2)), owner)
    assert per["image_retrieval_recall@1"] == pytest.approx([1 / 2, 1 / 2, 1 / 3])  # share of captions that hit
    assert per["text_retrieval_recall@1"] == pytest.approx([1, 0, 0])
    assert per["mean_recall@1"] == pytest.approx([3 / 4, 1 / 4, 1 / 6])
    # with as many captions per image, the per-image values average to the metric
    even = np.array([0, 0, 1, 1, 2, 2])
    m6 = retrieval_metrics(images, texts[:6], ks=(1,), text_image=even)
    per6 = per_image(hits(images, texts[:6], even, ks=(1,)), even)
    assert per6["mean_recall@1"].mean() == pytest.approx(m6["mean_recall@1"])


def test_per_image_zeroshot_values_average_to_each_metric():
    weights = np.eye(3)
    labels = np.array([0, 0, 0, 1, 2, 2])
    images = np.eye(3)[[0, 0, 1, 1, 2, 0]]  # images 2 and 5 are wrong
    m, per = zeroshot_metrics(images, weights, labels), zeroshot_per_image(images, weights, labels)
    assert m["acc1"] == pytest.approx(4 / 6) and per["acc1"].tolist() == [1, 1, 0, 1, 1, 0]
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    # a right image weighs n / (classes * its class's images): 2/3 in class 0, 2 in class 1, 1 in class 2
    assert per["mean_per_class_recall"] == pytest.approx([2 / 3, 2 / 3, 0, 2, 1, 0])
    assert per["mean_per_class_recall"].mean() == pytest.approx(m["mean_per_class_recall"])


@pytest.mark.parametrize("main", ["acc1", "mean_per_class_recall", "image_retrieval_recall@1", "acc"])
def test_samples_are_the_main_metric_per_eval_item(main, tmp_path):
    ctx = Context(ColourModel(), preprocess, tokenizer)
    if main == "acc":  # odd-one-out: one value per triplet; the second triplet's syntheses are the original
        write_set(str(tmp_path), [{"original.png": png(0), "synth_a.png": png(1), "synth_b.png": png(1)},
                                  {"original.png": png(2), "synth_a.png": png(2), "synth_b.png": png(2)}])
        task = Task("d", "odd_one_out", str(tmp_path), "acc")
        expected = [1.0, 1 / 3]
    elif main.startswith("image"):  # two captions per image, one of them naming another colour
        write_set(str(tmp_path), [{"png": png(lab), "txt": f"a {COLOURS[lab]} square\na {COLOURS[(lab + 1) % 6]} "
                                   "thing".encode()} for lab in range(6)])
        task = Task("r", "retrieval", str(tmp_path), main)
        expected = [0.5] * 6
    else:  # class 2's images are shown in class 1's colour
        write_set(str(tmp_path), [{"png": png(1 if lab == 2 else lab), "cls": str(lab).encode()} for lab in LABELS])
        task = Task("z", "zeroshot_classification", str(tmp_path), main)
        right = [float(lab != 2) for lab in LABELS]
        expected = right if main == "acc1" else [r * len(LABELS) / (6 * LABELS.count(lab))
                                                 for r, lab in zip(right, LABELS)]
    metrics, samples = run_task_samples(task, ctx)
    assert samples.dtype == np.float32 and samples.shape == (len(expected),)
    assert samples.tolist() == pytest.approx(expected)
    assert samples.mean() == pytest.approx(metrics[main])


def test_datacomp_tasklist_maps_keys_kinds_metrics_and_folders(tmp_path):
    path = tmp_path / "tasklist.yml"
    path.write_text(DATACOMP_TASKLIST)
    notes = []
    with pytest.raises(UserError, match="DataComp's format; pass --var data_dir=FOLDER"):
        load_tasklist(str(path), log=notes.append)
    with pytest.raises(UserError, match="none of the 5 eval sets of tasklist.yml is in .*download_evalsets.py"):
        load_tasklist(str(path), {"data_dir": str(tmp_path / "data")}, log=notes.append)
    datacomp_data(str(tmp_path / "data"))
    notes.clear()
    tasks = load_tasklist(str(path), {"data_dir": str(tmp_path / "data")}, log=notes.append)
    assert [(t.key, t.name, t.kind, t.main_metric, bool(t.missing)) for t in tasks] == [
        ("vtab/caltech101", "Caltech-101", "zeroshot_classification", "mean_per_class_recall", False),
        ("imagenet1k", "ImageNet 1k", "zeroshot_classification", "acc1", False),
        ("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "retrieval", "mean_recall@1", False),
        ("misc/winogavil", "WinoGAViL", "winogavil", "jaccard_score_10-12", True),  # scored, when its data is here
        ("fairness/fairface", "FairFace", "fairness", "", True)]  # no main metric, as in DataComp
    assert tasks[2].data == str(tmp_path / "data" / "wds_retrieval-flickr_1k_test_image_text_retrieval_test")
    assert tasks[3].data == str(tmp_path / "data" / "hf_cache" / "nlphuji___winogavil")
    assert tasks[4].data == str(tmp_path / "data" / "wds_fairface_test") and tasks[4].diagnostic
    assert tasks[0].random_score == pytest.approx(0.166667)
    assert len(notes) == 2 and "WinoGAViL (misc/winogavil) is not in" in notes[0] and "download_evalsets.py" in notes[0]


def test_shipped_task_lists_by_name_and_task_list_messages(tmp_path):
    tasks = load_tasklist("demo", {"world": "/w"})
    assert [t.name for t in tasks] == ["synthetic-shapes", "synthetic-shapes-retrieval"]
    with pytest.raises(UserError, match=r"task list 'nope' not found; give a YAML path or a shipped name: .*demo"):
        load_tasklist("nope")
    with pytest.raises(UserError, match=r"^task list demo.yaml uses \$\{world\}; pass --var world=VALUE$"):
        load_tasklist("demo")
    twice = tmp_path / "t.yaml"
    twice.write_text("tasks:\n  - {name: a b, kind: retrieval, data: d, main_metric: mean_recall@1}\n"
                     "  - {name: a_b, kind: retrieval, data: d, main_metric: mean_recall@1}\n")
    with pytest.raises(UserError, match="two tasks are named 'a_b'"):  # their files would collide
        load_tasklist(str(twice))
    twice.write_text("tasks:\n  - {name: a, kind: retrieval, data: d, main_metric: acc1}\n")
    with pytest.raises(UserError, match="main_metric 'acc1' is not one of image_retrieval_recall@1"):
        load_tasklist(str(twice))


def test_average_of_leaves_diagnostics_out():
    tasks = [Task("z", "zeroshot_classification", "d", "acc1"), Task("r", "retrieval", "d", "mean_recall@1"),
             Task("dist", "odd_one_out", "d", "acc"),
             Task("pm-0", "zeroshot_classification", "d", "acc1", curve="mix", x=0.0)]
    assert average_of(tasks, [0.2, 0.4, 0.9, 0.8]) == pytest.approx(0.3)
    assert average_of(tasks[2:], [0.9, 0.8]) is None  # only diagnostics: no average
    with pytest.raises(ValueError):
        average_of(tasks, [0.2])


def datacomp_aggregate(results_file):
    """What DataComp's aggregate_scores.py reads (a reimplementation): rows' top-level fields beside their metrics
    as one table (a field in both would be a duplicate column), rows without a main metric dropped, then the
    main metric by dataset name, averaged."""
    rows = [json.loads(line) for line in open(results_file)]
    table = []
    for row in rows:
        top = {k: v for k, v in row.items() if k != "metrics"}
        assert not set(top) & set(row["metrics"]), "a metric named like a row field breaks DataComp's table"
        table.append(top | row["metrics"])
    kept = [r for r in table if r.get("main_metric") is not None]
    scores = {r["dataset"]: r["main_metric"] for r in kept}
    return scores, float(np.mean(list(scores.values())))


def datacomp_resume(tasklist, results_file):
    """What DataComp's evaluate.py does with an existing eval_results.jsonl (a reimplementation): rows whose key
    is in its task list are kept by dataset name; a task whose name is among them is skipped and its
    ``metrics.main_metric`` read. Returns (skipped, to evaluate)."""
    found = {}
    for row in map(json.loads, open(results_file)):
        if row["key"] in tasklist:
            found[row["dataset"]] = row
    skipped = [k for k in tasklist if tasklist[k].get("name", k) in found]
    for k in skipped:
        float(found[tasklist[k].get("name", k)]["metrics"]["main_metric"])
    return skipped, [k for k in tasklist if k not in skipped]


@pytest.mark.e2e
def test_datacomp_tasklist_evaluates_into_rows_datacomps_readers_read(tmp_path, capsys):
    import yaml

    from winnow.workflows.cli import main

    (tmp_path / "tasklist.yml").write_text(DATACOMP_TASKLIST)
    datacomp_data(str(tmp_path / "data"))
    out = tmp_path / "eval"
    assert main(["evaluate", "", "--tasks", str(tmp_path / "tasklist.yml"), "--var", f"data_dir={tmp_path / 'data'}",
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for i, name in enumerate(["Caltech-101", "ImageNet 1k", "Flickr"], 1):
        assert f"evaluate: {i}/3 tasks ({name} " in printed  # progress as each task finishes
    rows = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    tasklist = yaml.safe_load(DATACOMP_TASKLIST)
    assert [set(r) for r in rows] == [{"key", "dataset", "metrics"}] * 3  # DataComp's fields, nothing else
    assert [(r["key"], r["dataset"]) for r in rows] == [(k, tasklist[k]["name"]) for k in list(tasklist)[:3]]
    for r in rows:
        assert r["metrics"]["main_metric"] == r["metrics"][tasklist[r["key"]].get("main_metric", "acc1")]
    scores, average = datacomp_aggregate(out / "eval_results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert scores == summary["tasks"] and average == pytest.approx(summary["average"])
    assert datacomp_resume(tasklist, out / "eval_results.jsonl") == (list(tasklist)[:3], list(tasklist)[3:])
    for r, n in zip(rows, [8, 8, 6]):  # one value per image, averaging to the main metric (2 captions per image)
        samples = np.load(samples_path(str(out), r["dataset"]), allow_pickle=False)
        assert samples.shape == (n,) and samples.mean() == pytest.approx(r["metrics"]["main_metric"], abs=1e-6)
        assert summary["details"][r["dataset"]]["samples"] == os.path.relpath(samples_path(str(out), r["dataset"]),
                                                                              out)
