"""Explicit words in the caption: how many words of a documented list (``filters/data/nsfw_words.txt``, English,
whole words, any case) it holds; 0 is clean. Recipes keep 0 (``safe``). A word list misses what it does not
spell (euphemisms, other languages, misspellings) and flags innocent uses of a listed word: pair it with the image
detector (``nsfw``)."""

import os
import re
from dataclasses import dataclass

import pandas as pd

from .base import Filter

WORDS = os.path.join(os.path.dirname(__file__), "data", "nsfw_words.txt")


def _pattern(path: str) -> re.Pattern:
    with open(path, encoding="utf-8") as f:
        words = sorted({w.strip().lower() for w in f if w.strip() and not w.startswith("#")}, key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(map(re.escape, words)) + r")(?![\w])", re.IGNORECASE)


@dataclass
class CaptionNsfwFilter(Filter):
    key = "caption_nsfw"
    requires = ("caption",)

    def score(self, part, embeddings):
        pattern = _pattern(WORDS)
        return pd.Series([len(pattern.findall(t)) if isinstance(t, str) else 0 for t in part["caption"]],
                         index=part.index)
