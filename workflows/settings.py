"""The run configuration: one YAML file with a section per concern, loaded strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import config
from pipeline.ingest import IngestConfig
from pipeline.runner import ClusterConfig
from pipeline.synth.world import SynthConfig


@dataclass
class RunConfig:
    """Sections: ``synth`` (the synthetic world), ``ingest`` (downloading), ``cluster`` (where stages run)."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def demo_config_path() -> Path:
    import manifests

    return Path(manifests.__file__).parent / "demo.yaml"


def load(path: str | None, overrides: list[str] | None, scheduler: str | None = None,
         workers: int | None = None) -> RunConfig:
    extra = list(overrides or [])
    if scheduler:
        extra.append(f"cluster.scheduler={scheduler}")
    if workers:
        extra.append(f"cluster.n_workers={workers}")
    return config.load(RunConfig, path, extra)
