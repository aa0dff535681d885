"""Longer side / shorter side of the original image (DataComp basic: keep <= 3)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .base import Filter


@dataclass
class AspectRatioFilter(Filter):
    key = "aspect_ratio"
    requires = ("original_width", "original_height")

    def score(self, part, embeddings):
        w = pd.to_numeric(part["original_width"], errors="coerce").to_numpy(dtype=float)
        h = pd.to_numeric(part["original_height"], errors="coerce").to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.fmax(w, h) / np.fmin(w, h)
        return pd.Series(ratio, index=part.index)
