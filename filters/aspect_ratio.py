"""Longer side / shorter side of the original image (DataComp basic: keep <= 3)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .base import Filter
from .min_side import original_sizes


@dataclass
class AspectRatioFilter(Filter):
    key = "aspect_ratio"
    vectorized = True
    requires = ("original_width", "original_height")

    def score(self, part, embeddings):
        w, h = original_sizes(part)
        with np.errstate(divide="ignore", invalid="ignore"):
            return pd.Series(np.fmax(w, h) / np.fmin(w, h), index=part.index)
