"""``python -m winnow.pipeline.training.train_entry ARGS``: OpenCLIP's own trainer, with Winnow's tiny configs
registered
(the arguments may also come as a JSON list in ``WINNOW_TRAIN_ARGS``, as torchrun's workers get them).

open_clip_train has no flag for extra model configs, so this registers them and then hands the arguments to
``open_clip_train.main.main`` unchanged. With ``WINNOW_DRAFT_SIDE=N`` set (``winnow.pipeline.stages.train`` sets it to
twice
the model's input size), JPEGs are decoded with PIL's draft mode: the DCT is scaled down while decoding so
that both sides stay >= N. The trainer's own resize then sees at least twice the pixels it keeps, so the input
tensors are practically unchanged, while decoding a 400 px JPEG for a 32 px model costs a fraction of a full
decode: on a CPU, decoding is what bounds a tiny model's training speed.

With ``WINNOW_PATCH_MIXING=prob,r_max,grid,smoothing`` set (``TrainConfig.patch_mixing``), every training batch
goes through Patch Mixing (:func:`winnow.pipeline.training.patchmix.mix_batch`) and the contrastive loss gets the
area-interpolated targets (:func:`winnow.pipeline.training.patchmix.soft_clip_loss`); the trainer itself is unchanged.

Every epoch's shard draws, sample shuffle and augmentations are seeded from ``--seed``, the epoch and the process's
rank (:func:`use_epoch_seeds`; for ``--dataset-resampled``, which ``winnow.pipeline.stages.train`` always passes).
Checkpoints are saved atomically (:func:`use_atomic_checkpoints`). Under torchrun each rank runs this module.
"""

import functools
import hashlib
import json
import logging
import os
import random
import sys

import numpy as np

from winnow.pipeline.core.fsio import temp_path
from winnow.pipeline.data.images import open_rgb
from winnow.pipeline.models.registry import register


def use_draft_decoding(side: int) -> None:
    """Make webdataset's ``pilrgb`` decoder (what open_clip_train uses) decode JPEGs at reduced scale."""
    from webdataset.autodecode import ImageHandler

    full = ImageHandler.__call__

    def decode(self, key, data):
        if self.imagespec != "pilrgb" or not key.lower().endswith(("jpg", "jpeg")):
            return full(self, key, data)
        return open_rgb(data, side)

    ImageHandler.__call__ = decode


def _rank() -> int:
    """This training process's global rank (torchrun and SLURM say it; 0 alone)."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _seed(seed: int, epoch: int, worker: int) -> int:
    """A seed of its own for each (run seed, epoch, rank, loader worker); worker -1 is the training process. Rank 0
    of a run alone keeps the seeds of single-process runs."""
    rank = _rank()
    key = f"{seed}/{epoch}/{worker}" + (f"/rank{rank}" if rank else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def use_cpu_ddp() -> None:
    """open_clip_train wraps the model in DistributedDataParallel with ``device_ids=[device]``, which torch refuses
    for a model on the CPU (gloo): there the ids are dropped, as torch asks."""
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            on_cpu = device_ids and all(torch.device(d).type == "cpu" for d in device_ids)
            super().__init__(module, None if on_cpu else device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP


def use_atomic_checkpoints() -> None:
    """open_clip_train saves checkpoints with ``torch.save(obj, path)`` under their final name: a process killed
    while saving would leave a truncated ``epoch_N.pt`` that ``--resume`` then trips on (and that an upload to an
    object store could pick up). Here every ``.pt`` is written under a temporary name and renamed when whole."""
    import torch


    save = torch.save

    def atomic(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or not str(f).endswith(".pt"):
            return save(obj, f, *args, **kwargs)
        tmp = temp_path(str(f))
        try:
            save(obj, tmp, *args, **kwargs)
            os.replace(tmp, f)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    torch.save = atomic


def _seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _worker() -> int:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return info.id if info else 0


def _shard_seed(seed: int) -> int:
    return _seed(seed, -1, _worker())  # open_clip_train's shard sampler adds the epoch


def use_epoch_seeds(seed: int) -> None:
    """Make every epoch's batches a function of the run's seed and the epoch alone.

    open_clip_train's loader draws shards from the loader workers' seeds (which follow the training process's
    random state when the loader starts), webdataset's sample shuffle seeds itself from the clock and the process
    id, and the workers' augmentations continue one random stream across epochs. Here, at the start of each
    epoch, each loader worker seeds its shard draws, its shuffle and its augmentations from (seed, epoch,
    worker), and the training process seeds itself from (seed, epoch): the same shards, config and seed give the
    same weights, and a run resumed from a checkpoint continues as the uninterrupted run would have.
    """
    import open_clip_train.data as data
    import open_clip_train.main as trainer_main
    import webdataset
    from webdataset.filters import _shuffle

    build, resampled, clocked, epoch_fn = data.get_wds_dataset, data.ResampledShards2, webdataset.shuffle, \
        trainer_main.train_one_epoch
    shared = []  # the loader's epoch counter (open_clip_train's SharedEpoch, set before each epoch)

    def shards(*args, **kw):
        shared.append(kw.get("epoch"))
        return resampled(*args, **dict(kw, worker_seed=functools.partial(_shard_seed, seed)))

    def shuffle(bufsize=1000, initial=100, **_):
        epoch = shared[-1]

        def seeded(src):  # called in the loader worker when its pass over the shards begins
            stream = _seed(seed, epoch.get_value(), _worker())
            _seed_all(stream)  # this epoch's augmentations
            return _shuffle(src, bufsize, initial, rng=random.Random(stream))

        return seeded

    def get_wds_dataset(*args, **kw):
        data.ResampledShards2, webdataset.shuffle = shards, shuffle
        try:
            return build(*args, **kw)
        finally:
            data.ResampledShards2, webdataset.shuffle = resampled, clocked

    def train_one_epoch(model, data_, loss, epoch, *args, **kw):
        _seed_all(_seed(seed, epoch, -1))
        return epoch_fn(model, data_, loss, epoch, *args, **kw)

    data.get_wds_dataset, trainer_main.train_one_epoch = get_wds_dataset, train_one_epoch


def use_patch_mixing(prob: float, r_max: float, grid: int, smoothing: float) -> None:
    """Wrap open_clip_train's ``train_one_epoch``: the model mixes each batch, the loss uses soft targets."""
    import open_clip_train.main as trainer_main
    import torch

    from winnow.pipeline.training.patchmix import mix_batch, soft_clip_loss

    epoch_fn = trainer_main.train_one_epoch
    state: dict = {}

    class Mixing(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.module = model  # open_clip_train's unwrap_model() returns it (logit scale clamping)

        def forward(self, images, texts):
            images, state["r"], state["partner"] = mix_batch(images, prob, r_max, grid)
            return self.module(images, texts)

    def loss_fn(image_features, text_features, logit_scale, output_dict=False, **_):
        loss = soft_clip_loss(image_features, text_features, logit_scale, state["r"], state["partner"], smoothing)
        return {"contrastive_loss": loss} if output_dict else loss

    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        if args.world_size > 1 or args.accum_freq > 1 or dist_model is not None:
            raise SystemExit("Patch Mixing supports single-process training without accumulation or distillation")

        logging.info(f"Patch Mixing: p={prob}, r ~ U(0, {r_max}), {grid}x{grid} grid, label smoothing {smoothing}")
        return epoch_fn(Mixing(model), data, loss_fn, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=tb_writer)

    trainer_main.train_one_epoch = train_one_epoch


if __name__ == "__main__":
    register()
    args = json.loads(os.environ["WINNOW_TRAIN_ARGS"]) if os.environ.get("WINNOW_TRAIN_ARGS") else sys.argv[1:]
    if os.environ.get("WINNOW_DRAFT_SIDE"):
        use_draft_decoding(int(os.environ["WINNOW_DRAFT_SIDE"]))
    if os.environ.get("WINNOW_PATCH_MIXING"):
        p, r, g, eps = os.environ["WINNOW_PATCH_MIXING"].split(",")
        use_patch_mixing(float(p), float(r), int(g), float(eps))
    use_epoch_seeds(int(args[args.index("--seed") + 1]) if "--seed" in args else 0)  # seeds each epoch first
    use_atomic_checkpoints()
    use_cpu_ddp()
    from open_clip_train.main import main

    main(args)
