"""Shorter side of the original image in pixels (DataComp basic: keep >= 200; uses original_width/height)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .base import Filter


def original_sizes(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``original_width`` and ``original_height`` as float arrays (NaN where missing)."""
    w = pd.to_numeric(part["original_width"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    h = pd.to_numeric(part["original_height"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return w, h


@dataclass
class MinSideFilter(Filter):
    key = "min_side"
    vectorized = True
    requires = ("original_width", "original_height")

    def score(self, part, embeddings):
        w, h = original_sizes(part)
        return pd.Series(np.fmin(w, h), index=part.index)
