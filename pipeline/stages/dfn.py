"""``winnow dfn train``: a data filtering network (DFN), a CLIP trained on a high-quality image-text pool.

The pool is taken whole (every downloaded sample), resharded under ``out/shards`` and trained with the fixed
trainer of a scale (:mod:`winnow.pipeline.stages.train`); ``cfg.pretrained`` fine-tunes from a checkpoint, as the DFN
paper fine-tunes OpenAI's CLIP. Embed the candidate pool with the result under its own tag to get
``dfn_<tag>_score`` (:mod:`winnow.filters.dfn`).
"""

from __future__ import annotations

import os

from winnow.pipeline.stages.reshard import reshard
from winnow.pipeline.stages.subset import subset
from winnow.pipeline.stages.train import TrainConfig, train


def train_dfn(hq_pool: str, out: str, name: str, cfg: TrainConfig, runner, log=print) -> str:
    """Train the DFN on ``hq_pool`` under ``out``; returns its checkpoint."""
    sub = os.path.join(out, "subset")
    subset("no_filter", hq_pool, sub, runner, log=log)
    shards_dir = os.path.join(out, "shards")
    reshard(hq_pool, os.path.join(sub, "uids.npy"), shards_dir, runner, shard_size=1000, log=log)
    return train(shards_dir, os.path.join(out, "train"), name, cfg, log=log)
