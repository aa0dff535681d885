"""The filter contract: score, never drop.

A filter reads columns of one shard's table (and, for embedding filters, the shard's stored embeddings) and
returns one float score per row. ``__call__`` returns a copy of the table with exactly one added column,
``filter.column``, the same index, and the input untouched. Selection is a separate step over the scores.

Filters that need the whole pool first (k-means centroids for ``image_cluster``) implement ``prepare``; the
score stage calls it once on the driver (its context offers ``sample(tag, kind, max_rows)``: a bounded, seeded
sample of the pool's embeddings) and ships only small state (or a path) to the shard tasks.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import pandas as pd

#: embeddings of one shard: tag -> {"img": (n, d) float32, "txt": (n, d) float32}, row-aligned with the table
Embeddings = Mapping[str, Mapping[str, np.ndarray]]


@dataclass
class Filter:
    """Base class. Subclasses are dataclasses whose fields are the filter's parameters (from YAML ``params``).
    ``version``: a declared code version; when empty, a digest of the filter's source (its module and its base
    classes' modules) stands for it, so cached scores are recomputed when the code that made them changed."""

    key: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # table columns read
    version: ClassVar[str] = ""
    vectorized: ClassVar[bool] = False  # score is numpy over whole columns (no Python per row): runs in threads

    @property
    def column(self) -> str:
        return f"{self.key}_score"

    def tags(self) -> tuple[str, ...]:
        """Embedding tags this instance reads."""
        return ()

    def arrays(self) -> tuple[str, ...]:
        """The arrays it reads of each tag's ``.npz`` (``<tag>_<name>``; default the image and text embeddings)."""
        return ("img", "txt")

    def tags_for(self, columns) -> tuple[str, ...]:
        """Embedding tags needed for a table with these columns (a precomputed score may make them moot)."""
        return self.tags()

    def columns(self) -> tuple[str, ...]:
        """Table columns to load: the required ones plus any this instance uses when present."""
        return self.requires

    def files(self) -> tuple[str, ...]:
        """Files the scores depend on besides the pool (a model's weights): their names, sizes and times key the
        score cache."""
        return ()

    def prepare(self, context: Any) -> None:
        """Whole-pool step, run once before scoring (default: nothing)."""

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def score(self, part: pd.DataFrame, embeddings: Embeddings) -> pd.Series:
        raise NotImplementedError

    def __call__(self, part: pd.DataFrame, embeddings: Embeddings | None = None) -> pd.DataFrame:
        missing = [c for c in self.requires if c not in part.columns]
        if missing:
            raise ValueError(f"filter {self.key!r} needs column(s) {', '.join(missing)}; the table has "
                             f"{', '.join(map(str, part.columns))}")
        scores = self.score(part, embeddings or {})
        if not scores.index.equals(part.index):
            raise ValueError(f"filter {self.key!r} returned scores with a different index")
        return part.assign(**{self.column: scores.astype(np.float64)})


@dataclass
class EmbeddingFilter(Filter):
    """A filter over arrays stored beside a part's table: the ``.npz`` of embedding ``tag`` (``<tag>_img``,
    ``<tag>_txt``, or any other ``<tag>_<name>`` array, e.g. a classifier's output). Its column is
    ``<key>_<tag>_score``; :meth:`array` reads one array, checked against the table."""

    tag: str = "l14"

    @property
    def column(self) -> str:
        return f"{self.key}_{self.tag}_score"

    def tags(self) -> tuple[str, ...]:
        return (self.tag,)

    def array(self, embeddings: Embeddings, name: str, n: int) -> np.ndarray:
        return embedding(embeddings, self.tag, name, n)


def code_version(cls: type) -> str:
    """A filter class's declared ``version``, else a digest of its source: the modules defining it and its base
    classes (a class defined in a notebook or script: its own source, or its methods' bytecode)."""

    if getattr(cls, "version", ""):
        return str(cls.version)
    h = hashlib.sha256()
    for klass in cls.__mro__:
        if klass is object:
            continue
        module = sys.modules.get(klass.__module__)
        try:
            text = inspect.getsource(klass if klass.__module__ == "__main__" or module is None else module)
        except (OSError, TypeError):  # no source file: the bytecode of its methods
            text = "".join(repr((k, getattr(v, "__code__", None) and v.__code__.co_code)) for k, v in
                           sorted(vars(klass).items()))
        h.update(text.encode())
    return h.hexdigest()[:12]


def embedding(embeddings: Embeddings, tag: str, kind: str, n: int) -> np.ndarray:
    """The ``kind`` ("img"/"txt") array for ``tag``, checked against the table length."""
    try:
        arr = embeddings[tag][kind]
    except KeyError:
        raise ValueError(f"no '{tag}_{kind}' embeddings for this shard; run `winnow embed` with tag {tag!r} "
                         "or point the recipe at the folder that holds them") from None
    if len(arr) != n:
        raise ValueError(f"'{tag}_{kind}' has {len(arr)} rows but the shard table has {n}")
    return arr
