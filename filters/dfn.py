"""DFN score: the CLIP-score contract on the embeddings of a data filtering network (column ``dfn_<tag>_score``).

Embed the pool with the DFN checkpoint under its own tag (``winnow embed --model ... --pretrained
path/to/dfn.pt --tag dfn``), then score with ``{key: dfn, params: {tag: dfn}}``.
"""

from dataclasses import dataclass

from .clip import ClipFilter


@dataclass
class DfnFilter(ClipFilter):
    key = "dfn"
    tag: str = "dfn"
