"""Shorter side of the original image in pixels (DataComp basic: keep >= 200; uses original_width/height)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .base import Filter


@dataclass
class MinSideFilter(Filter):
    key = "min_side"
    requires = ("original_width", "original_height")

    def score(self, part, embeddings):
        w = pd.to_numeric(part["original_width"], errors="coerce").to_numpy(dtype=float)
        h = pd.to_numeric(part["original_height"], errors="coerce").to_numpy(dtype=float)
        return pd.Series(np.fmin(w, h) if len(part) else np.zeros(0), index=part.index)
