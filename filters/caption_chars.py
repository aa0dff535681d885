"""Caption length in characters (DataComp basic: keep more than 5)."""

from dataclasses import dataclass

import pandas as pd

from .base import Filter


@dataclass
class CaptionCharsFilter(Filter):
    key = "caption_chars"
    requires = ("caption",)

    def score(self, part, embeddings):
        return pd.Series([len(t) if isinstance(t, str) else 0 for t in part["caption"]], index=part.index)
