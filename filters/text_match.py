"""Number of caption words that name a class of a vocabulary (DataComp's text-based baseline: keep >= 1).

``vocab: imagenet21k`` is DataComp's rule exactly: the caption is split on whitespace (``text.split()``), each
token lower-cased as NLTK does, and a token counts when WordNet's first synset for it is one of the 21,843
ImageNet-21k synsets (NLTK's ``wordnet.synsets(token)[0]``). The accepted words are the shipped table
``filters/data/imagenet21k_words.tsv``, generated from WordNet 3.0 with NLTK by
``filters/data/make_text_entities.py`` (its header gives the provenance), so no WordNet is needed at run time.
Counting runs in Arrow for ASCII captions and in Python (the same rule) for the others.

``vocab: synthetic`` (the demo world's class names and synonyms) and ``vocab: PATH`` (a text file with one
term per line) match lower-cased words stripped of punctuation against single-word terms.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipeline.core.errors import UserError

from .base import Filter
from .caption_words import captions

_DATA = os.path.join(os.path.dirname(__file__), "data")
_WORD = re.compile(r"[a-z][a-z'\-]*")
_ASCII_SPACE = r"[ \t\n\r\x0b\x0c\x1c-\x1f]+"  # what str.split() splits an ASCII string on


@functools.lru_cache(maxsize=1)
def imagenet21k_words() -> frozenset[str]:
    """The words DataComp's text-based rule accepts (lower case)."""
    with open(os.path.join(_DATA, "imagenet21k_words.tsv"), encoding="utf-8") as f:
        return frozenset(line.split("\t", 1)[0] for line in f if not line.startswith("#"))


@functools.lru_cache(maxsize=8)
def vocabulary(name: str) -> frozenset[str]:
    if name == "imagenet21k":
        return imagenet21k_words()
    if name == "synthetic":
        from winnow.pipeline.synth.captions import SYNONYMS

        return frozenset(w for names in SYNONYMS.values() for n in names for w in [n.lower()] if " " not in w)
    if not os.path.isfile(name):
        raise UserError(f"text_match.vocab {name!r}: use imagenet21k, synthetic, or a path to a word list")
    with open(name, encoding="utf-8") as f:
        return frozenset(w.strip().lower() for w in f if w.strip())


@functools.lru_cache(maxsize=1)
def _value_set() -> pa.Array:
    return pa.array(sorted(imagenet21k_words()), pa.large_string())


def entity_counts(text: pa.Array) -> np.ndarray:
    """DataComp's text-based count per caption: tokens of ``text.split()`` whose lower case is accepted."""
    words = imagenet21k_words()
    text = pc.fill_null(text, "")
    tokens = pc.split_pattern_regex(pc.ascii_lower(text), _ASCII_SPACE)
    hit = pc.is_in(pc.list_flatten(tokens), value_set=_value_set())
    parents = pc.list_parent_indices(tokens).to_numpy()
    counts = np.bincount(parents[hit.to_numpy(zero_copy_only=False)], minlength=len(text))
    for i in np.flatnonzero(~pc.string_is_ascii(text).to_numpy(zero_copy_only=False)):
        counts[i] = sum(token.lower() in words for token in text[int(i)].as_py().split())
    return counts


@dataclass
class TextMatchFilter(Filter):
    key = "text_match"
    requires = ("caption",)
    vocab: str = "imagenet21k"

    def score(self, part, embeddings):
        if self.vocab == "imagenet21k":
            return pd.Series(entity_counts(captions(part)), index=part.index, dtype=float)
        words = vocabulary(self.vocab)
        return pd.Series([sum(w in words for w in _WORD.findall(t.lower())) if isinstance(t, str) else 0
                          for t in part["caption"]], index=part.index)
