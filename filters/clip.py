"""CLIP score: cosine similarity of a sample's stored image and text embeddings (column ``clip_<tag>_score``).

When the table already has DataComp's precomputed ``clip_<tag>_similarity_score`` (tags b32 and l14 in the
CommonPool metadata), that column is used as is. Rows without both embeddings score NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .base import EmbeddingFilter


@dataclass
class ClipFilter(EmbeddingFilter):
    key = "clip"
    vectorized = True
    tag: str = "b32"

    @property
    def precomputed(self) -> str:
        return f"{self.key}_{self.tag}_similarity_score"

    def columns(self):
        return (*self.requires, self.precomputed)

    def tags_for(self, columns):
        return () if self.precomputed in columns else self.tags()

    def score(self, part, embeddings):
        precomputed = self.precomputed
        if precomputed in part.columns:
            return pd.Series(part[precomputed].to_numpy(dtype=float), index=part.index)
        img = self.array(embeddings, "img", len(part))
        txt = self.array(embeddings, "txt", len(part))
        return pd.Series(np.einsum("ij,ij->i", img, txt).astype(float), index=part.index)
