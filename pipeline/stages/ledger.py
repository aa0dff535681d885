"""``winnow ledger``: how every input row of a pool ended, and what later stages recorded.

The counts per state (:mod:`winnow.pipeline.data.ledger`) with the invariant input rows = ok + failed, a line when the
pool's ingest has not finished, each embedding tag's decode failures, and, for a synthetic world, every planted
defect against the state it must end in.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from types import SimpleNamespace

from winnow.pipeline.core import fsio
from winnow.pipeline.data.ledger import format_counts
from winnow.pipeline.data.manifest import read_manifest
from winnow.pipeline.data.pool import ledger, unfinished_ingest
from winnow.pipeline.stages.ingest import IngestConfig


def report(pool: str, truth: str | None = None) -> str:
    counts, total = ledger(pool)
    lines = [format_counts(counts, total)]
    unfinished = unfinished_ingest(pool)
    if unfinished:
        lines.append(f"{unfinished}: the counts above cover the finished shards only; rerun the same "
                     "`winnow ingest` to finish it")
    base = fsio.join(pool, "embeddings")
    for tag in fsio.listdir(base):
        doc = read_manifest(fsio.join(base, tag))
        if doc:
            rows = doc["rows"]
            lines.append(f"embed '{tag}': {rows.get('embedded_images', 0):,} images embedded, "
                         f"{rows.get('decode_errors', 0):,} decode_error (see embeddings/{tag}/*.parquet)")
    doc = read_manifest(pool) or {}
    lines += _safety_lines(doc)
    if truth:
        from winnow.pipeline.synth.truth import ingest_check

        params = {k: v for k, v in (doc.get("params") or {}).items() if k in _INGEST_FIELDS}
        lines += ["", ingest_check(pool, truth, SimpleNamespace(**{**asdict(IngestConfig()), **params}))
                  .to_string(index=False)]
    return "\n".join(lines)


_INGEST_FIELDS = {f.name for f in fields(IngestConfig)}


def _safety_lines(doc: dict) -> list[str]:
    """What ingest counted besides the states: personal data in captions, and the sites' opt-out files."""
    lines = []
    personal = dict(doc.get("personal_data") or {})
    if personal.get("captions"):
        how = (doc.get("params") or {}).get("personal_data", "mask")
        kinds = ", ".join(f"{k} {v:,}" for k, v in personal.items() if k != "captions")
        done = {"mask": "masked", "flag": "flagged (kept)", "keep": "kept"}.get(how, how)
        lines.append(f"captions with personal data: {personal['captions']:,} ({kinds}), {done}; column caption_pii")
    sites = doc.get("sites") or {}
    if sites:
        read = {"parsed": "read", "unavailable": "4xx: allow all", "unreachable": "5xx or no answer: disallow all",
                "refused": "refused by the URL policy"}
        robots = ", ".join(f"{sites[f'robots_{k}']:,} {v}" for k, v in read.items() if sites.get(f"robots_{k}"))
        tdm = sites.get("tdmrep_parsed", 0)
        lines.append(f"sites' robots.txt: {robots or 'none read'}; tdmrep.json found: {tdm:,}")
    return lines
