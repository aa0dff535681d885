"""Faces found in the image (``winnow embed --detect faces``, stored as ``<tag>_face_count``; boxes in the embed
ledger's ``face_bboxes``). Recipes keep images without faces, or leave them to ``winnow reshard --blur-faces``."""

from dataclasses import dataclass

from .base import EmbeddingFilter
from .stored import StoredFilter


@dataclass
class FaceCountFilter(StoredFilter):
    key = "face_count"
    tag: str = "b32"
    name: str = "face_count"
    column = EmbeddingFilter.column  # <key>_<tag>_score: the name is the key, not repeated
