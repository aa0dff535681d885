"""Number of whitespace-separated words in the caption (DataComp basic: keep more than 2).

Counted in Arrow (C++) with a pattern whose whitespace class is exactly Python's ``str.isspace``, so the result
equals DataComp's ``len(text.split())`` without a Python loop.
"""

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .base import Filter

# non-whitespace runs; \s, \v, \x1c-\x1f, \x85 and Unicode separators (\pZ) are what str.split() splits on
WORD = r"[^\s\x0b\x1c-\x1f\x85\pZ]+"


def captions(part: pd.DataFrame) -> pa.Array:
    """The caption column as an Arrow string array (zero-copy when the table is Arrow-backed)."""
    return pa.array(part["caption"], type=pa.large_string(), from_pandas=True)


@dataclass
class CaptionWordsFilter(Filter):
    key = "caption_words"
    requires = ("caption",)

    def score(self, part, embeddings):
        counts = pc.fill_null(pc.count_substring_regex(captions(part), WORD), 0)
        return pd.Series(counts.to_numpy(zero_copy_only=False), index=part.index)
