"""``winnow copy-descriptor``: train the small copy-detection descriptor (:mod:`pipeline.models.copydetect`) on a
pool's own images, without labels (InfoNCE between two web-copy-like views, hard negatives of similar colour)."""

from __future__ import annotations

import os
import time

from pipeline.core import fsio
from pipeline.core.errors import UserError
from pipeline.data import shards
from pipeline.data.images import open_rgb
from pipeline.models.copydetect import SIDE, colour_key, framed, augment, build


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


def train_descriptor(pool: str, out: str, steps: int = 300, batch_size: int = 128, lr: float = 2e-3,
                     temperature: float = 0.05, max_images: int = 50_000, seed: int = 0, log=print) -> str:
    """Train the descriptor on the pool's images (InfoNCE between two views); return the checkpoint path."""
    import torch

    path = fsio.join(out, "descriptor.pt")
    if fsio.exists(path):
        log(f"copy descriptor: {path} exists; reusing it")
        return path
    images = pool_images(pool, max_images)
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
    os.makedirs(out, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return path
