"""Hash blocklists: images that must never enter a pool, named by their hashes.

A list is a text file of one entry per line, ``<kind>:<hex>``: ``sha256`` or ``md5`` of the image bytes as served,
or ``pdq``, Meta's PDQ perceptual hash (256 bits, 64 hex digits in the reference implementation's order: 16-bit
words from the last to the first), which also finds re-encoded, resized and lightly edited copies: a PDQ hash
within ``threshold`` bits (Hamming distance; 31 is the reference implementation's matching threshold) of an entry
matches. Blank lines and ``#`` comments are skipped.

A matched row ends ``blocked``; its bytes reach no shard, no log and no message, and a list's entries are never
printed (a malformed line is named by its file and line number only).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading

import numpy as np

from winnow.pipeline.core.errors import UserError

KINDS = {"sha256": 64, "md5": 32, "pdq": 64}
PDQ_SIDE = 512  # images are hashed from a decode at most this large (PDQ itself works from 64 x 64)


def pdq_hex(bits: np.ndarray) -> str:
    """The reference hex form of a 256-bit PDQ hash (bit k is bit k % 16 of word k // 16; words printed last
    first)."""
    words = np.asarray(bits, dtype=np.uint8).reshape(16, 16)
    values = (words.astype(np.uint32) << np.arange(16, dtype=np.uint32)).sum(axis=1)
    return "".join(f"{int(v):04x}" for v in values[::-1])


def _pdq_bytes(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


def pdq_of(image) -> str:
    """PDQ hash (hex) of a PIL image."""
    import pdqhash

    rgb = np.asarray(image.convert("RGB"))
    bits, _quality = pdqhash.compute(np.ascontiguousarray(rgb))
    return pdq_hex(bits)


class Blocklist:
    """The entries of some list files. ``match_bytes(data)`` and ``match_image(pil_image)`` return the refusal
    (``"blocked: ..."``) or None."""

    def __init__(self, paths: list[str] | tuple[str, ...], threshold: int = 31):
        self.paths, self.threshold = tuple(paths), int(threshold)
        self.exact: dict[str, dict[bytes, int]] = {"sha256": {}, "md5": {}}
        pdq, owners = [], []
        for n, path in enumerate(self.paths, 1):
            for kind, value in _entries(path):
                if kind == "pdq":
                    pdq.append(np.frombuffer(_pdq_bytes(value), dtype=np.uint8))
                    owners.append(n)
                else:
                    self.exact[kind].setdefault(bytes.fromhex(value), n)
        # as four 64-bit words per hash: a match is four XORs and a popcount per entry
        self.pdq = (np.stack(pdq) if pdq else np.zeros((0, 32), dtype=np.uint8)).view(np.uint64)
        self.pdq_owner = np.array(owners, dtype=np.int32)

    def __len__(self) -> int:
        return sum(len(v) for v in self.exact.values()) + len(self.pdq)

    @property
    def has_pdq(self) -> bool:
        return len(self.pdq) > 0

    def match_bytes(self, data: bytes) -> str | None:
        for kind in ("sha256", "md5"):
            if self.exact[kind]:
                owner = self.exact[kind].get(hashlib.new(kind, data).digest())
                if owner is not None:
                    return f"blocked: the image's {kind} is on blocklist {owner}"
        return None

    def match_image(self, image) -> str | None:
        if not self.has_pdq:
            return None
        return self.match_pdq(pdq_of(_small(image)))

    def match_pdq(self, hex_hash: str) -> str | None:
        if not self.has_pdq:
            return None
        mine = np.frombuffer(_pdq_bytes(hex_hash), dtype=np.uint64)
        distance = np.bitwise_count(np.bitwise_xor(self.pdq, mine)).sum(axis=1, dtype=np.int32)
        best = int(np.argmin(distance))
        if distance[best] <= self.threshold:
            return (f"blocked: the image's PDQ hash is within {self.threshold} bits of an entry of blocklist "
                    f"{int(self.pdq_owner[best])}")
        return None


def _small(image):
    """A copy of a PIL image no larger than PDQ_SIDE on its longer side (JPEG draft decoding when it can)."""
    if max(image.size) > PDQ_SIDE:
        image = image.copy()
        image.thumbnail((PDQ_SIDE, PDQ_SIDE))
    return image


def image_for_pdq(data: bytes):
    """A decode of ``data`` for hashing: draft mode for JPEGs, at most PDQ_SIDE on its longer side."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (PDQ_SIDE, PDQ_SIDE))
    return _small(image.convert("RGB"))


def _entries(path: str):
    if not os.path.isfile(path):
        raise UserError(f"blocklist {path} not found; fix ingest.blocklists")
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            kind, _, value = text.partition(":")
            kind, value = kind.strip().lower(), value.strip().lower()
            if kind not in KINDS or len(value) != KINDS[kind] or not _is_hex(value):
                raise UserError(f"blocklist {path}, line {number}: expected <kind>:<hex> with kind sha256 (64 hex "
                                "digits), md5 (32) or pdq (64)")
            yield kind, value


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
        return True
    except ValueError:
        return False


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def load(paths: list[str] | tuple[str, ...], threshold: int) -> Blocklist | None:
    """The blocklist of ``paths`` (None when there are none), read once per process while the files are
    unchanged."""
    if not paths:
        return None
    key = (tuple(paths), threshold, tuple(os.stat(p).st_mtime_ns if os.path.isfile(p) else 0 for p in paths))
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = Blocklist(paths, threshold)
        return _LOADED[key]
