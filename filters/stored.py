"""A score stored beside the embeddings: the array ``<tag>_<name>`` of the part's ``.npz`` (one value per row, or
one column), as the column ``stored_<tag>_<name>_score``. For scores computed elsewhere and kept with the
embeddings: an aesthetic predictor's output, a safety classifier's, a score from another team's model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from winnow.pipeline.core.errors import UserError

from .base import EmbeddingFilter


@dataclass
class StoredFilter(EmbeddingFilter):
    key = "stored"
    vectorized = True
    tag: str = "l14"
    name: str = "aesthetic"

    @property
    def column(self) -> str:
        return f"{self.key}_{self.tag}_{self.name}_score"

    def arrays(self):
        return (self.name,)

    def score(self, part, embeddings):
        values = np.asarray(self.array(embeddings, self.name, len(part)), dtype=np.float64)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise UserError(f"stored: '{self.tag}_{self.name}' has shape {values.shape}; one value per row is needed")
        return pd.Series(values, index=part.index)
