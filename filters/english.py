"""1.0 when the caption's most likely language is English, else 0.0.

Offline by default with py3langid (its model ships in the wheel). DataComp used fasttext's ``lid.176.bin``:
give its path as ``fasttext_model`` (and ``pip install fasttext``) for parity; the caption's newlines are
replaced by spaces, as DataComp does, and the top label must be ``en``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd

from pipeline.core.errors import UserError

from .base import Filter


@functools.lru_cache(maxsize=4)
def _fasttext(path: str):
    try:
        import fasttext
    except ImportError:
        raise UserError("english.fasttext_model needs fasttext: pip install fasttext-wheel") from None
    return fasttext.load_model(path)


@dataclass
class EnglishFilter(Filter):
    key = "english"
    requires = ("caption",)
    fasttext_model: str = ""

    def _lang(self):
        if self.fasttext_model:
            model = _fasttext(self.fasttext_model)
            return lambda text: model.predict(text.replace("\n", " "))[0][0].removeprefix("__label__")
        import py3langid

        return lambda text: py3langid.classify(text)[0]

    def score(self, part, embeddings):
        lang = self._lang()
        return pd.Series([float(isinstance(t, str) and bool(t.strip()) and lang(t) == "en") for t in part["caption"]],
                         index=part.index)
