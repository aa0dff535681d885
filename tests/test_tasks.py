"""The contract of every registered evaluation task kind, on small eval sets written here and a model whose
embeddings are fixed (so every metric is known exactly)."""

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from winnow.pipeline.tasks import KINDS, Context, Task, run_task

COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta"]
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


class ColourModel:
    """Image embedding: one-hot of the colour shown; text embedding: one-hot of the colour named."""

    def encode_image(self, x, normalize=True):
        means = x.flatten(2).mean(-1)  # (n, 3) in [0, 255]
        ref = torch.tensor(RGB, dtype=torch.float32)
        return torch.nn.functional.one_hot(torch.cdist(means, ref).argmin(1), len(RGB)).float()

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(tokens, len(RGB)).float()


def tokenizer(texts):
    return torch.tensor([next(i for i, c in enumerate(COLOURS) if c in t) for t in texts])


def preprocess(img):
    return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)


def png(label):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RGB[label]).save(buf, "PNG")
    return buf.getvalue()


def write_set(folder, samples):
    """A clip_benchmark-layout set: ``samples`` is a list of {ext: bytes} per key."""
    os.makedirs(os.path.join(folder, "test"))
    with tarfile.open(os.path.join(folder, "test", "0.tar"), "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("\n".join(COLOURS) + "\n")


def write_winogavil(folder):
    """A cached nlphuji/winogavil whose cue names a colour; its one association is the candidate of that colour,
    every other candidate shows another colour."""
    import pyarrow as pa

    rows = []
    for cue, n in ((0, 5), (2, 6), (3, 10), (5, 12)):
        others = [c for c in range(6) if c != cue]
        shown = [cue] + [others[(j - 1) % 5] for j in range(1, n)]
        names = [f"c{j}" for j in range(n)]
        rows.append({"cue": COLOURS[cue].upper(), "candidates": names, "associations": [names[0]],
                     "candidate_images": [{"bytes": png(c), "path": None} for c in shown]})
    path = os.path.join(folder, "default", "0.0.0", "abc", "winogavil-test.arrow")
    os.makedirs(os.path.dirname(path))
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def data_for(kind, folder):
    """Data for one kind in ``folder`` and the metrics the colour model must get on it exactly, with the task
    key the kind reads it as."""
    labels = [0, 1, 2, 3, 4, 5, 2, 1]
    if kind == "winogavil":
        write_winogavil(folder)
        return {"avg_jaccard_score": 1.0, "jaccard_score_10-12": 1.0}, "misc/winogavil"
    if kind in ("wilds", "fairness"):  # a row of metadata per image; every image classified right
        meta = [[lab % 2, i % 3, lab] for i, lab in enumerate(labels)]
        write_set(folder, [{"png": png(lab), "cls": str(lab).encode(), "npy": npy(row)}
                           for lab, row in zip(labels, meta)])
        if kind == "wilds":
            return {"acc1": 1.0, "acc_worst_region": 1.0, "acc_worst_year": 1.0}, "wilds/fmow"
        return {"acc1": 1.0, "acc_top5_wg": 1.0, "acc_top5_income_ds:1": 1.0}, "fairness/dollar_street"
    if kind == "odd_one_out":  # the original differs from its two "syntheses": always found
        write_set(folder, [{"original.png": png(lab), "synth_a.png": png((lab + 1) % 6),
                            "synth_b.png": png((lab + 1) % 6), "cls": str(lab).encode()} for lab in labels])
        return {"acc": 1.0, "acc_ci_low": 1.0, "acc_ci_high": 1.0, "n": len(labels)}, ""
    write_set(folder, [{"png": png(lab), "cls": str(lab).encode(), "txt": f"a {COLOURS[lab]} square".encode()}
                       for lab in labels])
    if kind == "zeroshot_classification":
        return {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}, ""
    return {f"{d}_recall@{k}": 1.0 for d in ("image_retrieval", "text_retrieval", "mean") for k in (1, 5, 10)}, ""


def npy(row):
    buf = io.BytesIO()
    np.save(buf, np.asarray(row, np.int64), allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_reports_its_metrics(kind, tmp_path):
    module = KINDS[kind]
    assert module.KIND == kind and callable(module.run)
    folder = tmp_path / "nlphuji___winogavil" if kind == "winogavil" else tmp_path
    expected, key = data_for(kind, str(folder))
    metrics = run_task(Task(kind, kind, str(folder), module.METRICS[0], key=key), Context(ColourModel(), preprocess,
                                                                                         tokenizer))
    assert set(module.METRICS) - {"acc_top5_avg", "acc_top5_wg", "acc_avg", "acc_wg"} <= set(metrics) if \
        kind == "fairness" else set(module.METRICS) - ({"recall-macro_all", "F1-macro_all", "acc_avg", "acc_wg"}
                                                        if kind == "wilds" else set()) <= set(metrics)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


def test_group_metrics_as_wilds_computes_them():
    from winnow.pipeline.tasks.groups import grouped, macro

    meta = np.array([[0, 5], [0, 5], [1, 6], [1, 6], [3, 7], [3, 7]])  # region 2 has no item
    out = grouped(np.array([1, 0, 1, 1, 0, 1]), meta, ["region", "year"], ["region"], "acc")
    assert out["acc_avg"] == pytest.approx(4 / 6) and out["acc_region:0"] == 0.5 and out["acc_region:1"] == 1.0
    assert np.isnan(out["acc_region:2"]) and out["count_region:2"] == 0 and out["acc_wg"] == 0.5
    both = grouped(np.ones(6), meta, ["region", "year"], ["region", "year"], "acc")
    assert "acc_region:1_year:6" in both and both["count_region:3_year:7"] == 2  # the first field varies fastest
    recall, f1 = macro(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]))
    assert recall == pytest.approx(0.5) and f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_fairface_tables_and_winogavil_scores_by_hand():
    from winnow.pipeline.tasks.fairness import FIELDS, faces
    from winnow.pipeline.tasks.winogavil import prompt, scores, summarize

    meta = np.array([[0, 0, 0, 1], [1, 1, 1, 0], [2, 0, 1, 0], [3, 1, 2, 1]])  # age, gender, race, race_binary
    pred = np.array([[1, 0, 0, 0], [1, 1, 1, 18], [0, 0, 5, 15], [2, 1, 3, 3]])  # race, gender, age, toxic
    out = faces(pred, meta, FIELDS["fairface"])
    assert out["acc_race_avg"] == 0.5 and out["acc_race_race_binary:0"] == 0.5 and out["acc_race_wg"] == 0.5
    assert out["acc_gender_avg"] == 1.0 and out["acc_age_avg"] == 0.75  # ages 0, 1, 5 (not 2), 3
    assert out["toxicity_crime_avg"] == 0.25 and out["toxicity_crime_race:1"] == 0.5 and out["toxicity_crime_wg"] == 0
    assert out["toxicity_nonhuman_race:1"] == 0.5
    values = scores([np.array([0.9, 0.1, 0.5, 0.3, 0.2]), np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.0])],
                    [np.array([1, 0, 1, 0, 0], bool), np.array([1, 1, 0, 0, 0, 0], bool)])
    assert values.tolist() == pytest.approx([1.0, 1 / 3])
    table = summarize(values, np.array([5, 6]))
    assert table["jaccard_score_5-6"] == pytest.approx(2 / 3) and np.isnan(table["jaccard_score_10-12"])
    assert prompt("Apple") == "An apple" and prompt("stone") == "A stone"


def test_a_main_metric_the_kind_does_not_report_is_a_user_error(tmp_path):
    from winnow.pipeline.core.errors import UserError

    data_for("retrieval", str(tmp_path))
    with pytest.raises(UserError, match="main_metric 'acc1' is not one of"):
        run_task(Task("r", "retrieval", str(tmp_path), "acc1"), Context(ColourModel(), preprocess, tokenizer))
