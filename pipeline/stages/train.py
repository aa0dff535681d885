"""``winnow train``: OpenCLIP's own trainer (``open_clip_train.main``) on resharded WebDataset shards.

A training run is a stage (:class:`pipeline.run.stage.Stage`) whose folder is open_clip_train's run folder
(``<logs>/<name>``): the same config on the same shards (their reshard manifest) is reused, another config
under the same name is refused unless ``overwrite``, and an interrupted run restarts from its latest checkpoint
(``resume``: with the settings it was started with). While open_clip_train runs, its step lines are read from
its output and summarised every ``progress_every`` seconds (step, samples/s, loss, ETA). Guards for
open_clip_train's sharp edges: a reused ``--name`` would exit 0 without training, shards with no ``.txt``
caption make its loader hang (checked here first), and on CPU it needs ``--precision fp32``.

Repeatable: the same shards, config and seed give the same weights on the CPU (the loader's shuffles and
augmentations are seeded, see :mod:`pipeline.stages.train_entry`) for the same number of torch threads, which the
start line prints: a matrix product summed over another number of threads rounds differently.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pipeline.core import fsio
from pipeline.core.errors import RunFailed, UserError
from pipeline.data.manifest import MANIFEST, RUN, describe_inputs
from pipeline.run.runner import task_progress
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


def train(data_dir: str, logs: str, name: str, cfg: TrainConfig, overwrite: bool = False, resume: bool = False,
          log=print, progress_every: float = 10.0) -> str:
    """Train (or reuse the finished run of the same config on the same data); return the last checkpoint.

    ``resume``: continue the interrupted run ``<logs>/<name>`` with the settings it was started with (``cfg`` is
    not used). ``progress_every``: seconds between progress lines (the last step is always reported).
    """
    pattern, count = check_shards(data_dir)
    run_dir = os.path.join(logs, name)
    if resume:
        if overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it; pass one of them")
        cfg = recorded_config(logs, name, data_dir)
    ckpt = os.path.join(run_dir, "checkpoints", f"epoch_{cfg.epochs}.pt")
    data_manifest = fsio.join(data_dir, MANIFEST)
    inputs = [data_manifest] if fsio.exists(data_manifest) else []
    if not overwrite:
        _refuse_other_run(data_dir, logs, name, asdict(cfg), inputs)
    stage = Stage("train", run_dir, asdict(cfg), inputs=inputs, overwrite=overwrite, protect=[data_dir], log=log)
    if stage.done:
        return ckpt
    start = _restart(run_dir)
    if start:
        log(f"train: resuming {run_dir} from {os.path.relpath(start, run_dir)}")
    elif stage.mode == "resume":
        log(f"train: {run_dir} stopped before its first checkpoint; starting it over")
    _run_open_clip(pattern, count, data_dir, logs, name, cfg, bool(start), log, progress_every)
    return stage.finish(rows={"samples": count, "samples_seen": cfg.samples_seen}, checkpoint=ckpt,
                        data=str(data_dir), threads=None if _cuda(cfg) else _threads(cfg))["checkpoint"]


@dataclass(frozen=True)
class RunTask:
    """One training run and the evaluation of its checkpoint: a unit of work for the runner, so that runs of
    several subsets and seeds go side by side (one per worker, each with the worker's one torch thread)."""

    data: str
    logs: str
    name: str
    config: TrainConfig
    tasks: tuple  # pipeline.tasks.Task
    eval_out: str
    overwrite: bool = False


def train_and_evaluate(t: RunTask) -> dict:
    """Train (or reuse) one run, evaluate (or reuse) its checkpoint; returns the evaluation summary with the
    checkpoint's path."""
    from pipeline.stages.evaluate import evaluate

    quiet = lambda m: None  # noqa: E731 - the runner reports runs as they finish
    ckpt = train(t.data, t.logs, t.name, t.config, overwrite=t.overwrite, log=quiet)
    summary = evaluate(t.config.model, ckpt, list(t.tasks), t.eval_out, overwrite=t.overwrite, log=quiet)
    return {"checkpoint": ckpt, **summary}


def _command(data_dir: str, logs: str, name: str, *flags: str) -> str:
    return " ".join(["winnow train", data_dir, "--name", name, "--logs", logs, *flags])


def recorded_config(logs: str, name: str, data_dir: str) -> TrainConfig:
    """The settings the run ``<logs>/<name>`` was started with (what ``--resume`` continues)."""
    path = os.path.join(logs, name, RUN)
    if not os.path.isfile(path):
        raise UserError(f"no training run {name!r} in {logs} to resume; start it with "
                        f"`{_command(data_dir, logs, name)}`")
    try:
        return TrainConfig(**fsio.read_json(path)["params"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{path} records no settings this version can resume; start over with "
                        f"`{_command(data_dir, logs, name, '--overwrite')}`") from None


def _refuse_other_run(data_dir: str, logs: str, name: str, params: dict, inputs: list[str]) -> None:
    """Refuse a run folder holding a run with other settings, naming them and the command that continues it."""
    run_dir = os.path.join(logs, name)
    for doc_name, finished in ((MANIFEST, True), (RUN, False)):
        path = os.path.join(run_dir, doc_name)
        if not os.path.isfile(path):
            continue
        try:
            doc = fsio.read_json(path)
            theirs = doc["params"]
        except (ValueError, KeyError, TypeError):
            return  # not a train run folder: the stage says what it is
        if doc.get("stage") != "train":
            return
        ours = json.loads(json.dumps(params))
        same_data = [i["fingerprint"] for i in doc.get("inputs", [])] == \
            [i["fingerprint"] for i in describe_inputs(inputs)]
        if (theirs == ours and same_data) or (not finished and set(os.listdir(run_dir)) <= {RUN}):
            return  # the same run, or one that wrote nothing (the stage replaces it)
        diff = ", ".join(f"{k} {theirs.get(k)!r} (here {v!r})" for k, v in ours.items() if theirs.get(k) != v)
        what = " and ".join(([f"other settings: {diff}"] if diff else []) + ([] if same_data else ["other data"]))
        if finished:
            raise UserError(f"a training run named {name!r} exists in {logs} with {what}; choose another --name, "
                            "or pass --overwrite to replace it")
        own = os.path.dirname(doc["inputs"][0]["path"]) if doc.get("inputs") else data_dir
        unchanged = same_data or (fsio.exists(fsio.join(own, MANIFEST)) and doc["inputs"][0]["fingerprint"] ==
                                  describe_inputs([fsio.join(own, MANIFEST)])[0]["fingerprint"])
        hint = (f"resume it with `{_command(data_dir if same_data else own, logs, name, '--resume')}`, or pass"
                if unchanged else f"its data ({own}) has changed since, so pass")
        raise UserError(f"an interrupted training run named {name!r} exists in {logs} with {what}; {hint} "
                        "--overwrite to start over")


def _restart(run_dir: str) -> str:
    """Prepare an interrupted run folder: the latest checkpoint to resume from, or "" after removing its partial
    log (open_clip_train refuses a run folder that has one)."""
    done = glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.pt"))
    if done:
        return max(done, key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))
    for name in ("out.log", "params.txt"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    return ""


def _cuda(cfg: TrainConfig) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.device in ("auto", "cuda")


def _threads(cfg: TrainConfig) -> int:
    """torch's CPU threads for the trainer: $OMP_NUM_THREADS, else the cores the loader workers leave."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) - cfg.workers))


_STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?([\d.eE+]+)/s,.*\bLoss: ([\d.eE+-]+|nan|inf)")


def step_loss(text: str) -> tuple[int, float] | None:
    """(samples seen, loss) of one of open_clip_train's step lines, None for any other line (or a NaN loss)."""
    m = _STEP.search(text)
    if not m or m[5] in ("nan", "inf"):
        return None
    return int(m[1]) * int(m[3]) + int(m[2]), float(m[5])


class Progress:
    """One line now and then from open_clip_train's step lines (``Train Epoch: 0 [ 320/25600 (1%)] ... Loss:
    4.1 (4.2)``): step, samples/s (averaged since the first step seen), loss and the time left; at most one per
    ``every`` seconds, and always the last step."""

    def __init__(self, cfg: TrainConfig, every: float, clock=time.monotonic):
        self.cfg, self.every, self.clock = cfg, every, clock
        self.first: tuple[float, int] | None = None
        self.last_shown = -float("inf")

    def line(self, text: str) -> str | None:
        m = _STEP.search(text)
        if not m:
            return None
        epoch, seen, per_epoch, rate, loss = int(m[1]), int(m[2]), int(m[3]), float(m[4]), m[5]
        done, total, now = epoch * per_epoch + seen, self.cfg.epochs * per_epoch, self.clock()
        if self.first is None:
            self.first = (now, done)
        task_progress(done, total)  # for the runner's lines when this run is one of several side by side
        if done < total and now - self.last_shown < self.every:
            return None
        self.last_shown = now
        t0, d0 = self.first
        if now > t0 and done > d0:
            rate = (done - d0) / (now - t0)
        left = int((total - done) / rate) if rate > 0 else 0
        eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if rate > 0 else "?"
        batch = self.cfg.batch_size
        epochs = f" (epoch {epoch + 1}/{self.cfg.epochs})" if self.cfg.epochs > 1 else ""
        return (f"train: step {done // batch:,}/{total // batch:,}{epochs}, {rate:,.0f} samples/s, loss {loss}, "
                f"ETA {eta}")


def _run_open_clip(pattern: str, count: int, data_dir: str, logs: str, name: str, cfg: TrainConfig, resume: bool,
                   log, progress_every: float = 10.0) -> None:
    run_dir = os.path.join(logs, name)
    cuda = _cuda(cfg)
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
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WINNOW_DRAFT_SIDE=str(2 * image_size(cfg.model)),
               PYTHONUNBUFFERED="1")
    if cfg.patch_mixing > 0:
        env["WINNOW_PATCH_MIXING"] = (f"{cfg.patch_mixing},{cfg.patch_mixing_r_max},{cfg.patch_mixing_grid},"
                                      f"{cfg.patch_mixing_smoothing}")
    where = "CUDA" if cuda else f"CPU, {_threads(cfg)} torch thread" + ("s" if _threads(cfg) > 1 else "")
    if not cuda:
        # the loader workers decode on their own cores; more torch threads than the cores left only contend
        env["OMP_NUM_THREADS"] = str(_threads(cfg))
    log(f"train: {cfg.model} on {count:,} samples in {data_dir}, {cfg.samples_seen:,} samples seen ({where}) -> "
        f"{run_dir} (step log: {os.path.join(run_dir, 'out.log')})")
    progress, tail = Progress(cfg, progress_every), collections.deque(maxlen=15)
    with subprocess.Popen([sys.executable, "-m", "pipeline.stages.train_entry", *argv], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, errors="replace") as proc:
        try:
            for text in proc.stdout:
                tail.append(text.rstrip())
                line = progress.line(text)
                if line:
                    log(line)
        finally:
            if proc.poll() is None:  # interrupted here: the trainer goes too (its checkpoints stay)
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
    if proc.returncode != 0 or not os.path.isfile(os.path.join(run_dir, "checkpoints", f"epoch_{cfg.epochs}.pt")):
        lines = [t for t in tail if t.strip()]
        log("train: open_clip_train's last lines:\n" + "\n".join(lines))
        cause = lines[-1].strip() if lines else "no output"
        raise RunFailed(f"open_clip_train failed (exit {proc.returncode}): {cause}; its log: "
                        f"{os.path.join(run_dir, 'out.log')}; `{_command(data_dir, logs, name, '--resume')}` "
                        "continues from the latest checkpoint")
