"""Shared fixtures: a tiny synthetic world with every planted defect, served on a free loopback port."""

from __future__ import annotations

import os
import tempfile

import pytest
from helpers import free_port, tiny_ingest_config, tiny_synth_config

from winnow.pipeline.run.runner import ClusterConfig, Runner
from winnow.pipeline.synth.world import build_world

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The object-store tests' S3 API server (moto, started by tests/test_object_store.py) on a port chosen now, so that
# every Dask worker started in this session inherits the endpoint and the test credentials.
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="winnow-test",
                  AWS_SECRET_ACCESS_KEY="winnow-test", AWS_DEFAULT_REGION="us-east-1")
# Score caches of this session's pools go to a folder of their own, not the user's ~/.cache/winnow.
os.environ["WINNOW_CACHE"] = tempfile.mkdtemp(prefix="winnow-test-cache-")


def _share_the_cores() -> None:
    """Under pytest-xdist each test process gets its share of the cores for torch's own threads: two processes
    each running torch on every core oversubscribe the machine (the DiST build's L-BFGS beside a training run)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    port = free_port()
    cfg = tiny_synth_config(port)
    world = str(tmp_path_factory.mktemp("world"))
    with Runner(ClusterConfig(scheduler="sync"), log=lambda m: None) as runner:
        build_world(cfg, world, runner, log=lambda m: None)
    return {"path": world, "config": cfg, "port": port}


@pytest.fixture(scope="session")
def local_cluster():
    """A real Dask LocalCluster with two worker processes, shared by the end-to-end tests."""
    with Runner(ClusterConfig(n_workers=2), log=lambda m: None) as runner:
        yield runner


@pytest.fixture(scope="session")
def tiny_pool(tiny_world, local_cluster, tmp_path_factory):
    """The tiny world ingested by img2dataset on the LocalCluster (4 shards of 60 rows)."""
    from winnow.pipeline.stages.ingest import ingest
    from winnow.pipeline.synth.server import WebPoolServer

    pool = str(tmp_path_factory.mktemp("pool"))
    cfg = tiny_ingest_config()
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]):
        doc = ingest(os.path.join(tiny_world["path"], "urls.parquet"), pool, cfg, local_cluster, log=lambda m: None)
    return {"pool": pool, "manifest": doc, "config": cfg, "world": tiny_world["path"]}
