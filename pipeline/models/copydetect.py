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

``winnow.pipeline.stages.copy_descriptor.train_descriptor(pool, out)`` writes ``out/descriptor.pt`` (a state dict,
loaded with ``weights_only=True``);
``winnow embed POOL --model winnow-copy --pretrained out/descriptor.pt --tag copy`` then stores ``copy_img``.
"""

from __future__ import annotations

import os

import numpy as np

from winnow.pipeline.core.errors import UserError

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


def framed(img, side: int):
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


def colour_key(x):
    """A scalar per image that orders images by mean colour (coarse RGB bins, then brightness)."""
    import torch

    mean = x.mean(dim=(2, 3))
    bins = ((mean - mean.min(0).values) / (mean.max(0).values - mean.min(0).values + 1e-6) * 7.999).long()
    return (bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]).float() + torch.sigmoid(mean.sum(1))


def preprocess(img):
    """The descriptor's input: the centred SIDE x SIDE view (the same framing as open_clip's eval transform)."""
    return framed(img, SIDE)


def load(path: str, device: str = "cpu"):
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{MODEL_NAME}: descriptor checkpoint not found: {path} (train one with "
                        "`winnow copy-descriptor POOL --out DIR`)")
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
