"""negCLIPLoss: the CLIP score minus a normalisation term from random contrastive batches (column
``neg_clip_loss_<tag>_score``; Wang et al. 2024, "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning", arXiv 2405.19547).

With L2-normalised image and text embeddings v, t of the teacher CLIP and its temperature tau, the CLIP training
loss of sample i in a batch B is

    CLIPLoss_B(i) = -1/2 [log softmax_{j in B}(<v_i, t_j>/tau)_i + log softmax_{j in B}(<v_j, t_i>/tau)_i]

and negCLIPLoss is -tau times its average over K random batches B_1..B_K of size b that hold i:

    negCLIPLoss(i) = <v_i, t_i> - R(i),
    R(i) = tau/(2K) sum_k [log sum_{j in B_k} exp(<v_i, t_j>/tau) + log sum_{j in B_k} exp(<v_j, t_i>/tau)]

Higher is better: recipes keep the top fraction. Defaults are the paper's: K = 10, b = 32,768 (OpenAI CLIP's
training batch), tau = 0.01 (the teacher's own: OpenAI ViT-L/14's logit scale is 100; give a different teacher's,
e.g. 0.07 for a DFN whose logit scale is 1/0.07).

Choices the paper leaves open:

- Batches are drawn within a part (a DataComp metadata file, a pool shard), as the authors' released code does
  per file: DataComp's parts are random samples of the pool, so a random batch of a part is a random batch of the
  pool. Repeat k orders the part's rows by a hash of (uid, seed, k) and cuts that order into ceil(n/b) batches of
  equal size (sizes differ by at most one), so the batches depend on the uids only: not on the row order, the
  part order or the number of workers.
- A batch of m < b rows (a part smaller than b, or not a multiple of it) stands for a batch of b: in each sum
  the other rows' terms are scaled by (b-1)/(m-1), an unbiased estimate of the sum over b-1 random others, so
  the term does not depend on a part's size; with m = b it is exactly the paper's.
- Rows without both embeddings join no batch and score NaN.

Cost: per repeat, b*d multiply-adds per row (on the GPU when torch sees one). Memory: the part's embeddings and
one block of at most ``CELLS`` similarities (never a whole b x b matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from winnow.pipeline.core.errors import UserError

from .base import EmbeddingFilter

CELLS = 2**24  # similarities held at once: 64 MB of float32, whatever the batch size


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw_batches(uids: np.ndarray, batch_size: int, repeats: int, seed: int = 0) -> list[list[np.ndarray]]:
    """For each of ``repeats``, the row indices of ``uids`` (``u8,u8``) split into ceil(n / batch_size) batches of
    equal size (+-1), in the order of a hash of (uid, seed, repeat): a function of the uids alone."""
    n = len(uids)
    if not n:
        return [[] for _ in range(repeats)]
    hi, lo = uids["f0"].astype(np.uint64), uids["f1"].astype(np.uint64)
    parts = max(1, math.ceil(n / batch_size))
    out = []
    for k in range(repeats):
        salt = _mix(np.array([seed * 1_000_003 + k + 1], np.uint64))[0]
        key = _mix(_mix(hi ^ salt) ^ lo)
        out.append(np.array_split(np.argsort(key, kind="stable"), parts))
    return out


def batch_lse(img, txt, tau: float, others: float = 1.0, cells: int = CELLS):
    """For the rows of one batch (torch tensors): log sum_j exp(<v_i, t_j>/tau) (over texts) and log sum_j
    exp(<v_j, t_i>/tau) (over images), the terms j != i multiplied by ``others``; computed a block of at most
    ``cells`` similarities at a time."""
    import torch

    m = len(img)
    step = max(1, cells // m)
    scale = math.log(others)
    rows = torch.empty(m, dtype=torch.float32, device=img.device)
    cols = torch.full((m,), -math.inf, dtype=torch.float32, device=img.device)
    for s in range(0, m, step):
        logits = img[s: s + step] @ txt.T / tau
        i = torch.arange(len(logits), device=img.device)
        own = logits[i, s + i].clone()
        logits[i, s + i] = -math.inf
        rows[s: s + step] = torch.logaddexp(own, torch.logsumexp(logits, dim=1) + scale)
        cols = torch.logaddexp(cols, torch.logsumexp(logits, dim=0))
    return rows, torch.logaddexp((img * txt).sum(dim=1) / tau, cols + scale)


def normaliser(img: np.ndarray, txt: np.ndarray, batches: list[list[np.ndarray]], tau: float, batch_size: int,
               device: str = "cpu", cells: int = CELLS) -> np.ndarray:
    """R(i) of every row (float64), averaged over the repeats of ``batches`` (``draw_batches``); in a batch of m
    rows the other rows' terms are scaled by (batch_size - 1) / (m - 1)."""
    import torch

    with torch.no_grad():
        v = torch.from_numpy(np.ascontiguousarray(img, np.float32)).to(device)
        t = torch.from_numpy(np.ascontiguousarray(txt, np.float32)).to(device)
        total = torch.zeros(len(img), dtype=torch.float64, device=device)
        for repeat in batches:
            for rows in repeat:
                index = torch.from_numpy(rows).to(device)
                others = (batch_size - 1) / (len(rows) - 1) if len(rows) > 1 else 1.0
                row_lse, col_lse = batch_lse(v[index], t[index], tau, others, cells)
                total[index] += (tau / 2) * (row_lse.double() + col_lse.double())
        return (total / max(1, len(batches))).cpu().numpy()


@dataclass
class NegClipLossFilter(EmbeddingFilter):
    key = "neg_clip_loss"
    requires = ("uid",)
    tag: str = "l14"
    tau: float = 0.01  # the teacher's temperature (1 / logit scale)
    batches: int = 10  # K
    batch_size: int = 32768  # b
    seed: int = 0

    def __post_init__(self):
        if not self.tau > 0 or self.batches < 1 or self.batch_size < 1:
            raise UserError(f"neg_clip_loss: tau ({self.tau}) must be positive, batches ({self.batches}) and "
                            f"batch_size ({self.batch_size}) at least 1")

    def score(self, part, embeddings):
        from winnow.pipeline.data.uid import uids_to_array
        from winnow.pipeline.models.registry import default_device

        img = self.array(embeddings, "img", len(part))
        txt = self.array(embeddings, "txt", len(part))
        valid = np.isfinite(img).all(axis=1) & np.isfinite(txt).all(axis=1)
        out = np.full(len(part), np.nan)
        if valid.any():
            img, txt = img[valid], txt[valid]
            uids = uids_to_array(part["uid"].array, sort=False)[valid]
            batches = draw_batches(uids, self.batch_size, self.batches, self.seed)
            r = normaliser(img, txt, batches, self.tau, self.batch_size, default_device())
            out[valid] = np.einsum("ij,ij->i", img.astype(np.float64), txt.astype(np.float64)) - r
        return pd.Series(out, index=part.index)
