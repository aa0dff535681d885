"""Procedural images: a class is a global shape; texture, colour, scale, position, rotation and clutter vary.

The class is carried only by the silhouette (its global structure), never by texture or colour, which are drawn
independently of the class. That is what DiST (texture kept, shape destroyed) and Patch Mixing later probe.
Everything is a pure function of a spec dict, so any image can be re-rendered bit-identically from its spec.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent", "arrow", "hourglass",
           "house", "bolt"]

COLORS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (240, 210, 30),
    "orange": (255, 127, 14), "purple": (148, 103, 189), "pink": (247, 129, 191), "black": (25, 25, 25),
    "white": (245, 245, 245), "brown": (140, 86, 75), "gray": (127, 127, 127), "cyan": (23, 190, 207),
}
TEXTURES = ["plain", "striped", "dotted", "checkered", "speckled", "wavy", "gradient"]


def _polygon(cls: str) -> list[tuple[float, float]] | None:
    """Unit-radius outline of a class (y down), or None for the classes drawn from ellipses."""
    if cls == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if cls == "triangle":
        return [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    if cls == "star":
        return [((1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5),
                 -(1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5)) for k in range(10)]
    if cls == "cross":
        a, b = 0.3, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if cls == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 + 0.1))
        return pts
    if cls == "arrow":
        return [(-0.95, -0.25), (0.2, -0.25), (0.2, -0.65), (0.95, 0), (0.2, 0.65), (0.2, 0.25), (-0.95, 0.25)]
    if cls == "hourglass":
        return [(-0.8, -0.95), (0.8, -0.95), (0.12, 0), (0.8, 0.95), (-0.8, 0.95), (-0.12, 0)]
    if cls == "house":
        return [(-0.75, 0.85), (-0.75, -0.1), (0, -0.9), (0.75, -0.1), (0.75, 0.85)]
    if cls == "bolt":
        return [(0.15, -1), (-0.6, 0.1), (-0.05, 0.1), (-0.25, 1), (0.6, -0.2), (0.05, -0.2), (0.3, -1)]
    return None


def shape_mask(cls: str, w: int, h: int, cx: float, cy: float, radius: float, rot_deg: float) -> np.ndarray:
    """Boolean mask (h, w) of the class silhouette centred at (cx, cy) with the given radius and rotation."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    rot = math.radians(rot_deg)
    cos, sin = math.cos(rot), math.sin(rot)

    def place(pts: list[tuple[float, float]], r: float = radius, ox: float = 0.0, oy: float = 0.0):
        return [(cx + r * ((x + ox) * cos - (y + oy) * sin), cy + r * ((x + ox) * sin + (y + oy) * cos))
                for x, y in pts]

    def ellipse(r: float, ox: float = 0.0, oy: float = 0.0, fill: int = 255):
        pts = [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]
        draw.polygon(place([(x * r, y * r) for x, y in pts], radius, ox, oy), fill=fill)

    poly = _polygon(cls)
    if poly is not None:
        draw.polygon(place(poly), fill=255)
    elif cls == "circle":
        ellipse(0.9)
    elif cls == "ring":
        ellipse(0.95)
        ellipse(0.55, fill=0)
    elif cls == "crescent":
        ellipse(0.95)
        ellipse(0.8, ox=0.45, oy=-0.2, fill=0)
    else:
        raise ValueError(f"unknown class {cls!r}; classes: {', '.join(CLASSES)}")
    return np.asarray(img) > 127


def _texture(kind: str, w: int, h: int, a: np.ndarray, b: np.ndarray, period: float, angle: float,
             rng: np.random.Generator, where: np.ndarray | None = None) -> np.ndarray:
    """Colours ``a``..``b`` in a pattern over an h x w canvas: (h, w, 3), or (n, 3) at the pixels of the boolean
    mask ``where`` only (the same values, and the same draws from ``rng``)."""
    if where is None:
        xx = np.arange(w, dtype=np.float32)[None, :]
        yy = np.arange(h, dtype=np.float32)[:, None]
    else:
        rows, cols = np.nonzero(where)
        xx, yy = cols.astype(np.float32), rows.astype(np.float32)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = xx * c + yy * s
    v = -xx * s + yy * c
    if kind == "plain":
        t = np.zeros(u.shape, np.float32)
    elif kind == "striped":
        t = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    elif kind == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        t = ((du * du + dv * dv) < (period * 0.3) ** 2).astype(np.float32)
    elif kind == "checkered":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "speckled":
        t = (rng.random((h, w)) < 0.3).astype(np.float32)
        t = t if where is None else t[where]
    elif kind == "wavy":
        t = (np.sin(2 * np.pi * (u + 0.4 * period * np.sin(2 * np.pi * v / (2 * period))) / period) > 0)
        t = t.astype(np.float32)
    elif kind == "gradient":  # u is monotone in x and in y: its extremes over the canvas are at its corners
        corners = np.array([0, w - 1], np.float32)[None, :] * c + np.array([0, h - 1], np.float32)[:, None] * s
        t = ((u - corners.min()) / max(float(np.ptp(corners)), 1.0)).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    if where is not None:
        return a[None, :] + (b - a)[None, :] * t[:, None]
    t = np.broadcast_to(t, (h, w))[..., None]
    return a[None, None, :] + (b - a)[None, None, :] * t


def render(spec: dict) -> Image.Image:
    """Render one image from its spec (see :func:`winnow.pipeline.synth.world.image_spec` for the fields)."""
    rng = np.random.default_rng(spec["seed"])
    w, h = spec["w"], spec["h"]
    fg = np.array(COLORS[spec["color"]], np.float32)
    fg2 = np.clip(fg * spec["shade"] + (1 - spec["shade"]) * 255 * (fg.mean() < 128), 0, 255)
    bg1 = np.array(spec["bg"], np.float32)
    bg2 = np.clip(bg1 + rng.normal(0, 25, 3), 0, 255).astype(np.float32)
    canvas = _texture(spec["bg_texture"], w, h, bg1, bg2, spec["bg_period"], spec["bg_angle"], rng)
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(spec["clutter"]):  # background clutter: lines, blobs and boxes in random colours
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        size = rng.uniform(0.03, 0.12) * min(w, h)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([(x0, y0), (x0 + rng.normal(0, size * 2), y0 + rng.normal(0, size * 2))], fill=col,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + size, y0 + size * rng.uniform(0.5, 1.5)], fill=col)
        else:
            draw.rectangle([x0, y0, x0 + size, y0 + size * rng.uniform(0.5, 1.5)], outline=col, width=2)
    canvas = np.asarray(img).astype(np.float32)
    radius = spec["scale"] * min(w, h)
    mask = shape_mask(spec["cls"], w, h, spec["cx"] * w, spec["cy"] * h, radius, spec["rot"])
    canvas[mask] = _texture(spec["texture"], w, h, fg, fg2, spec["period"], spec["angle"], rng, where=mask)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(spec["noise"])
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels that compresses to a few tens of KB: a decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
