"""The filter contract."""

from __future__ import annotations

from typing import ClassVar

import pandas as pd


class Filter:
    """Scores the rows of one shard table.

    Subclasses set ``key`` and ``requires`` (the columns they read) and implement :meth:`score`, vectorised over
    the table. ``__call__`` returns a copy of the table with exactly one added column, ``<key>_score``, the same
    index, and the input left untouched.
    """

    key: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()

    def score(self, part: pd.DataFrame) -> pd.Series:
        raise NotImplementedError

    @property
    def column(self) -> str:
        return f"{self.key}_score"

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in self.requires if c not in part.columns]
        if missing:
            raise ValueError(f"filter {self.key!r} needs column(s) {', '.join(missing)}; present: "
                             f"{', '.join(part.columns)}")
        scores = self.score(part)
        if not scores.index.equals(part.index):
            raise ValueError(f"filter {self.key!r} returned scores with a different index")
        return part.assign(**{self.column: scores})
