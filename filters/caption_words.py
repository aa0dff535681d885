"""Number of whitespace-separated words in the caption (DataComp basic: keep more than 2)."""

from dataclasses import dataclass

import pandas as pd

from .base import Filter


@dataclass
class CaptionWordsFilter(Filter):
    key = "caption_words"
    requires = ("caption",)

    def score(self, part, embeddings):
        return pd.Series([len(t.split()) if isinstance(t, str) else 0 for t in part["caption"]], index=part.index)
