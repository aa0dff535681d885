"""Shared fixtures: a tiny synthetic world with every planted defect, served on a free loopback port."""

from __future__ import annotations

import os

import pytest
from helpers import free_port, tiny_synth_config

from pipeline.runner import ClusterConfig, Runner
from pipeline.synth.world import build_world

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


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
