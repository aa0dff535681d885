"""Cheap checks on encoded image bytes, done before any full decode.

``inspect_image`` reads only magic bytes, the header (through PIL's lazy ``Image.open``) and the tail, so a
decompression bomb is refused before a pixel buffer is allocated. It returns None for bytes that look like a
complete image, else a ledger message that starts with the state code (see :mod:`winnow.pipeline.data.ledger`).
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
    if fmt is None:  # the content itself is never quoted: error messages must not carry what a server sent
        return f"not_an_image: {len(data):,} bytes without a JPEG/PNG/GIF/WebP/BMP/TIFF signature"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:
        return f"too_many_pixels: {exc}"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
        return f"decode_error: unreadable {fmt} header ({type(exc).__name__})"
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


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit(im):
    """An 8-bit view of a high-bit-depth greyscale image (16-bit, 32-bit integer, float), scaled, never clipped.

    PIL reduces 16-bit RGB(A) PNGs to 8 bits itself, but keeps 16-bit grey as ``I;16``, whose ``convert("RGB")``
    clips every value above 255 to white. Other modes are returned unchanged.
    """
    if im.mode not in _HIGH_DEPTH:
        return im
    import numpy as np
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    top = float(np.nanmax(a)) if a.size else 0.0
    if im.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if im.mode.startswith("I;16") or top > 255 else 1.0
    return Image.fromarray(np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8), mode="L")


def reencode_high_depth(data: bytes) -> bytes | None:
    """8-bit PNG bytes for a 16-bit PNG or a high-depth TIFF, else None (the bytes are fine as they are).

    OpenCV (img2dataset's decoder) reads such files as 16-bit arrays and its JPEG encoder then clips them to 8
    bits, turning a mid-grey 16-bit image white; this converts them first.
    """
    fmt = sniff_format(data)
    if fmt == "png" and (len(data) < 25 or data[24] != 16):
        return None
    if fmt not in ("png", "tiff"):
        return None
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if fmt == "tiff" and im.mode not in _HIGH_DEPTH:
            return None
        im.load()
        out = io.BytesIO()
        to_8bit(im).save(out, format="PNG")
    return out.getvalue()


def upright(data: bytes) -> bytes | None:
    """PNG bytes of the image turned the way its EXIF orientation tag says (values 2-8), else None.

    OpenCV (img2dataset's decoder) ignores the tag and the re-encoded JPEG carries no EXIF, so a phone photo
    stored with orientation 6 would otherwise land on its side.
    """
    if sniff_format(data) not in ("jpeg", "tiff", "webp", "png"):
        return None
    from PIL import Image

    T = Image.Transpose
    turn = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
            7: T.TRANSVERSE, 8: T.ROTATE_90}
    with Image.open(io.BytesIO(data)) as im:
        method = turn.get(im.getexif().get(0x0112))
        if method is None:
            return None
        turned = to_8bit(im).transpose(method)
    if turned.mode not in ("1", "L", "LA", "RGB", "RGBA", "P"):
        turned = turned.convert("RGB")
    out = io.BytesIO()
    turned.save(out, format="PNG", compress_level=1)  # lossless: the resizer encodes once
    return out.getvalue()


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
    im = to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # transparent pixels on white, as ingest (img2dataset) composites them
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def input_side(model) -> int:
    """The input image side of an open_clip model (224 when it does not say)."""
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(max(size) if isinstance(size, (tuple, list)) else size)


def square_image(data: bytes, size: int):
    """Encoded image bytes -> its centre square resized to ``size`` (uint8 H x W x 3; pixels capped on decode)."""
    import numpy as np
    from PIL import Image

    img = open_rgb(data)
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def encode_jpeg(img, quality: int = 90) -> bytes:
    """A PIL image as JPEG bytes (RGB)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
