"""``winnow train``: OpenCLIP's own trainer (``open_clip_train.main``) on resharded WebDataset shards.

A training run is a stage (:class:`pipeline.run.stage.Stage`) whose folder is open_clip_train's run folder
(``<logs>/<name>``): the same config on the same shards (their reshard manifest) is reused, another config
under the same name is refused unless ``overwrite``, and an interrupted run restarts (from its latest checkpoint
when it wrote one). Guards for open_clip_train's sharp edges: a reused ``--name`` would exit 0 without training,
shards with no ``.txt`` caption make its loader hang (checked here first), and on CPU it needs
``--precision fp32``.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pipeline.core import fsio
from pipeline.core.errors import UserError
from pipeline.data.manifest import MANIFEST
from pipeline.run.stage import Stage


@dataclass
class TrainConfig:
    model: str = "winnow-tiny-clip"
    pretrained: str = ""  # start from a tag or checkpoint (DFN fine-tuning); empty: random init
    samples_seen: int = 10_000  # total samples over the run (fixed per scale; the subset size does not matter)
    epochs: int = 1  # checkpoints written (DataComp: 5)
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 10
    wd: float = 0.2
    beta2: float = 0.98
    workers: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # fp32 on CPU, amp_bf16 on CUDA
    #: Patch Mixing (Lee et al. 2023) as a training augmentation: probability per image (0: off), the largest
    #: share of replaced patches (r ~ U(0, r_max)), the grid, label smoothing of the interpolated targets
    patch_mixing: float = 0.0
    patch_mixing_r_max: float = 0.5
    patch_mixing_grid: int = 7
    patch_mixing_smoothing: float = 0.0


@dataclass
class TrainSpec:
    """What ``winnow train`` (and ``winnow dfn train``) is asked for; the scale fixes every hyper-parameter.

    Args:
        scale: ``tiny`` (CPU) or DataComp's ``small``/``medium``/``large``/``xlarge`` (:mod:`pipeline.models.scales`).
        arch: ``clip`` (the scale's CLIP; ``vit`` is an alias) or ``vitamin`` (a ViTamin of matching size).
        seed: training seed.
        pretrained: start from an open_clip tag or checkpoint (DFN fine-tuning); empty: from scratch.
        patch_mixing: share of images given Patch Mixing (0: off; the paper's training experiment: 0.5).
        logs: parent folder of the training runs.
    """

    scale: str = "tiny"
    arch: Literal["clip", "vit", "vitamin"] = "clip"
    seed: int = 0
    pretrained: str = ""
    patch_mixing: float = 0.0
    logs: str = "runs/train"

    def __post_init__(self) -> None:
        if not 0 <= self.patch_mixing <= 1:
            raise UserError(f"train.patch_mixing {self.patch_mixing} must be a share between 0 and 1")

    def config(self) -> TrainConfig:
        return replace(from_scale(self.scale, self.arch, seed=self.seed, pretrained=self.pretrained),
                       patch_mixing=self.patch_mixing)


def from_scale(scale_name: str, arch: str = "vit", seed: int = 0, pretrained: str = "") -> TrainConfig:
    """The fixed hyper-parameters of a scale (see :mod:`pipeline.models.scales`); only the data varies."""
    from pipeline.models.scales import get

    scale = get(scale_name)
    return TrainConfig(model=scale.arch(arch), pretrained=pretrained, samples_seen=scale.samples_seen,
                       epochs=scale.checkpoints, batch_size=scale.batch_size, lr=scale.lr, warmup=scale.warmup,
                       wd=scale.wd, beta2=scale.beta2, seed=seed)


def image_size(model: str) -> int:
    """The input side of an open_clip model config (224 when the config does not say)."""
    import open_clip

    from pipeline.models.registry import register

    register()
    size = (open_clip.get_model_config(model) or {}).get("vision_cfg", {}).get("image_size", 224)
    return int(size if isinstance(size, int) else max(size))


def _any_caption(data_dir: str, names: list[str]) -> bool:
    """True as soon as one non-empty ``.txt`` member is found (tar headers only: member sizes)."""
    for name in names:
        with tarfile.open(os.path.join(data_dir, name)) as tar:
            if any(m.name.endswith(".txt") and m.size > 0 for m in tar):
                return True
    return False


def check_shards(data_dir: str) -> tuple[str, int]:
    """The brace pattern and sample count of a reshard output; refuses folders without captioned samples."""
    meta = fsio.join(data_dir, "meta.json")
    if not fsio.exists(meta):
        raise UserError(f"{data_dir} is not a reshard output (no meta.json); run `winnow reshard` first")
    sizes = fsio.read_json(fsio.join(data_dir, "sizes.json"))
    count = int(sum(sizes.values()))
    if count == 0:
        raise UserError(f"{data_dir} holds no samples; open_clip_train would hang on it")
    first = os.path.join(data_dir, sorted(sizes)[0])
    with tarfile.open(first) as tar:
        if not any(m.name.endswith(".txt") for m in tar.getmembers()[:30]):
            raise UserError(f"{first} has no .txt captions; open_clip_train would hang on it")
    if not _any_caption(data_dir, sorted(sizes)):
        raise UserError(f"every caption in {data_dir} is empty; training would learn nothing from the text. Was "
                        "the URL list's caption column found? (ingest.caption_col)")
    n = fsio.read_json(meta)["output_shard_count"]
    return os.path.join(data_dir, f"{{{0:08d}..{n - 1:08d}}}.tar"), count


def train(data_dir: str, logs: str, name: str, cfg: TrainConfig, overwrite: bool = False, log=print) -> str:
    """Train (or reuse the finished run of the same config on the same data); return the last checkpoint."""
    pattern, count = check_shards(data_dir)
    run_dir = os.path.join(logs, name)
    ckpt = os.path.join(run_dir, "checkpoints", f"epoch_{cfg.epochs}.pt")
    data_manifest = fsio.join(data_dir, MANIFEST)
    stage = Stage("train", run_dir, asdict(cfg), inputs=[data_manifest] if fsio.exists(data_manifest) else [],
                  overwrite=overwrite, protect=[data_dir], log=log)
    if stage.done:
        return ckpt
    resume = _restart(run_dir)
    _run_open_clip(pattern, count, data_dir, logs, name, cfg, resume, log)
    return stage.finish(rows={"samples": count, "samples_seen": cfg.samples_seen}, checkpoint=ckpt,
                        data=str(data_dir))["checkpoint"]


def _restart(run_dir: str) -> bool:
    """Prepare an interrupted run folder: True to resume from its latest checkpoint, else its partial log is
    removed (open_clip_train refuses a run folder that has one)."""
    if glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.pt")):
        return True
    for name in ("out.log", "params.txt"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    return False


def _run_open_clip(pattern: str, count: int, data_dir: str, logs: str, name: str, cfg: TrainConfig, resume: bool,
                   log) -> None:
    import torch

    run_dir = os.path.join(logs, name)
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    precision = cfg.precision if cfg.precision != "auto" else ("amp_bf16" if cuda else "fp32")
    per_epoch = max(cfg.batch_size, cfg.samples_seen // cfg.epochs)
    argv = [
        "--model", cfg.model, "--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(per_epoch), "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs),
        "--warmup", str(cfg.warmup), "--lr", str(cfg.lr), "--wd", str(cfg.wd), "--beta2", str(cfg.beta2),
        "--workers", str(cfg.workers), "--seed", str(cfg.seed), "--precision", precision,
        "--device", "cuda" if cuda else "cpu", "--logs", logs, "--name", name, "--save-frequency", "1",
        "--zeroshot-frequency", "0", "--log-every-n-steps", "10", "--report-to", "",
    ]
    if cfg.pretrained:
        argv += ["--pretrained", cfg.pretrained]
    if resume:
        argv += ["--resume", "latest"]
    log(f"train: {cfg.model} on {count:,} samples in {data_dir}, {cfg.samples_seen:,} samples seen -> {run_dir}")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WINNOW_DRAFT_SIDE=str(2 * image_size(cfg.model)))
    if cfg.patch_mixing > 0:
        env["WINNOW_PATCH_MIXING"] = (f"{cfg.patch_mixing},{cfg.patch_mixing_r_max},{cfg.patch_mixing_grid},"
                                      f"{cfg.patch_mixing_smoothing}")
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # the loader workers decode on their own cores; more torch threads than the cores left only contend
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) - cfg.workers))
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.train_entry", *argv], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0 or not os.path.isfile(os.path.join(run_dir, "checkpoints", f"epoch_{cfg.epochs}.pt")):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"open_clip_train failed (exit {result.returncode}); last lines:\n{tail}")
