"""Helpers shared by tests (importable as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import socket
from dataclasses import fields

from winnow.pipeline.stages.ingest import IngestConfig
from winnow.pipeline.synth.world import DefectRates, SynthConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_synth_config(port: int, n_pool: int = 240) -> SynthConfig:
    """Every defect kind planted several times (rates boosted); images up to 600 px so that ingest's resize to
    512 px is exercised. A slow URL answers 10 s after ingest's timeout (tiny_ingest_config), a hanging one
    trickles 20 s past its deadline: margins no smaller than the timeouts they test."""
    boosted = {f.name: 0.035 for f in fields(DefectRates) if f.name not in ("bomb", "hang")}
    return SynthConfig(seed=7, n_pool=n_pool, n_clean=24, n_eval_per_class=2, base_url=f"http://127.0.0.1:{port}",
                       slow_seconds=15.0, hang_seconds=30.0, chunk_size=60, size_max=600,
                       rates=DefectRates(**boosted, bomb=1, hang=1))


def tiny_ingest_config(**kw) -> IngestConfig:
    base = dict(shard_size=60, timeout=5.0, deadline=10.0, retries=0, stall_seconds=30.0, thread_count=16,
                min_image_size=8, allow_hosts=["127.0.0.1"])
    return IngestConfig(**(base | kw))


def make_pool(path, uids: list[str], captions: list[str] | None = None, shard_id: int = 0) -> str:
    """A one-shard pool written by hand (tar + parquet + _stats.json), every row ok: for tests that need a pool
    without downloading one. The same uid may be given twice."""

    from PIL import Image

    from winnow.pipeline.data import shards

    rows, images = [], {}
    for i, uid in enumerate(uids):
        key = f"{shard_id:08d}{i:04d}"
        rows.append({"uid": uid, "key": key, "caption": (captions or [f"a red square {i}"] * len(uids))[i],
                     "url": f"http://127.0.0.1:9/{i}.jpg", "status": "success", "error_message": None,
                     "width": 16, "height": 16, "state": "ok"})
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10 * i % 256, 0, 0)).save(buf, "JPEG")
        images[key] = buf.getvalue()
    shards.write_shard(str(path), shard_id, rows, images)
    return str(path)
