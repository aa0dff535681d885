"""Scoring filters: one small class per file, registered on one line in ``REGISTRY``.

A filter reads columns of a shard's table (metadata, or stored embeddings) and returns one score column; it never
drops rows. Selection (thresholds, top fractions, intersections) is a separate declarative step over the scores.
Registry key == file stem == column prefix: ``filters/<key>.py`` defines the class, its column is ``<key>_score``.
"""

from .base import Filter

REGISTRY: dict[str, type[Filter]] = {}

__all__ = ["Filter", "REGISTRY"]
