"""``winnow ledger``: how every input row of a pool ended, and what later stages recorded.

The counts per state (:mod:`winnow.pipeline.data.ledger`) with the invariant input rows = ok + failed, a line when the
pool's ingest has not finished, each embedding tag's decode failures, and, for a synthetic world, every planted
defect against the state it must end in.
"""

from __future__ import annotations

from winnow.pipeline.core import fsio
from winnow.pipeline.data.ledger import format_counts
from winnow.pipeline.data.manifest import read_manifest
from winnow.pipeline.data.pool import ledger, unfinished_ingest


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
    if truth:
        from winnow.pipeline.synth.truth import ingest_check

        min_size = int(((read_manifest(pool) or {}).get("params") or {}).get("min_image_size", 0))
        lines += ["", ingest_check(pool, truth, min_image_size=min_size).to_string(index=False)]
    return "\n".join(lines)
