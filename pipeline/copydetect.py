"""A copy-detection descriptor trained in the run (SSCD-style), for dedup and decontamination without downloads.

DataComp decontaminated its pools with a copy-detection descriptor (the ISC'21 winner, the ``dedup`` array of
its metadata), not with CLIP: CLIP embeddings place two different photos of one concept as close as two copies
of one photo. Such descriptors are trained self-supervised to map a copy (re-encoded, resized, cropped) of an
image near the original and every other image far away (SSCD: an InfoNCE loss between two augmented views).
This module does the same on a small scale: a 6-layer CNN over 40 px inputs, trained on the pool's own images
(no labels) with the augmentations copies undergo on the web: random resized crops (50-100 % of the area),
down-and-up scaling, and hard negatives (half of each batch are images of similar mean colour) so that layout,
not colour alone, identifies an image. Real pools should use a real descriptor (SSCD, or
DataComp's precomputed ``dedup`` array, tag ``dedup``) or CLIP L/14 embeddings; the dedup stage takes any tag.

``train_descriptor(pool, out)`` writes ``out/descriptor.pt`` (a state dict, loaded with ``weights_only=True``);
``winnow embed POOL --model winnow-copy --pretrained out/descriptor.pt --tag copy`` then stores ``copy_img``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import fsio, shards
from .errors import UserError
from .images import open_rgb

MODEL_NAME = "winnow-copy"
SIDE = 40


def build(dim: int = 128):
    import torch
    from torch import nn

    class CopyNet(nn.Module):
        """Conv stack -> 3x3 spatial grid -> linear -> L2-normalised descriptor (layout and colour both count)."""

        def __init__(self) -> None:
            super().__init__()
            chans = [3, 32, 64, 96, 128]
            layers = []
            for i, (a, b) in enumerate(zip(chans, chans[1:])):
                layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(b),
                           nn.ReLU(inplace=True)]
            self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(3), nn.Flatten())
            self.head = nn.Linear(128 * 9, dim)
            self.image_size = SIDE
            self.output_dim = dim

        def encode_image(self, x, normalize: bool = True):
            out = self.head(self.features(x))
            return torch.nn.functional.normalize(out, dim=-1) if normalize else out

        forward = encode_image

    return CopyNet()


def _framed(img, side: int):
    """PIL image -> normalised (3, side, side) tensor: shorter side to ``side``, centre crop."""
    import torch
    from PIL import Image

    w, h = img.size
    s = side / min(w, h)
    img = img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    a = np.asarray(img.crop((left, top, left + side, top + side)).convert("RGB"), np.float32) / 255.0
    return torch.from_numpy((a - 0.5) / 0.25).permute(2, 0, 1).contiguous()


def _colour_key(x):
    """A scalar per image that orders images by mean colour (coarse RGB bins, then brightness)."""
    import torch

    mean = x.mean(dim=(2, 3))
    bins = ((mean - mean.min(0).values) / (mean.max(0).values - mean.min(0).values + 1e-6) * 7.999).long()
    return (bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]).float() + torch.sigmoid(mean.sum(1))


def preprocess(img):
    """The descriptor's input: the centred SIDE x SIDE view (the same framing as open_clip's eval transform)."""
    return _framed(img, SIDE)


def load(path: str, device: str = "cpu"):
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{MODEL_NAME}: descriptor checkpoint not found: {path} (train one with "
                        "`winnow dedup-descriptor POOL --out DIR`)")
    net = build()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.to(device).eval()


def augment(x, gen):
    """A batch of web-copy-like views of ``x`` (N, 3, H, W), as (N, 3, SIDE, SIDE): random resized crops
    (50-100 % of the area, aspect 3/4-4/3, through one batched affine resampling), half of them scaled down and
    back up (resized or re-encoded copies lose detail)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    area, log_ratio = u(0.5, 1.0), u(np.log(3 / 4), np.log(4 / 3))
    sw = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sh = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx, ty = (1 - sw) * u(-1, 1), (1 - sh) * u(-1, 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, tx, sh, ty
    grid = F.affine_grid(theta, (n, 3, SIDE, SIDE), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    half = torch.rand(n, generator=gen) < 0.5
    if half.any():
        f = float(0.4 + 0.5 * torch.rand(1, generator=gen))
        small = F.interpolate(out[half], scale_factor=f, mode="bilinear", antialias=True)
        out[half] = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear")
    return out


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
    x = torch.stack([_framed(img, 2 * SIDE) for img in images])
    net = build()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batch = min(batch_size, len(images))
    start = time.time()
    net.train()
    # hard negatives: half of each batch is a window of images with similar mean colours, so that the
    # descriptor must tell same-coloured images apart by their layout
    by_colour = torch.argsort(_colour_key(x))
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
