"""The run configuration: one YAML file with a section per concern, loaded strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from winnow import manifests
from winnow.pipeline.core import config
from winnow.pipeline.evalsets.dist import DistConfig
from winnow.pipeline.evalsets.patchmix import PatchmixConfig
from winnow.pipeline.run.runner import ClusterConfig
from winnow.pipeline.stages.copy_descriptor import CopyDescriptorConfig
from winnow.pipeline.stages.dedup import DedupConfig
from winnow.pipeline.stages.embed import EmbedConfig
from winnow.pipeline.stages.evaluate import EvaluateConfig
from winnow.pipeline.stages.ingest import IngestConfig
from winnow.pipeline.stages.reshard import ReshardConfig
from winnow.pipeline.stages.train import TrainConfig, TrainSpec
from winnow.pipeline.synth.world import SynthConfig

DEMO_RECIPES = ["no_filter", "basic", "demo_text", "demo_clip30", "demo_image", "demo_image_and_clip",
                "demo_basic_and_clip", "dfn_30pct", "dfn_and_basic", "basic_dedup", "demo_basic_and_clip_dedup",
                "dfn_and_basic_dedup"]
#: subsets the demo trains the fixed model on (no_filter first: its model is the CLIP scorer)
DEMO_TRAINED = ["no_filter", "demo_clip30", "dfn_30pct", "dfn_and_basic"]


@dataclass
class DemoConfig:
    """What the demo does after ingest.

    Args:
        scale / arch: the fixed training recipe every trained subset gets (pipeline/models/scales.py); the same
            samples seen, batch, schedule and model for all, so only the data differs.
        seeds: training seeds per subset; the report's intervals and paired tests count the spread over them.
        train: subsets trained and evaluated, every seed of each as one run, two runs side by side on two
            workers; ``no_filter`` (seed ``seeds[0]``) is trained first: its model is the CLIP scorer, standing
            in for OpenAI's CLIP: a CLIP trained on uncurated web data. ``make demo-methods`` sets it to the
            curation methods at one size (30% of the pool): CLIP score, negCLIPLoss, negCLIPLoss then NormSim,
            density pruning, MetaCLIP and DFN (``demo_*`` recipes), beside ``no_filter``.
        dfn: fine-tuning of that scorer on the world's clean set into the data filtering network (the DFN paper
            fine-tunes a pretrained CLIP on high-quality data); its model, pretrained and epochs are set here.
        copy_descriptor: training of the copy-detection descriptor (pipeline/models/copydetect.py) dedup uses.
        dedup: dedup settings (tag ``copy``: the descriptor; keep order by the CLIP scorer's score, tag
            ``demo``); the world's evaluation set is always added to ``decontaminate``.
        dist: the DiST triplet set built from the world's evaluation set (pipeline/evalsets/dist.py); the demo's
            models see 32 px, so it is synthesised at 32 px from 5 images per class (200 L-BFGS steps: with
            4 per class and 150 steps the texture reference model scored 0.53, above chance).
        patchmix: the Patch Mixing conditions built from the same evaluation set.
        patch_mixing: trained subsets also trained with the Patch Mixing augmentation (the paper's training-side
            experiment; reported as ``<subset>+patchmix``).
        recipes: subset recipes made and measured against the planted truth (trained or not).
        filters: one-filter recipes whose score histograms and examples the report shows (the trained CLIP and
            DFN subsets' scores first, then ``manifests/subsets/filter_*.yaml``, basic's parts measured alone).
        shard_size: samples per resharded training shard.
    """

    scale: str = "tiny"
    arch: str = "clip"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: list[str] = field(default_factory=lambda: list(DEMO_TRAINED))
    dfn: TrainConfig = field(default_factory=lambda: TrainConfig(samples_seen=6_400, batch_size=64, lr=5e-4,
                                                                 warmup=10))
    copy_descriptor: CopyDescriptorConfig = field(default_factory=lambda: CopyDescriptorConfig(steps=100))
    dedup: DedupConfig = field(default_factory=lambda: DedupConfig(tag="copy", keep_tag="demo", near_threshold=0.97,
                                                                   contamination_threshold=0.97))
    dist: DistConfig = field(default_factory=lambda: DistConfig(size=32, per_class=5, steps=200, batch=64))
    patchmix: PatchmixConfig = field(default_factory=lambda: PatchmixConfig(size=64, per_class=12))
    patch_mixing: list[str] = field(default_factory=list)
    recipes: list[str] = field(default_factory=lambda: list(DEMO_RECIPES))
    filters: list[str] = field(default_factory=lambda: ["demo_clip30", "dfn_30pct", "filter_english",
                                                        "filter_caption_words", "filter_caption_chars",
                                                        "filter_min_side", "filter_aspect_ratio"])
    shard_size: int = 500


@dataclass
class RunConfig:
    """The run configuration: one section per concern, each a strict dataclass holding its own defaults. Every
    command reads it (``--config FILE``, ``--set section.key=value``; a command's flags set keys of its section)."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    copy_descriptor: CopyDescriptorConfig = field(default_factory=CopyDescriptorConfig)
    reshard: ReshardConfig = field(default_factory=ReshardConfig)
    train: TrainSpec = field(default_factory=TrainSpec)
    dfn: TrainSpec = field(default_factory=TrainSpec)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    patchmix: PatchmixConfig = field(default_factory=PatchmixConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def demo_config_path() -> Path:

    return Path(manifests.__file__).parent / "demo.yaml"


def load(path: str | None, overrides: list[str] | None = None, flags: dict | None = None) -> RunConfig:
    """The run config: defaults, then the YAML file, then ``--set`` overrides, then a command's flags."""
    return config.load(RunConfig, path, overrides, flags)


def tasks_path() -> Path:
    """The demo's task list (manifests/tasks/demo.yaml)."""

    return Path(manifests.__file__).parent / "tasks" / "demo.yaml"
