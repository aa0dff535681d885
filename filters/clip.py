"""CLIP score: cosine similarity of a sample's stored image and text embeddings (column ``clip_<tag>_score``).

When the table already has DataComp's precomputed ``clip_<tag>_similarity_score`` (tags b32 and l14 in the
CommonPool metadata), that column is used as is. Rows without both embeddings score NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .base import Filter, embedding


@dataclass
class ClipFilter(Filter):
    key = "clip"
    tag: str = "b32"

    @property
    def column(self) -> str:
        return f"{self.key}_{self.tag}_score"

    @property
    def precomputed(self) -> str:
        return f"{self.key}_{self.tag}_similarity_score"

    def tags(self):
        return (self.tag,)

    def columns(self):
        return (*self.requires, self.precomputed)

    def tags_for(self, columns):
        return () if self.precomputed in columns else self.tags()

    def score(self, part, embeddings):
        precomputed = self.precomputed
        if precomputed in part.columns:
            return pd.Series(part[precomputed].to_numpy(dtype=float), index=part.index)
        img = embedding(embeddings, self.tag, "img", len(part))
        txt = embedding(embeddings, self.tag, "txt", len(part))
        return pd.Series(np.einsum("ij,ij->i", img, txt).astype(float), index=part.index)
