"""The contract of every registered evaluation task kind, on small eval sets written here and a model whose
embeddings are fixed (so every metric is known exactly)."""

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.tasks import KINDS, Context, Task, run_task

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


def data_for(kind, folder):
    labels = [0, 1, 2, 3, 4, 5, 2, 1]
    if kind == "odd_one_out":  # the original differs from its two "syntheses": always found
        write_set(folder, [{"original.png": png(lab), "synth_a.png": png((lab + 1) % 6),
                            "synth_b.png": png((lab + 1) % 6), "cls": str(lab).encode()} for lab in labels])
        return {"acc": 1.0, "acc_ci_low": 1.0, "acc_ci_high": 1.0, "n": len(labels)}
    write_set(folder, [{"png": png(lab), "cls": str(lab).encode(), "txt": f"a {COLOURS[lab]} square".encode()}
                       for lab in labels])
    if kind == "zeroshot_classification":
        return {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    return {f"{d}_recall@{k}": 1.0 for d in ("image_retrieval", "text_retrieval", "mean") for k in (1, 5, 10)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_reports_its_metrics(kind, tmp_path):
    module = KINDS[kind]
    assert module.KIND == kind and callable(module.run)
    expected = data_for(kind, str(tmp_path))
    metrics = run_task(Task(kind, kind, str(tmp_path), module.METRICS[0]), Context(ColourModel(), preprocess,
                                                                                  tokenizer))
    assert set(module.METRICS) <= set(metrics)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


def test_a_main_metric_the_kind_does_not_report_is_a_user_error(tmp_path):
    from pipeline.core.errors import UserError

    data_for("retrieval", str(tmp_path))
    with pytest.raises(UserError, match="main_metric 'acc1' is not one of"):
        run_task(Task("r", "retrieval", str(tmp_path), "acc1"), Context(ColourModel(), preprocess, tokenizer))
