"""Caption length in characters (Unicode code points, as Python's len; DataComp basic: keep more than 5)."""

from dataclasses import dataclass

import pandas as pd
import pyarrow.compute as pc

from .base import Filter
from .caption_words import captions


@dataclass
class CaptionCharsFilter(Filter):
    key = "caption_chars"
    requires = ("caption",)

    def score(self, part, embeddings):
        lengths = pc.fill_null(pc.utf8_length(captions(part)), 0)
        return pd.Series(lengths.to_numpy(zero_copy_only=False), index=part.index)
