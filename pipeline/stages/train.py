"""``winnow train``: OpenCLIP's own trainer (``open_clip_train.main``) on resharded WebDataset shards.

A training run is a stage (:class:`winnow.pipeline.run.stage.Stage`) whose folder is open_clip_train's run folder
(``<logs>/<name>``): the same config on the same shards (their reshard manifest) is reused, another config
under the same name is refused unless ``overwrite``, and an interrupted run restarts from its latest checkpoint
(``resume``: with the settings it was started with). While open_clip_train runs, its step lines are read from
its output and summarised every ``progress_every`` seconds (step, samples/s, loss, ETA). Guards for
open_clip_train's sharp edges: a reused ``--name`` would exit 0 without training, shards with no ``.txt``
caption make its loader hang (checked here first), and on CPU it needs ``--precision fp32``.

Repeatable: the same shards, config and seed give the same weights on the CPU (the loader's shuffles and
augmentations are seeded, see :mod:`winnow.pipeline.training.train_entry`) for the same number of torch threads, which
the
start line prints: a matrix product summed over another number of threads rounds differently.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import path
from winnow.pipeline.core.errors import RunFailed, UserError
from winnow.pipeline.data.manifest import LOCK, MANIFEST, RUN, describe_inputs
from winnow.pipeline.run.runner import task_progress
from winnow.pipeline.run.stage import Stage


@dataclass
class TrainConfig:
    model: str = "winnow-tiny-clip"
    pretrained: str = path("")  # start from a tag or checkpoint (DFN fine-tuning); empty: random init
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
    #: processes (devices) training together, and gradient accumulation steps: the scale's batch is split as
    #: per-device batch x processes x accum_freq, so the global batch stays the scale's whatever the devices
    processes: int = 1
    accum_freq: int = 1

    def __post_init__(self) -> None:
        if self.processes < 1 or self.accum_freq < 1:
            raise UserError("train: processes and accum_freq must be at least 1")
        if self.batch_size % (self.processes * self.accum_freq):
            raise UserError(f"the scale's global batch of {self.batch_size:,} cannot be split into {self.processes} "
                            f"process(es) x {self.accum_freq} accumulation step(s); use a process count and "
                            f"--accum-freq whose product divides {self.batch_size:,}")

    @property
    def per_device_batch(self) -> int:
        return self.batch_size // (self.processes * self.accum_freq)

    def batch_line(self) -> str:
        return (f"global batch {self.batch_size:,} = {self.per_device_batch:,} per process x {self.processes} "
                f"process(es) x {self.accum_freq} accumulation step(s)")


@dataclass(frozen=True)
class Launch:
    """Where the processes of one training run are: ``nproc_per_node`` on each of ``nnodes`` machines, this one
    being ``node_rank``, the rank-0 machine reachable at ``master`` (``host:port``)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master: str = "127.0.0.1:29500"

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes


def slurm_launch(nproc_per_node: int, nnodes: int = 0, node_rank: int = -1, master: str = "",
                 env: dict | None = None) -> Launch:
    """A :class:`Launch` from the flags, the rest from SLURM's environment when the command runs in a SLURM job of
    several nodes (one ``winnow train`` per node, as ``srun --ntasks-per-node=1`` starts it): nodes from
    ``SLURM_NNODES``, this node from ``SLURM_NODEID``, the master from ``MASTER_ADDR``/``MASTER_PORT`` or the first
    host of ``SLURM_JOB_NODELIST``."""
    env = os.environ if env is None else env
    slurm_nodes = int(env.get("SLURM_NNODES", "1") or 1)
    nnodes = nnodes or slurm_nodes
    if node_rank < 0:
        node_rank = int(env.get("SLURM_NODEID", "0") or 0) if nnodes > 1 else 0
    if not master:
        host = env.get("MASTER_ADDR") or (_first_slurm_host(env) if nnodes > 1 else "") or "127.0.0.1"
        master = f"{host}:{env.get('MASTER_PORT', '29500')}"
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"train: --nproc-per-node {nproc_per_node} and --nnodes {nnodes} must be at least 1, and "
                        f"--node-rank {node_rank} between 0 and {nnodes - 1}")
    if nnodes > 1 and ":" not in master:
        raise UserError(f"--master {master!r}: give HOST:PORT of the rank-0 machine")
    return Launch(nproc_per_node, nnodes, node_rank, master)


def _first_slurm_host(env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return ""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    return hosts[0] if hosts else nodelist.split(",")[0].split("[")[0]


@dataclass
class TrainSpec:
    """What ``winnow train`` (and ``winnow dfn train``) is asked for; the scale fixes every hyper-parameter.

    Args:
        scale: ``tiny`` (CPU) or DataComp's ``small``/``medium``/``large``/``xlarge``
        (:mod:`winnow.pipeline.models.scales`).
        arch: ``clip`` (the scale's CLIP; ``vit`` is an alias) or ``vitamin`` (a ViTamin of matching size).
        seed: training seed.
        pretrained: start from an open_clip tag or checkpoint (DFN fine-tuning); empty: from scratch.
        patch_mixing: share of images given Patch Mixing (0: off; the paper's training experiment: 0.5).
        logs: parent folder of the training runs (a local folder or an fsspec URL such as ``s3://bucket/runs``).
        nproc_per_node: training processes on this machine (one per GPU; on CPU, gloo processes), through torchrun.
        nnodes: machines training together (0: SLURM's node count inside a SLURM job, else 1).
        node_rank: this machine's rank among them (-1: SLURM's node id, else 0).
        master: ``host:port`` of the rank-0 machine (empty: ``MASTER_ADDR``/``MASTER_PORT``, or SLURM's first host).
        accum_freq: gradient accumulation steps; the scale's batch is per-device batch x processes x accum_freq.
    """

    scale: str = "tiny"
    arch: Literal["clip", "vit", "vitamin"] = "clip"
    seed: int = 0
    pretrained: str = path("")
    patch_mixing: float = 0.0
    logs: str = path("runs/train", always=True)
    nproc_per_node: int = 1
    nnodes: int = 0
    node_rank: int = -1
    master: str = ""
    accum_freq: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.patch_mixing <= 1:
            raise UserError(f"train.patch_mixing {self.patch_mixing} must be a share between 0 and 1")

    def launch(self) -> Launch:
        return slurm_launch(self.nproc_per_node, self.nnodes, self.node_rank, self.master)

    def config(self) -> TrainConfig:
        return replace(from_scale(self.scale, self.arch, seed=self.seed, pretrained=self.pretrained),
                       patch_mixing=self.patch_mixing, processes=self.launch().world, accum_freq=self.accum_freq)


def from_scale(scale_name: str, arch: str = "vit", seed: int = 0, pretrained: str = "") -> TrainConfig:
    """The fixed hyper-parameters of a scale (see :mod:`winnow.pipeline.models.scales`); only the data varies."""
    from winnow.pipeline.models.scales import get

    scale = get(scale_name)
    return TrainConfig(model=scale.arch(arch), pretrained=pretrained, samples_seen=scale.samples_seen,
                       epochs=scale.checkpoints, batch_size=scale.batch_size, lr=scale.lr, warmup=scale.warmup,
                       wd=scale.wd, beta2=scale.beta2, seed=seed)


def image_size(model: str) -> int:
    """The input side of an open_clip model config (224 when the config does not say)."""
    import open_clip

    from winnow.pipeline.models.registry import register

    register()
    size = (open_clip.get_model_config(model) or {}).get("vision_cfg", {}).get("image_size", 224)
    return int(size if isinstance(size, int) else max(size))


def _any_caption(data_dir: str, names: list[str]) -> bool:
    """True as soon as one non-empty ``.txt`` member is found (tar headers only: member sizes)."""
    for name in names:
        with fsio.open_read(fsio.join(data_dir, name)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            if any(m.name.endswith(".txt") and m.size > 0 for m in tar):
                return True
    return False


def check_shards(data_dir: str) -> tuple[str, int]:
    """The brace pattern (a ``pipe:`` command for shards on an object store) and sample count of a reshard output;
    refuses folders without captioned samples."""
    meta = fsio.join(data_dir, "meta.json")
    if not fsio.exists(meta):
        raise UserError(f"{data_dir} is not a reshard output (no meta.json); run `winnow reshard` first")
    sizes = fsio.read_json(fsio.join(data_dir, "sizes.json"))
    count = int(sum(sizes.values()))
    if count == 0:
        raise UserError(f"{data_dir} holds no samples; open_clip_train would hang on it")
    first = fsio.join(data_dir, sorted(sizes)[0])
    with fsio.open_read(first) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        names = [m.name for m, _ in zip(tar, range(30))]
    if not any(n.endswith(".txt") for n in names):
        raise UserError(f"{first} has no .txt captions; open_clip_train would hang on it")
    if not _any_caption(data_dir, sorted(sizes)):
        raise UserError(f"every caption in {data_dir} is empty; training would learn nothing from the text. Was "
                        "the URL list's caption column found? (ingest.caption_col)")
    n = fsio.read_json(meta)["output_shard_count"]
    pattern = fsio.join(data_dir, f"{{{0:08d}..{n - 1:08d}}}.tar")
    if not fsio.is_local(data_dir):  # webdataset reads other filesystems through a pipe
        pattern = f"pipe:{sys.executable} -m winnow.pipeline.core.cat {pattern}"
    return pattern, count


def train(data_dir: str, logs: str, name: str, cfg: TrainConfig, overwrite: bool = False, resume: bool = False,
          log=print, progress_every: float = 10.0, launch: Launch | None = None) -> str:
    """Train (or reuse the finished run of the same config on the same data); return the last checkpoint.

    ``resume``: continue the interrupted run ``<logs>/<name>`` with the settings it was started with (``cfg`` is
    not used). ``progress_every``: seconds between progress lines (the last step is always reported).
    ``launch``: the processes (:class:`Launch`; one by default). ``logs`` may be an fsspec URL: the run then trains
    in a local folder whose checkpoints and logs are uploaded as they are written.
    """
    launch = launch or Launch()
    pattern, count = check_shards(data_dir)
    run_dir = fsio.join(logs, name)
    if resume:
        if overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it; pass one of them")
        cfg = recorded_config(logs, name, data_dir)
    if cfg.processes != launch.world:
        what = "its run was started with" if resume else "the config asks for"
        raise UserError(f"{what} {cfg.processes} training process(es), this launch has {launch.world} "
                        f"({launch.nproc_per_node} per node x {launch.nnodes} node(s)); give --nproc-per-node and "
                        f"--nnodes for {cfg.processes} (the same count gives the same weights)")
    ckpt = fsio.join(run_dir, "checkpoints", f"epoch_{cfg.epochs}.pt")
    if launch.node_rank > 0:  # another machine of a multi-node run: rank 0's machine keeps the run's records
        with RunFolder(logs, name, follower=True) as folder:
            _run_open_clip(pattern, count, data_dir, folder, cfg, False, log, progress_every, launch)
        return ckpt
    data_manifest = fsio.join(data_dir, MANIFEST)
    inputs = [data_manifest] if fsio.exists(data_manifest) else []
    if not overwrite:
        _refuse_other_run(data_dir, logs, name, asdict(cfg), inputs)
    stage = Stage("train", run_dir, asdict(cfg), inputs=inputs, overwrite=overwrite, protect=[data_dir], log=log)
    if stage.done:
        return ckpt
    with RunFolder(logs, name) as folder:
        start = folder.restart()
        if start:
            log(f"train: resuming {run_dir} from checkpoints/{os.path.basename(start)}")
        elif stage.mode == "resume":
            log(f"train: {run_dir} stopped before its first checkpoint; starting it over")
        _run_open_clip(pattern, count, data_dir, folder, cfg, bool(start), log, progress_every, launch)
    return stage.finish(rows={"samples": count, "samples_seen": cfg.samples_seen}, checkpoint=ckpt,
                        data=str(data_dir), batch=cfg.batch_line(),
                        threads=None if _cuda(cfg) else _threads(cfg, launch))["checkpoint"]


class RunFolder:
    """Where open_clip_train writes a run (``<logs>/<name>``): the folder itself when local; for an fsspec URL, a
    local scratch folder whose files (checkpoints once written, logs as they grow) are uploaded to the URL while
    the run goes and when it ends, then removed. open_clip_train saves checkpoints atomically here
    (:mod:`winnow.pipeline.training.train_entry`), so an upload never sees a half-written one."""

    SYNC_SECONDS = 10.0

    def __init__(self, logs: str, name: str, follower: bool = False):
        self.remote = fsio.join(logs, name)
        self.local = fsio.is_local(logs)
        self.scratch = "" if self.local else fsio.scratch_dir("train")
        self.logs = fsio.get_fs(logs)[1] if self.local else self.scratch
        self.name, self.follower = name, follower
        self.path = os.path.join(self.logs, name)
        self.sent: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunFolder:
        if not self.local and not self.follower:
            self._thread = threading.Thread(target=self._sync_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sync()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def restart(self) -> str:
        """Prepare an interrupted run: its latest checkpoint here (downloaded from the URL), or "" after removing a
        partial log (open_clip_train refuses a run folder that has one)."""
        done = [n for n in fsio.listdir(fsio.join(self.remote, "checkpoints")) if re.fullmatch(r"epoch_\d+\.pt", n)]
        if done:
            latest = max(done, key=lambda n: int(re.sub(r"\D", "", n)))
            local = os.path.join(self.path, "checkpoints", latest)
            if not self.local:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fsio.get_fs(self.remote)[0].get_file(fsio.get_fs(fsio.join(self.remote, "checkpoints", latest))[1],
                                                     local)
            return local
        for name in ("out.log", "params.txt"):
            fsio.remove(fsio.join(self.remote, name))
            if os.path.exists(os.path.join(self.path, name)):
                os.remove(os.path.join(self.path, name))
        return ""

    def sync(self) -> None:
        """Upload what changed since the last upload (each object appears only once whole)."""
        for root, _, files in os.walk(self.path):
            for f in files:
                path = os.path.join(root, f)
                if fsio.TMP_MARK in f:
                    continue
                st = os.stat(path)
                if self.sent.get(path) == (st.st_size, st.st_mtime_ns):
                    continue
                rel = os.path.relpath(path, self.path).replace(os.sep, "/")
                fs, target = fsio.get_fs(fsio.join(self.remote, rel))
                fs.put_file(path, target)
                self.sent[path] = (st.st_size, st.st_mtime_ns)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.SYNC_SECONDS):
            try:
                self.sync()
            except OSError:  # the next round, or the final sync, tries again
                pass


@dataclass(frozen=True)
class RunTask:
    """One training run and the evaluation of its checkpoint: a unit of work for the runner, so that runs of
    several subsets and seeds go side by side (one per worker, each with the worker's one torch thread)."""

    data: str
    logs: str
    name: str
    config: TrainConfig
    tasks: tuple  # winnow.pipeline.tasks.Task
    eval_out: str
    overwrite: bool = False


def train_and_evaluate(t: RunTask) -> dict:
    """Train (or reuse) one run, evaluate (or reuse) its checkpoint; returns the evaluation summary with the
    checkpoint's path."""
    from winnow.pipeline.stages.evaluate import evaluate

    quiet = lambda m: None  # noqa: E731 - the runner reports runs as they finish
    ckpt = train(t.data, t.logs, t.name, t.config, overwrite=t.overwrite, log=quiet)
    summary = evaluate(t.config.model, ckpt, list(t.tasks), t.eval_out, overwrite=t.overwrite, log=quiet)
    return {"checkpoint": ckpt, **summary}


def _command(data_dir: str, logs: str, name: str, *flags: str) -> str:
    return " ".join(["winnow train", data_dir, "--name", name, "--logs", logs, *flags])


def recorded_config(logs: str, name: str, data_dir: str) -> TrainConfig:
    """The settings the run ``<logs>/<name>`` was started with (what ``--resume`` continues)."""
    path = fsio.join(logs, name, RUN)
    if not fsio.exists(path):
        raise UserError(f"no training run {name!r} in {logs} to resume; start it with "
                        f"`{_command(data_dir, logs, name)}`")
    try:
        return TrainConfig(**fsio.read_json(path)["params"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{path} records no settings this version can resume; start over with "
                        f"`{_command(data_dir, logs, name, '--overwrite')}`") from None


def _refuse_other_run(data_dir: str, logs: str, name: str, params: dict, inputs: list[str]) -> None:
    """Refuse a run folder holding a run with other settings, naming them and the command that continues it."""
    run_dir = fsio.join(logs, name)
    for doc_name, finished in ((MANIFEST, True), (RUN, False)):
        path = fsio.join(run_dir, doc_name)
        if not fsio.exists(path):
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
        if (theirs == ours and same_data) or (not finished and set(fsio.listdir(run_dir)) <= {RUN, LOCK}):
            return  # the same run, or one that wrote nothing (the stage replaces it)
        diff = ", ".join(f"{k} {theirs.get(k)!r} (here {v!r})" for k, v in ours.items() if theirs.get(k, v) != v)
        what = " and ".join(([f"other settings: {diff}"] if diff else []) + ([] if same_data else ["other data"]))
        if finished:
            raise UserError(f"a training run named {name!r} exists in {logs} with {what}; choose another --name, "
                            "or pass --overwrite to replace it")
        own = doc["inputs"][0]["path"].rsplit("/", 1)[0] if doc.get("inputs") else data_dir
        unchanged = same_data or (fsio.exists(fsio.join(own, MANIFEST)) and doc["inputs"][0]["fingerprint"] ==
                                  describe_inputs([fsio.join(own, MANIFEST)])[0]["fingerprint"])
        hint = (f"resume it with `{_command(data_dir if same_data else own, logs, name, '--resume')}`, or pass"
                if unchanged else f"its data ({own}) has changed since, so pass")
        raise UserError(f"an interrupted training run named {name!r} exists in {logs} with {what}; {hint} "
                        "--overwrite to start over")


def _cuda(cfg: TrainConfig) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.device in ("auto", "cuda")


def _threads(cfg: TrainConfig, launch: Launch | None = None) -> int:
    """torch's CPU threads per training process: $OMP_NUM_THREADS, else this machine's cores the loader workers
    leave, shared by its processes."""
    per_node = launch.nproc_per_node if launch else 1
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, ((os.cpu_count() or 2) - cfg.workers * per_node) // per_node)


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


def _run_open_clip(pattern: str, count: int, data_dir: str, folder: RunFolder, cfg: TrainConfig, resume: bool,
                   log, progress_every: float = 10.0, launch: Launch | None = None) -> None:
    launch = launch or Launch()
    logs, name, run_dir = folder.logs, folder.name, folder.remote
    cuda = _cuda(cfg)
    precision = cfg.precision if cfg.precision != "auto" else ("amp_bf16" if cuda else "fp32")
    per_epoch = max(cfg.batch_size, cfg.samples_seen // cfg.epochs)
    argv = [
        "--model", cfg.model, "--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(per_epoch), "--batch-size", str(cfg.per_device_batch), "--epochs",
        str(cfg.epochs), "--warmup", str(cfg.warmup), "--lr", str(cfg.lr), "--wd", str(cfg.wd), "--beta2",
        str(cfg.beta2), "--workers", str(cfg.workers), "--seed", str(cfg.seed), "--precision", precision,
        "--device", "cuda" if cuda else "cpu", "--logs", logs, "--name", name, "--save-frequency", "1",
        "--zeroshot-frequency", "0", "--log-every-n-steps", "10", "--report-to", "", "--accum-freq",
        str(cfg.accum_freq),
    ]
    if cfg.processes > 1:  # DataComp's setting: each rank's rows against every rank's (gathered with gradients)
        argv += ["--local-loss", "--gather-with-grad"]
    if cfg.pretrained:
        argv += ["--pretrained", cfg.pretrained]
    if resume:
        argv += ["--resume", "latest"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WINNOW_DRAFT_SIDE=str(2 * image_size(cfg.model)),
               PYTHONUNBUFFERED="1")
    if cfg.patch_mixing > 0:
        env["WINNOW_PATCH_MIXING"] = (f"{cfg.patch_mixing},{cfg.patch_mixing_r_max},{cfg.patch_mixing_grid},"
                                      f"{cfg.patch_mixing_smoothing}")
    threads = _threads(cfg, launch)
    where = "CUDA" if cuda else f"CPU, {threads} torch thread" + ("s" if threads > 1 else "")
    if not cuda:
        # the loader workers decode on their own cores; more torch threads than the cores left only contend
        env["OMP_NUM_THREADS"] = str(threads)
    if launch.world > 1:
        where += f" per process, {launch.nproc_per_node} process(es) x {launch.nnodes} node(s), " + \
            ("nccl" if cuda else "gloo")
    log(f"train: {cfg.model} on {count:,} samples in {data_dir}, {cfg.samples_seen:,} samples seen ({where}); "
        f"{cfg.batch_line()} -> {run_dir} (step log: {fsio.join(run_dir, 'out.log')})")
    ranks = os.path.join(folder.path, "ranks") if launch.world > 1 else ""
    command = _launcher(launch, ranks) + ["-m", "winnow.pipeline.training.train_entry"]
    env["WINNOW_TRAIN_ARGS"] = json.dumps(argv)  # not on the command line: torchrun would read --logs as its own
    progress, tail = Progress(cfg, progress_every), collections.deque(maxlen=40)
    with subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          errors="replace", start_new_session=launch.world > 1) as proc:
        try:
            for text in proc.stdout:
                tail.append(text.rstrip())
                line = progress.line(text)
                if line:
                    log(line)
        finally:
            if proc.poll() is None:  # interrupted here: the trainer goes too (its checkpoints stay)
                _stop(proc, launch.world > 1)
            proc.wait()
    resume_cmd = _command(data_dir, folder.remote.rsplit("/", 1)[0], name, "--resume", *_launch_flags(launch))
    done = launch.node_rank > 0 or os.path.isfile(os.path.join(folder.path, "checkpoints", f"epoch_{cfg.epochs}.pt"))
    if proc.returncode != 0 or not done:
        failed = _failed_rank(tail, ranks)
        if failed:
            raise RunFailed(f"{failed}; the other ranks were stopped; `{resume_cmd}` continues from the latest "
                            "checkpoint")
        lines = [t for t in tail if t.strip()][-15:]
        log("train: open_clip_train's last lines:\n" + "\n".join(lines))
        cause = lines[-1].strip() if lines else "no output"
        raise RunFailed(f"open_clip_train failed (exit {proc.returncode}): {cause}; its log: "
                        f"{fsio.join(run_dir, 'out.log')}; `{resume_cmd}` continues from the latest checkpoint")
    if ranks:
        shutil.rmtree(ranks, ignore_errors=True)


def _launcher(launch: Launch, ranks: str) -> list[str]:
    """The command that starts the training processes: python itself for one, torchrun for several (one per
    device of this machine; each rank's output in ``ranks``, rank 0's also on this process's output)."""
    if launch.world == 1:
        return [sys.executable]
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}",
           "--redirects=3", "--tee=0:3", f"--log-dir={ranks}", "--max-restarts=0"]
    if launch.nnodes == 1:
        return run + ["--standalone", "--nnodes=1"]
    host, port = launch.master.rsplit(":", 1)
    return run + [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", f"--master-addr={host}",
                  f"--master-port={port}"]


def _launch_flags(launch: Launch) -> list[str]:
    flags = [] if launch.nproc_per_node == 1 else ["--nproc-per-node", str(launch.nproc_per_node)]
    return flags + ([] if launch.nnodes == 1 else ["--nnodes", str(launch.nnodes)])


def _stop(proc: subprocess.Popen, group: bool) -> None:
    """End the trainer (and, for torchrun, every rank it started)."""

    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(30)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


def _failed_rank(tail, ranks: str) -> str:
    """torchrun's report of the first rank that failed, in one clause with that rank's last line; "" when the
    output names none."""

    text = "\n".join(tail)
    found = [(int(m[1]), int(m[2]), int(m[3])) for m in re.finditer(
        r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text)]
    if not found:
        return ""
    # torchrun stops the other ranks with SIGTERM once one fails: the cause is a rank that ended otherwise
    rank, local, code = next((f for f in found if f[2] != -signal.SIGTERM), found[0])

    how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else \
        f"exited with code {code}"
    last = ""
    for stream in ("stderr.log", "stdout.log"):
        logs = sorted(glob.glob(os.path.join(ranks, "**", str(local), stream), recursive=True))
        lines = [re.sub(r"^\[rank\d+\]:\s?", "", ln.strip()) for path in logs[-1:]
                 for ln in open(path, errors="replace") if ln.strip()]
        lines = [ln for ln in lines if not re.match(r"[IWD]\d{4} ", ln)]  # torch's own INFO records
        errors = [ln for ln in lines if re.search(r"Error|Exception|error:", ln)]
        if errors or lines:
            last = (errors or lines)[-1][:200]
            break
    return f"training rank {rank} (local rank {local}) {how}" + (f"; its last line: {last}" if last else "")
