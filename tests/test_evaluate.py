"""The evaluation harness: exact metrics with a model whose embeddings are fixed, and a real tiny model."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.evalsets import read_evalset
from winnow.pipeline.tasks import Context, Task, load_tasklist, run_task
from winnow.pipeline.tasks.retrieval import metrics as retrieval_metrics
from winnow.pipeline.tasks.zeroshot import metrics as zeroshot_metrics


def test_zeroshot_metrics_are_exact():
    weights = np.eye(3)
    # image i is closest to class argmax(row); labels chosen so 3 of 4 are right
    images = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.9, 0.1, 0]])
    labels = np.array([0, 1, 2, 1])
    m = zeroshot_metrics(images, weights, labels)
    assert m["acc1"] == 0.75 and "acc5" not in m  # fewer than 5 classes: no top-5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_retrieval_metrics_are_exact():
    img = np.eye(4)
    txt = np.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 swapped
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.5 and m["text_retrieval_recall@1"] == 0.5
    # the swapped pairs' true match is second (one candidate scores higher), so recall@2 is perfect
    assert m["mean_recall@1"] == 0.5 and m["image_retrieval_recall@2"] == 1.0


class FixedModel:
    """A model whose embeddings are fixed: image = one-hot of the colour it shows, text = one-hot of a word."""

    colours = ["red", "green", "blue"]

    def encode_image(self, x, normalize=True):
        import torch

        idx = x.flatten(2).mean(-1).argmax(1)
        return torch.nn.functional.one_hot(idx, 3).float()

    def encode_text(self, tokens, normalize=True):
        import torch

        return torch.nn.functional.one_hot(tokens, 3).float()


def _tokenizer(texts):
    import torch

    return torch.tensor([next(i for i, c in enumerate(FixedModel.colours) if c in t) for t in texts])


def _preprocess(img):
    import torch

    return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)


def _evalset(folder, labels):
    os.makedirs(os.path.join(folder, "test"))
    with tarfile.open(os.path.join(folder, "test", "0.tar"), "w") as tar:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), tuple(255 if c == label else 0 for c in range(3))).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode()),
                              ("txt", f"a {FixedModel.colours[label]} square".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("red\ngreen\nblue\n")
    with open(os.path.join(folder, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("a photo of {c}.\na {c} thing.\n")


def test_zeroshot_task_with_fixed_embeddings_gives_exact_accuracy(tmp_path):
    _evalset(str(tmp_path), [0, 1, 2, 2, 1])
    data = read_evalset(str(tmp_path))
    assert data["classnames"] == ["red", "green", "blue"] and len(data["images"]) == 5
    task = Task("colours", "zeroshot_classification", str(tmp_path), "acc1")
    metrics = run_task(task, Context(FixedModel(), _preprocess, _tokenizer, "cpu"))
    assert metrics["acc1"] == 1.0 and metrics["mean_per_class_recall"] == 1.0
    # swap the class names: every prediction is now wrong except blue
    with open(tmp_path / "classnames.txt", "w") as f:
        f.write("green\nred\nblue\n")
    metrics = run_task(task, Context(FixedModel(), _preprocess, _tokenizer, "cpu"))
    assert metrics["acc1"] == pytest.approx(2 / 5) and metrics["mean_per_class_recall"] == pytest.approx(1 / 3)
    # retrieval: captions name the colour; equal captions tie and a tie does not count as a miss
    retrieval = run_task(Task("r", "retrieval", str(tmp_path), "mean_recall@1"),
                         Context(FixedModel(), _preprocess, _tokenizer, "cpu"))
    assert retrieval["mean_recall@1"] == 1.0


def test_tasklist_validation(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("tasks:\n  - {name: x, kind: detection, data: d, main_metric: acc1}\n")
    with pytest.raises(UserError, match="kind must be one of"):
        load_tasklist(str(bad))
    with pytest.raises(UserError, match="not found"):
        load_tasklist(str(tmp_path / "missing.yaml"))
    from winnow.workflows.settings import demo_config_path

    tasks = load_tasklist(str(demo_config_path().parent / "tasks" / "demo.yaml"), {"world": "/w"})
    assert [t.kind for t in tasks] == ["zeroshot_classification", "retrieval"] and tasks[0].data == "/w/eval"


@pytest.mark.e2e
def test_evaluate_a_tiny_checkpoint_on_the_synthetic_eval_set(tiny_world, tmp_path):
    import torch

    from winnow.pipeline.models.registry import load
    from winnow.pipeline.stages.evaluate import evaluate
    from winnow.workflows.settings import demo_config_path

    model, _, _ = load("winnow-tiny-clip", "", seed=3)
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    tasks = load_tasklist(str(demo_config_path().parent / "tasks" / "demo.yaml"), {"world": tiny_world["path"]})
    summary = evaluate("winnow-tiny-clip", str(ckpt), tasks, str(tmp_path / "eval"), device="cpu", log=lambda m: None)
    assert set(summary["tasks"]) == {"synthetic-shapes", "synthetic-shapes-retrieval"}
    lines = [json.loads(line) for line in (tmp_path / "eval" / "eval_results.jsonl").read_text().splitlines()]
    assert [line["key"] for line in lines] == ["synthetic-shapes", "synthetic-shapes-retrieval"]
    mains = [line["metrics"][task.main_metric] for line, task in zip(lines, tasks)]
    assert mains == [line["metrics"]["main_metric"] for line in lines] == list(summary["tasks"].values())
    assert summary["average"] == pytest.approx(sum(mains) / 2)
    # the results are this checkpoint's: the same tasks computed directly give the same numbers
    direct = [run_task(t, Context(*load("winnow-tiny-clip", str(ckpt)), device="cpu")) for t in tasks]
    assert [d[t.main_metric] for d, t in zip(direct, tasks)] == pytest.approx(mains, abs=1e-9)
