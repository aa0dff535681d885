"""Cheap checks on encoded image bytes, done before any full decode.

``inspect_image`` reads only magic bytes, the header (through PIL's lazy ``Image.open``) and the tail, so a
decompression bomb is refused before a pixel buffer is allocated. It returns None for bytes that look like a
complete image, else a ledger message that starts with the state code (see :mod:`pipeline.ledger`).
"""

from __future__ import annotations

import io
import warnings

#: PIL's default MAX_IMAGE_PIXELS: about 0.25 GiB as 24-bit RGB. Larger images are refused as bombs.
DEFAULT_MAX_PIXELS = 89_478_485

_MAGIC = [
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
]


def sniff_format(data: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, check_end: bool = True) -> str | None:
    """Return None if ``data`` looks like a complete image within the pixel cap, else a ledger message."""
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:16]
        return f"not_an_image: content starts with {head!r}, not an image signature"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:
        return f"too_many_pixels: {exc}"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
        return f"decode_error: unreadable {fmt} header ({type(exc).__name__}: {exc})"
    if width * height > max_pixels:
        return f"too_many_pixels: {width}x{height} = {width * height:,} px > cap {max_pixels:,}"
    if check_end:
        tail = data[-64:]
        if fmt == "jpeg" and b"\xff\xd9" not in tail:
            return "decode_error: truncated jpeg (no end-of-image marker)"
        if fmt == "png" and b"IEND" not in tail:
            return "decode_error: truncated png (no IEND chunk)"
        if fmt == "gif" and not data.rstrip(b"\x00").endswith(b"\x3b"):
            return "decode_error: truncated gif (no trailer)"
    return None


def open_rgb(data: bytes, draft_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode to an RGB PIL image, refusing more than ``max_pixels``.

    With ``draft_side`` > 0, a JPEG is decoded with PIL's draft mode (the DCT scaled down by 1/2, 1/4 or 1/8
    while decoding) to the smallest size whose both sides stay >= ``draft_side``. Callers pass twice the
    model's input side, so the model's own resize still sees at least twice the pixels it keeps, at a fraction
    of the cost of a full decode.
    """
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if im.width * im.height > max_pixels:
        raise ValueError(f"{im.width}x{im.height} exceeds the pixel cap of {max_pixels:,}")
    if draft_side and im.format == "JPEG":
        im.draft("RGB", (draft_side, draft_side))
    return im.convert("RGB")


def input_side(model) -> int:
    """The input image side of an open_clip model (224 when it does not say)."""
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(max(size) if isinstance(size, (tuple, list)) else size)
