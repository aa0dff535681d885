"""Number of caption words that name a class of a vocabulary (DataComp's text-based baseline: keep >= 1).

Vocabularies: ``imagenet21k`` (the 21,843 ImageNet-21k synsets' WordNet lemmas, shipped in
``filters/data/imagenet21k_lemmas.tsv``), ``synthetic`` (the demo world's class names and synonyms), or a path
to a text file with one term per line. Words are lower-cased and stripped of punctuation, and only single-word
lemmas are matched. DataComp instead looked raw tokens up with NLTK WordNet and compared the first synset's
offset with the ImageNet-21k ids; this version needs no WordNet download and is close to it, not identical.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import pandas as pd

from pipeline.core.errors import UserError

from .base import Filter

_DATA = os.path.join(os.path.dirname(__file__), "data")
_WORD = re.compile(r"[a-z][a-z'\-]*")


@functools.lru_cache(maxsize=8)
def vocabulary(name: str) -> frozenset[str]:
    if name == "imagenet21k":
        words = set()
        with open(os.path.join(_DATA, "imagenet21k_lemmas.tsv"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                for lemma in line.rstrip("\n").split("\t", 1)[1].split(","):
                    lemma = lemma.strip().lower()
                    if lemma and " " not in lemma:
                        words.add(lemma)
        return frozenset(words)
    if name == "synthetic":
        from pipeline.synth.captions import SYNONYMS

        return frozenset(w for names in SYNONYMS.values() for n in names for w in [n.lower()] if " " not in w)
    if not os.path.isfile(name):
        raise UserError(f"text_match.vocab {name!r}: use imagenet21k, synthetic, or a path to a word list")
    with open(name, encoding="utf-8") as f:
        return frozenset(w.strip().lower() for w in f if w.strip())


@dataclass
class TextMatchFilter(Filter):
    key = "text_match"
    requires = ("caption",)
    vocab: str = "imagenet21k"

    def score(self, part, embeddings):
        words = vocabulary(self.vocab)
        return pd.Series([sum(w in words for w in _WORD.findall(t.lower())) if isinstance(t, str) else 0
                          for t in part["caption"]], index=part.index)
