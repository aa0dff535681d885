"""Helpers shared by tests (importable as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import socket
from dataclasses import fields

from pipeline.ingest import IngestConfig
from pipeline.synth.world import DefectRates, SynthConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_synth_config(port: int, n_pool: int = 240) -> SynthConfig:
    """Every defect kind planted several times (rates boosted), short delays so tests stay quick; images up to
    600 px so that ingest's resize to 512 px is exercised."""
    boosted = {f.name: 0.035 for f in fields(DefectRates) if f.name not in ("bomb", "hang")}
    return SynthConfig(seed=7, n_pool=n_pool, n_clean=24, n_eval_per_class=2, base_url=f"http://127.0.0.1:{port}",
                       slow_seconds=3.0, hang_seconds=30.0, chunk_size=60, size_max=600,
                       rates=DefectRates(**boosted, bomb=1, hang=1))


def tiny_ingest_config(**kw) -> IngestConfig:
    base = dict(shard_size=60, timeout=1.0, deadline=2.0, retries=0, stall_seconds=4.0, thread_count=16,
                min_image_size=8, allow_hosts=["127.0.0.1"])
    return IngestConfig(**(base | kw))
