"""Scoring filters: one small class per file, registered on one line in ``REGISTRY``.

A filter reads columns of a shard's table (metadata, or stored embeddings) and returns one score column; it never
drops rows. Selection (thresholds, top fractions, intersections) is a separate declarative step over the scores.
Registry key == file stem; the column is ``<key>_score`` (``<key>_<tag>_score`` for embedding filters).
"""

from __future__ import annotations

from winnow.pipeline.core.config import from_dict
from winnow.pipeline.core.errors import UserError, did_you_mean

from .aspect_ratio import AspectRatioFilter
from .base import EmbeddingFilter, Filter, code_version
from .caption_chars import CaptionCharsFilter
from .caption_nsfw import CaptionNsfwFilter
from .caption_words import CaptionWordsFilter
from .clip import ClipFilter
from .density_prune import DensityPruneFilter
from .dfn import DfnFilter
from .embedding_head import EmbeddingHeadFilter
from .english import EnglishFilter
from .face_count import FaceCountFilter
from .image_cluster import ImageClusterFilter
from .metaclip import MetaclipFilter
from .min_side import MinSideFilter
from .neg_clip_loss import NegClipLossFilter
from .norm_sim import NormSimFilter
from .nsfw import NsfwFilter
from .stored import StoredFilter
from .text_match import TextMatchFilter

REGISTRY: dict[str, type[Filter]] = {
    "english": EnglishFilter,
    "caption_words": CaptionWordsFilter,
    "caption_chars": CaptionCharsFilter,
    "min_side": MinSideFilter,
    "aspect_ratio": AspectRatioFilter,
    "clip": ClipFilter,
    "dfn": DfnFilter,
    "text_match": TextMatchFilter,
    "image_cluster": ImageClusterFilter,
    "density_prune": DensityPruneFilter,
    "neg_clip_loss": NegClipLossFilter,
    "norm_sim": NormSimFilter,
    "metaclip": MetaclipFilter,
    "stored": StoredFilter,
    "nsfw": NsfwFilter,
    "face_count": FaceCountFilter,
    "caption_nsfw": CaptionNsfwFilter,
    "embedding_head": EmbeddingHeadFilter,
}


def build(spec) -> Filter:
    """A filter from ``{key: ..., params: {...}}`` (params checked strictly against the filter's fields), from
    ``{..., cls: a Filter subclass}`` (a filter defined in Python, not registered), or a Filter itself."""
    if isinstance(spec, Filter):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("cls"), type) and issubclass(spec["cls"], Filter):
        return from_dict(spec["cls"], spec.get("params") or {}, f"filter {spec['cls'].key}")
    if not isinstance(spec, dict) or "key" not in spec:
        raise UserError(f"filter spec {spec!r}: expected a mapping with 'key' (and optional 'params')")
    unknown = set(spec) - {"key", "params", "code"}
    if unknown:
        raise UserError(f"filter {spec['key']!r}: unknown field {sorted(unknown)[0]!r}; use key and params")
    cls = REGISTRY.get(spec["key"])
    if cls is None:

        hint = did_you_mean(spec["key"], REGISTRY).strip()
        raise UserError(f"unknown filter {spec['key']!r}; available: {', '.join(REGISTRY)}" + (f"; {hint}" if hint
                                                                                                else ""))
    return from_dict(cls, spec.get("params") or {}, f"filter {spec['key']}")


def spec_of(item) -> dict:
    """A recipe's filter entry as a spec: a mapping as it is; a Filter defined in Python as ``{key, params,
    cls}`` (``cls`` travels to the workers with the task)."""
    if isinstance(item, Filter):
        return {"key": item.key, "params": item.params(), "cls": type(item)}
    if isinstance(item, type) and issubclass(item, Filter):
        return {"key": item.key, "params": {}, "cls": item}
    return item


def plain(spec: dict) -> dict:
    """A spec as recorded (JSON): a Python filter's class is named by its code version."""
    if not isinstance(spec, dict) or "cls" not in spec:
        return spec
    return {"key": spec["key"], "params": spec.get("params") or {}, "code": code_version(spec["cls"])}


__all__ = ["EmbeddingFilter", "Filter", "REGISTRY", "build", "code_version", "plain", "spec_of"]
