"""The 128-bit sample id (``uid``): 32 lowercase hex characters, DataComp's join key.

Rules:
- An input row that carries a ``uid`` keeps it. It is normalised: surrounding spaces removed, lower-cased and
  left-padded with ``0`` to 32 characters (DataComp pads the same way). A value that is not 1 to 32 hex
  characters is invalid, and the row is recorded in the ledger as ``bad_uid``.
- An input row without a uid gets ``derive_uid(url, text)``: the first 32 hex characters (128 bits) of
  ``sha256(url + "\\n" + text)`` over UTF-8, with a missing text taken as "". The same url and caption therefore
  always get the same uid, on any machine and in any shard layout, and (url, text) duplicates share a uid, as
  in DataComp's pool (which was deduplicated on url+text into its uid hash).
- A subset is a sorted ``np.dtype("u8,u8")`` array: field ``f0`` = upper 64 bits, ``f1`` = lower 64 bits.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

UID_DTYPE = np.dtype("u8,u8")
_HEX = re.compile(r"^[0-9a-f]{1,32}$")


def derive_uid(url: str | None, text: str | None) -> str:
    payload = f"{url or ''}\n{text or ''}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(payload).hexdigest()[:32]


def normalize_uid(value: object) -> str | None:
    """Return the canonical 32-char form of ``value``, or None if it is not a valid uid."""
    if value is None:
        return None
    s = str(value).strip().lower()
    if not _HEX.match(s):
        return None
    return s.rjust(32, "0")


def uids_to_array(uids: Iterable[str], sort: bool = True) -> np.ndarray:
    """Pack hex uids into DataComp's ``u8,u8`` structured array (sorted by default, duplicates kept)."""
    pairs = [(int(u[:16], 16), int(u[16:32], 16)) for u in uids]
    arr = np.array(pairs, dtype=UID_DTYPE) if pairs else np.zeros(0, dtype=UID_DTYPE)
    if sort:
        arr.sort()
    return arr


def array_to_uids(arr: np.ndarray) -> list[str]:
    if arr.dtype != UID_DTYPE:
        raise ValueError(f"uid array must have dtype {UID_DTYPE}, got {arr.dtype}")
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(arr["f0"], arr["f1"])]
