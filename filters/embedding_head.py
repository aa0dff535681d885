"""A small head over stored CLIP embeddings: a linear layer or an MLP applied to ``<tag>_img`` (or ``_txt``), the
way LAION's NSFW and aesthetic predictors score ViT-L/14 image embeddings.

The weights come from a file read without pickle: ``.npz`` (``numpy.load(allow_pickle=False)``) or
``.safetensors``, holding ``w0, b0, w1, b1, ...`` with ``w`` shaped (inputs, outputs) (a torch ``Linear.weight``,
shaped (outputs, inputs), is transposed when its shape says so). ``activation`` (``relu``, ``gelu`` or ``none``)
goes between layers, ``output`` (``identity`` or ``sigmoid``) after the last, which must have one output. The
embeddings are used as stored (L2-normalised, as those predictors expect). The file's name, size and time key the
score cache: a retrained head is scored again. Column: ``embedding_head_<tag>_<name>_score``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError

from .base import EmbeddingFilter


def load_head(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The layers ``[(w, b), ...]`` of a head file (``.npz`` or ``.safetensors``), never unpickled."""
    if not fsio.exists(path):
        raise UserError(f"embedding_head: weights {path} not found")
    local = fsio.local_copy(path).removeprefix("file://")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            arrays = load_file(local)
        else:
            with np.load(local, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"embedding_head: cannot read {path} ({type(exc).__name__}); use .npz or .safetensors "
                        "with arrays w0, b0, w1, b1, ...") from None
    layers, i = [], 0
    while f"w{i}" in arrays:
        w = np.asarray(arrays[f"w{i}"], np.float32)
        b = np.asarray(arrays.get(f"b{i}", np.zeros(w.shape[-1])), np.float32)
        if w.ndim != 2 or b.ndim != 1:
            raise UserError(f"embedding_head: {path}: w{i} must be 2-d and b{i} 1-d")
        if w.shape[1] != len(b) and w.shape[0] == len(b):
            w = w.T  # torch's Linear.weight layout (outputs, inputs)
        if w.shape[1] != len(b) or (layers and layers[-1][0].shape[1] != w.shape[0]):
            raise UserError(f"embedding_head: {path}: layer {i} shapes do not chain ({w.shape}, {b.shape})")
        layers.append((w, b))
        i += 1
    if not layers or layers[-1][0].shape[1] != 1:
        raise UserError(f"embedding_head: {path} needs arrays w0, b0, ... ending in one output")
    return layers


@dataclass
class EmbeddingHeadFilter(EmbeddingFilter):
    key = "embedding_head"
    tag: str = "l14"
    path: str = ""
    name: str = "head"
    kind: str = "img"
    activation: str = "relu"
    output: str = "identity"

    def __post_init__(self) -> None:
        if self.kind not in ("img", "txt") or self.activation not in ("relu", "gelu", "none") or \
                self.output not in ("identity", "sigmoid"):
            raise UserError("embedding_head: kind img|txt, activation relu|gelu|none, output identity|sigmoid")
        if not self.path:
            raise UserError("embedding_head: params.path (the head's .npz or .safetensors) is required")
        if "://" not in self.path:
            self.path = os.path.abspath(self.path)  # the workers may start elsewhere

    @property
    def column(self) -> str:
        return f"{self.key}_{self.tag}_{self.name}_score"

    def arrays(self):
        return (self.kind,)

    def files(self) -> tuple[str, ...]:
        return (self.path,)

    def score(self, part, embeddings):
        x = np.asarray(self.array(embeddings, self.kind, len(part)), np.float32)
        layers = load_head(self.path)
        if x.shape[1] != layers[0][0].shape[0]:
            raise UserError(f"embedding_head: {self.path} takes {layers[0][0].shape[0]}-d inputs; "
                            f"'{self.tag}_{self.kind}' is {x.shape[1]}-d")
        for j, (w, b) in enumerate(layers):
            x = x @ w + b
            if j < len(layers) - 1 and self.activation == "relu":
                x = np.maximum(x, 0)
            elif j < len(layers) - 1 and self.activation == "gelu":
                x = 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
        y = x[:, 0]
        if self.output == "sigmoid":
            y = 1 / (1 + np.exp(-y))
        return pd.Series(y.astype(np.float64), index=part.index)
