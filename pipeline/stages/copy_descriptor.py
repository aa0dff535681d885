"""``winnow copy-descriptor``: train the small copy-detection descriptor (:mod:`winnow.pipeline.models.copydetect`) on
a
pool's own images, without labels (InfoNCE between two web-copy-like views, hard negatives of similar colour)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import shards
from winnow.pipeline.data.images import open_rgb
from winnow.pipeline.data.manifest import MANIFEST
from winnow.pipeline.models.copydetect import SIDE, augment, build, colour_key, framed
from winnow.pipeline.run.stage import Stage


def pool_images(pool: str, limit: int, side: int = 2 * SIDE) -> list:
    """Up to ``limit`` decoded pool images (draft-decoded to about ``side`` px), in shard order."""
    images = []
    for i in shards.list_shards(pool):
        for s in shards.iter_tar(shards.paths(pool, i)["tar"]):
            data = shards.image_bytes(s)
            if not data:
                continue
            try:
                img = open_rgb(data, side)
            except Exception:  # noqa: BLE001 - an undecodable image is simply not a training image
                continue
            img.thumbnail((2 * side, 2 * side))
            images.append(img)
            if len(images) >= limit:
                return images
    return images


@dataclass
class CopyDescriptorConfig:
    """Training of the copy descriptor: ``steps`` of ``batch_size`` pairs of views, AdamW at ``lr`` (one-cycle),
    InfoNCE at ``temperature``, on up to ``max_images`` of the pool's images."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 0.05
    max_images: int = 50_000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.max_images) < 1 or self.lr <= 0 or self.temperature <= 0:
            raise UserError("copy_descriptor: steps, batch_size, max_images, lr and temperature must be positive")


def train_descriptor(pool: str, out: str, cfg: CopyDescriptorConfig | None = None, overwrite: bool = False,
                     log=print) -> str:
    """Train the descriptor on the pool's images (InfoNCE between two views); return the checkpoint path (a
    stage: the same config on the same pool is reused)."""
    cfg = cfg or CopyDescriptorConfig()
    path = fsio.join(out, "descriptor.pt")
    pool_manifest = fsio.join(pool, MANIFEST)
    stage = Stage("copy-descriptor", out, asdict(cfg), inputs=[pool_manifest] if fsio.exists(pool_manifest) else [],
                  overwrite=overwrite, protect=[pool], log=log)
    if not stage.done:
        _train(pool, path, cfg, log)
        stage.finish(rows={"steps": cfg.steps}, outputs=["descriptor.pt"])
    return path


def _train(pool: str, path: str, cfg: CopyDescriptorConfig, log) -> None:
    import torch

    steps, batch_size, lr, temperature, seed = cfg.steps, cfg.batch_size, cfg.lr, cfg.temperature, cfg.seed
    images = pool_images(pool, cfg.max_images)
    if len(images) < 2:
        raise UserError(f"{pool} has fewer than 2 decodable images; nothing to train a copy descriptor on")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([framed(img, 2 * SIDE) for img in images])
    net = build()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batch = min(batch_size, len(images))
    start = time.time()
    net.train()
    # hard negatives: half of each batch is a window of images with similar mean colours, so that the
    # descriptor must tell same-coloured images apart by their layout
    by_colour = torch.argsort(colour_key(x))
    for step in range(steps):
        start_at = int(torch.randint(0, max(1, len(x) - batch // 2), (1,), generator=gen))
        window = by_colour[start_at: start_at + batch // 2]
        rest = torch.randperm(len(x), generator=gen)
        rest = rest[~torch.isin(rest, window)][: batch - len(window)]
        pick = torch.cat([window, rest])
        za = net.encode_image(augment(x[pick], gen))
        zb = net.encode_image(augment(x[pick], gen))
        logits = za @ zb.T / temperature
        target = torch.arange(batch)
        loss = (torch.nn.functional.cross_entropy(logits, target) +
                torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"copy descriptor: step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    net.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
