"""``python -m pipeline.stages.train_entry ARGS``: OpenCLIP's own trainer, with Winnow's tiny configs registered.

open_clip_train has no flag for extra model configs, so this registers them and then hands the arguments to
``open_clip_train.main.main`` unchanged. With ``WINNOW_DRAFT_SIDE=N`` set (``pipeline.stages.train`` sets it to twice
the model's input size), JPEGs are decoded with PIL's draft mode: the DCT is scaled down while decoding so
that both sides stay >= N. The trainer's own resize then sees at least twice the pixels it keeps, so the input
tensors are practically unchanged, while decoding a 400 px JPEG for a 32 px model costs a fraction of a full
decode: on a CPU, decoding is what bounds a tiny model's training speed.

With ``WINNOW_PATCH_MIXING=prob,r_max,grid,smoothing`` set (``TrainConfig.patch_mixing``), every training batch
goes through Patch Mixing (:func:`pipeline.stages.patchmix_training.mix_batch`) and the contrastive loss gets the
area-interpolated targets (:func:`pipeline.stages.patchmix_training.soft_clip_loss`); the trainer itself is unchanged.
"""

import os
import sys

from pipeline.data.images import open_rgb
from pipeline.models.registry import register


def use_draft_decoding(side: int) -> None:
    """Make webdataset's ``pilrgb`` decoder (what open_clip_train uses) decode JPEGs at reduced scale."""
    from webdataset.autodecode import ImageHandler

    full = ImageHandler.__call__

    def decode(self, key, data):
        if self.imagespec != "pilrgb" or not key.lower().endswith(("jpg", "jpeg")):
            return full(self, key, data)
        return open_rgb(data, side)

    ImageHandler.__call__ = decode


def use_seeded_shuffle(seed: int) -> None:
    """webdataset's sample shuffle seeds itself from the clock and the process id; give it the run's seed, so the
    same shards, config and seed give the same batches and the same weights (on the CPU)."""
    import random

    import webdataset

    clocked = webdataset.shuffle

    def shuffle(bufsize=1000, initial=100, rng=None, handler=None):
        return clocked(bufsize, initial, rng=rng or random.Random(seed), handler=handler)

    webdataset.shuffle = shuffle  # open_clip_train.data calls wds.shuffle(...) when it builds its pipeline


def use_patch_mixing(prob: float, r_max: float, grid: int, smoothing: float) -> None:
    """Wrap open_clip_train's ``train_one_epoch``: the model mixes each batch, the loss uses soft targets."""
    import torch
    import open_clip_train.main as trainer_main

    from pipeline.stages.patchmix_training import mix_batch, soft_clip_loss

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
        import logging

        logging.info(f"Patch Mixing: p={prob}, r ~ U(0, {r_max}), {grid}x{grid} grid, label smoothing {smoothing}")
        return epoch_fn(Mixing(model), data, loss_fn, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=tb_writer)

    trainer_main.train_one_epoch = train_one_epoch


if __name__ == "__main__":
    register()
    args = sys.argv[1:]
    use_seeded_shuffle(int(args[args.index("--seed") + 1]) if "--seed" in args else 0)
    if os.environ.get("WINNOW_DRAFT_SIDE"):
        use_draft_decoding(int(os.environ["WINNOW_DRAFT_SIDE"]))
    if os.environ.get("WINNOW_PATCH_MIXING"):
        p, r, g, eps = os.environ["WINNOW_PATCH_MIXING"].split(",")
        use_patch_mixing(float(p), float(r), int(g), float(eps))
    from open_clip_train.main import main

    main(sys.argv[1:])
