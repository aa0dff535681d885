"""Number of words in the caption (DataComp basic: keep more than 2; image-based: more than 1).

``tokenizer: split`` (default) counts as Python's ``len(text.split())`` (DataComp's basic filter);
``tokenizer: fasttext`` as ``len(fasttext.tokenize(text))`` (DataComp's image-based caption filter): runs of
characters other than space, \\n, \\r, \\t, \\v, \\f and \\0, plus one end-of-line token per newline. Both are
counted in Arrow (C++) with patterns whose separators are exactly those, without a Python loop.
"""

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipeline.core.errors import UserError

from .base import Filter

# non-whitespace runs; \s, \v, \x1c-\x1f, \x85 and Unicode separators (\pZ) are what str.split() splits on
WORD = r"[^\s\x0b\x1c-\x1f\x85\pZ]+"
FASTTEXT_WORD = r"[^ \n\r\t\x0b\x0c\x00]+"  # fastText's Dictionary::readWord separators


def captions(part: pd.DataFrame) -> pa.Array:
    """The caption column as an Arrow string array (zero-copy when the table is Arrow-backed)."""
    return pa.array(part["caption"], type=pa.large_string(), from_pandas=True)


@dataclass
class CaptionWordsFilter(Filter):
    key = "caption_words"
    requires = ("caption",)
    tokenizer: str = "split"

    def __post_init__(self):
        if self.tokenizer not in ("split", "fasttext"):
            raise UserError(f"caption_words.tokenizer {self.tokenizer!r}: use split or fasttext")

    @property
    def column(self) -> str:
        return "caption_words_score" if self.tokenizer == "split" else "caption_words_fasttext_score"

    def score(self, part, embeddings):
        text = captions(part)
        if self.tokenizer == "split":
            counts = pc.count_substring_regex(text, WORD)
        else:
            counts = pc.add(pc.count_substring_regex(text, FASTTEXT_WORD), pc.count_substring(text, "\n"))
        return pd.Series(pc.fill_null(counts, 0).to_numpy(zero_copy_only=False), index=part.index)
