"""Patch Mixing throughput: building eval-set images, and the training augmentation on batches.

- eval set: ``mix_patches`` (7x7 grid, r = 0.3) on decoded 224 px images, against the baseline every written
  image pays anyway: its JPEG encoding (quality 95), on the same images, in this run;
- training: ``mix_batch`` (p = 0.5, r ~ U(0, 0.5), 7x7) on normalised (B, 3, 224, 224) batches, against the
  baseline of copying the batch once (``clone``): the augmentation's cost in memory passes.

    python benchmarks/bench_patchmix.py [--images 256] [--batch 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from winnow.pipeline.data.images import encode_jpeg, square_image
    from winnow.pipeline.evalsets.patchmix import mix_patches
    from winnow.pipeline.synth.world import SynthConfig, _jpeg, _spec_for
    from winnow.pipeline.training.patchmix import mix_batch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = SynthConfig()
    images = [square_image(_jpeg(_spec_for(cfg, 2, i)), 224) for i in range(args.images)]

    def rate(fn, n) -> float:
        start = time.perf_counter()
        fn()
        return n / (time.perf_counter() - start)

    rng = np.random.default_rng(0)
    mix = rate(lambda: [mix_patches(img, images[i - 1], 7, 0.3, rng) for i, img in enumerate(images)], len(images))
    jpeg = rate(lambda: [encode_jpeg(Image.fromarray(img), 95) for img in images], len(images))
    batch = torch.randn(args.batch, 3, 224, 224, device=args.device)
    mix_batch(batch, 0.5, 0.5, 7)  # warm-up
    reps = 10
    aug = rate(lambda: [mix_batch(batch, 0.5, 0.5, 7) for _ in range(reps)], reps * args.batch)
    copy = rate(lambda: [batch.clone() for _ in range(reps)], reps * args.batch)
    print(f"\nPatch Mixing throughput, 224 px, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'operation':<44} {'images/s':>10} {'baseline':<28} {'images/s':>10} {'ratio':>6}")
    print(f"{'eval set: mix_patches 7x7 r=0.3 (numpy)':<44} {mix:>10,.0f} {'JPEG encode q95':<28} {jpeg:>10,.0f} "
          f"{mix / jpeg:>6.2f}")
    print(f"{'training: mix_batch p=0.5 (torch)':<44} {aug:>10,.0f} {'batch clone':<28} {copy:>10,.0f} "
          f"{aug / copy:>6.2f}")


if __name__ == "__main__":
    main()
