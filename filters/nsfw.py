"""NSFW score of the image: NudeNet's highest confidence among its exposed-body classes (0-1; 0 when none is
found), stored by ``winnow embed --detect nsfw`` as ``<tag>_nsfw``. Recipes drop rows above a threshold (``safe``:
0.5). It finds nudity, not violence, gore or other harm; see :mod:`winnow.pipeline.models.detect`."""

from dataclasses import dataclass

from .base import EmbeddingFilter
from .stored import StoredFilter


@dataclass
class NsfwFilter(StoredFilter):
    key = "nsfw"
    tag: str = "b32"
    name: str = "nsfw"
    column = EmbeddingFilter.column  # <key>_<tag>_score: the name is the key, not repeated
