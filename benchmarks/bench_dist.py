"""DiST synthesis time per image (``winnow.pipeline.evalsets.dist.synthesize``: random-CNN Gram matching, L-BFGS) by
image size.

For each size the same source images are synthesised one at a time (the baseline: what a per-image loop, as in
Gatys' reference code, costs) and as one batch (how ``winnow evalset dist`` runs); the table gives seconds per
synthesised image and the batched/one-at-a-time ratio. ``--device cuda`` measures a GPU.

    python benchmarks/bench_dist.py [--sizes 128,224] [--images 4] [--steps 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from winnow.pipeline.data.images import square_image
from winnow.pipeline.evalsets import dist
from winnow.pipeline.synth.world import SynthConfig, _jpeg, _spec_for


def _per_image(args, net, sources, seeds, batch: int) -> float:
    """Seconds per image when synthesising ``batch`` images per call."""
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(0, args.images, batch):
        dist.synthesize(net, sources[s:s + batch], seeds[s:s + batch], args.steps, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,224")
    ap.add_argument("--images", type=int, default=4, help="images per size (the batch)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = SynthConfig()
    rows = []
    for size in map(int, args.sizes.split(",")):
        sources = np.stack([square_image(_jpeg(_spec_for(cfg, 2, i)), size) for i in range(args.images)])
        net = dist.texture_net(1234, dist.stages_for(size), args.device)
        seeds = list(range(args.images))

        one, batched = (_per_image(args, net, sources, seeds, batch) for batch in (1, args.images))
        rows.append((size, dist.stages_for(size), one, batched))
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    print(f"\nDiST synthesis, {args.steps} L-BFGS steps, {args.images} images per size, device {args.device}, "
          f"torch threads {threads}")
    print(f"{'size':>6} {'stages':>6} {'one at a time s/img':>20} {'batched s/img':>14} {'ratio':>7}")
    for size, stages, one, batched in rows:
        print(f"{size:>6} {stages:>6} {one:>20.2f} {batched:>14.2f} {batched / one:>7.2f}")


if __name__ == "__main__":
    main()
