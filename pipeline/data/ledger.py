"""The ledger: every input row ends in exactly one state, ``ok`` or a failure reason.

img2dataset records ``status`` (success / failed_to_download / failed_to_resize) and a free-text
``error_message``. Winnow keeps both columns unchanged (DataComp's tools read them) and adds ``state``, a short
code from :data:`STATES`, so that counts per reason are exact and comparable across pools. ``classify`` maps
img2dataset's and urllib's messages to a state; Winnow's own checks write messages that start with the state
code (``"too_many_pixels: 400000000 px > 89478485"``), which classify reads back.
"""

from __future__ import annotations

import re

import pandas as pd

OK = "ok"
#: state -> what it means. Order is the order of the printed ledger.
STATES: dict[str, str] = {
    OK: "downloaded, decoded and written to the tar",
    "http_error": "server answered with an HTTP error status (404, 500, ...), or redirected too often",
    "timeout": "no answer within the timeout, or no complete answer within the per-URL deadline",
    "stalled": "the download process made no progress within the stall limit; abandoned",
    "download_killed": "the download process died (killed for memory, crashed) while this row was in flight",
    "connection_error": "connection refused/reset, DNS failure, body cut short, or a malformed HTTP answer",
    "bad_url": "url missing or malformed (no host, bad port)",
    "refused_url": "refused by the URL policy: not http(s), or a loopback/private/link-local/reserved address "
                   "(directly or by a redirect) that ingest.allow_hosts does not allow; never connected to",
    "too_large": "body (declared, received or decompressed) larger than ingest.max_bytes",
    "opted_out": "the site opts out: its robots.txt disallows the URL (or answers 5xx or 429: RFC 9309 then "
                 "disallows all), its /.well-known/tdmrep.json or a tdm-reservation header reserves TDM rights; "
                 "the image was not requested (robots.txt, tdmrep.json) or its body not read (header)",
    "disallowed": "X-Robots-Tag header opts the image out (noai, noimageai, ...); its body was not read",
    "nsfw": "the image's NSFW score (NudeNet) is above ingest.nsfw_max; it was not written",
    "blocked": "the image's sha256/md5 is on an ingest.blocklists list, or its PDQ hash is near a listed one; "
               "its bytes were not written anywhere",
    "hash_mismatch": "downloaded bytes do not match the expected sha256",
    "not_an_image": "content is not a recognised image format (HTML, text, ...)",
    "decode_error": "corrupt or truncated image bytes, or an unsupported content encoding",
    "too_small": "shorter side below the ingest minimum",
    "too_many_pixels": "more pixels than the ingest cap (decompression bomb guard)",
    "bad_aspect_ratio": "aspect ratio above the ingest maximum",
    "over_budget": "checking, decoding and reading the metadata took more CPU than ingest.cpu_seconds allows",
    "bad_uid": "the input row's uid is not 1-32 hex characters",
    "duplicate_uid": "an earlier input row has the same uid; only the first is downloaded",
    "error": "any other failure (see error_message)",
}

_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("http_error", re.compile(r"HTTP Error \d+", re.I)),
    ("timeout", re.compile(r"timed? ?out", re.I)),
    ("disallowed", re.compile(r"X-Robots-Tag", re.I)),
    ("hash_mismatch", re.compile(r"hash mismatch", re.I)),
    ("bad_url", re.compile(r"unknown url type|no host given|Invalid URL|url is empty|nonnumeric port", re.I)),
    ("connection_error", re.compile(
        r"urlopen error|Connection (refused|reset|aborted)|Remote end closed|Name or service not known|"
        r"Temporary failure in name resolution|No route to host|Network is unreachable|IncompleteRead|"
        r"BadStatusLine|RemoteDisconnected", re.I)),
    ("too_small", re.compile(r"image too small", re.I)),
    ("too_many_pixels", re.compile(r"image area too large|decompression bomb", re.I)),
    ("bad_aspect_ratio", re.compile(r"aspect ratio too large", re.I)),
    ("decode_error", re.compile(r"decod|truncat|corrupt|cannot identify", re.I)),
]


def classify(status: str | None, error_message: str | None) -> str:
    """Map one row's img2dataset ``status`` and ``error_message`` to a ledger state."""
    if status == "success":
        return OK
    msg = error_message if isinstance(error_message, str) else ""
    code = msg.split(":", 1)[0].strip()
    if code in STATES and code != OK:
        return code
    for state, pattern in _PATTERNS:
        if pattern.search(msg):
            return state
    return "error"


def states_of(df: pd.DataFrame) -> pd.Series:
    """The ``state`` column of a shard table, derived from status/error_message when absent (img2dataset pools)."""
    if "state" in df.columns:
        return df["state"]
    status = df["status"] if "status" in df.columns else pd.Series([None] * len(df), index=df.index)
    errors = df["error_message"] if "error_message" in df.columns else pd.Series([None] * len(df), index=df.index)
    return pd.Series([classify(s, e) for s, e in zip(status, errors)], index=df.index, name="state")


def format_counts(counts: dict[str, int], total_input: int | None = None) -> str:
    """A small text table of state counts, ok first, with the invariant line at the bottom."""
    rows = sum(counts.values())
    order = [s for s in STATES if counts.get(s)] + sorted(s for s in counts if s not in STATES and counts[s])
    width = max([len(s) for s in order] + [12])
    lines = [f"{'state':<{width}}  {'rows':>9}  {'share':>6}"]
    for s in order:
        lines.append(f"{s:<{width}}  {counts[s]:>9,}  {counts[s] / max(rows, 1):>6.1%}")
    failed = rows - counts.get(OK, 0)
    lines.append(f"{'-' * width}  {'-' * 9}  {'-' * 6}")
    lines.append(f"{'ok + failed':<{width}}  {rows:>9,}  (ok {counts.get(OK, 0):,}, failed {failed:,})")
    if total_input is not None:
        verdict = "holds" if total_input == rows else "BROKEN"
        lines.append(f"{'input rows':<{width}}  {total_input:>9,}  invariant input = ok + failed {verdict}")
    return "\n".join(lines)
