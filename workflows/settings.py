"""The run configuration: one YAML file with a section per concern, loaded strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import config
from pipeline.ingest import IngestConfig
from pipeline.runner import ClusterConfig
from pipeline.synth.world import SynthConfig
from pipeline.train import TrainConfig

DEMO_RECIPES = ["no_filter", "basic", "demo_text", "demo_clip30", "demo_image", "demo_image_and_clip",
                "demo_basic_and_clip"]


@dataclass
class DemoConfig:
    """What the demo does after ingest.

    Args:
        scorer: training of the tiny CLIP that scores the pool (trained on the unfiltered pool, as a stand-in for
            OpenAI's CLIP, which cannot be downloaded here).
        recipes: subset recipes (manifests/subsets) made and measured against the truth.
        shard_size: samples per resharded training shard.
    """

    scorer: TrainConfig = field(default_factory=lambda: TrainConfig(samples_seen=16_000, batch_size=64, lr=2e-3,
                                                                    warmup=20))
    recipes: list[str] = field(default_factory=lambda: list(DEMO_RECIPES))
    shard_size: int = 500


@dataclass
class RunConfig:
    """Sections: ``synth`` (the synthetic world), ``ingest`` (downloading), ``cluster`` (where stages run),
    ``demo`` (the demo's later stages)."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


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
