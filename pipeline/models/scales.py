"""Fixed training scales: only the data varies between runs of one scale.

DataComp's ``scale_configs.py`` values (paper Table 14): model, global batch size, learning rate, warmup steps,
samples seen (= the pool size), AdamW beta2; weight decay 0.2, cosine schedule, 5 checkpoints. ``tiny`` is
Winnow's CPU scale for the demo and tests (a small ResNet CLIP, see :mod:`winnow.pipeline.models.registry`; 25,600
samples
seen, i.e. 400 steps of 64). ``--arch vitamin`` swaps the CLIP of a scale for the ViTamin of matching size
(ViTamin-S for B/32 scales, ViTamin-B for B/16, ViTamin-L for L/14, a tiny ViTamin for tiny).
"""

from __future__ import annotations

from dataclasses import dataclass

from winnow.pipeline.core.errors import UserError


@dataclass(frozen=True)
class Scale:
    name: str
    model: str
    vitamin: str
    batch_size: int
    lr: float
    warmup: int
    samples_seen: int
    beta2: float = 0.98
    wd: float = 0.2
    checkpoints: int = 5

    @property
    def steps(self) -> int:
        return self.samples_seen // self.batch_size

    def arch(self, arch: str) -> str:
        if arch in ("clip", "vit"):
            return self.model
        if arch == "vitamin":
            return self.vitamin
        raise UserError(f"--arch {arch!r}: use clip (the scale's CLIP: a ViT, a small ResNet at tiny) or vitamin")


SCALES = {
    s.name: s for s in [
        Scale("tiny", "winnow-tiny-clip", "winnow-tiny-vitamin", 64, 1e-3, 20, 25_600, checkpoints=1),
        Scale("small", "ViT-B-32", "ViTamin-S", 4096, 5e-4, 500, 12_800_000),
        Scale("medium", "ViT-B-32", "ViTamin-S", 4096, 5e-4, 500, 128_000_000),
        Scale("large", "ViT-B-16", "ViTamin-B", 8192, 5e-4, 500, 1_280_000_000),
        Scale("xlarge", "ViT-L-14", "ViTamin-L", 90112, 1e-3, 10_000, 12_800_000_000, beta2=0.95),
    ]
}


def get(name: str) -> Scale:
    try:
        return SCALES[name]
    except KeyError:
        raise UserError(f"unknown scale {name!r}; use one of {', '.join(SCALES)}") from None
