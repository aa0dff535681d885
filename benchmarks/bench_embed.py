"""Embedding throughput of ``winnow embed``'s shard stage against a bare open_clip forward loop.

Both embed the same images with the same model, batch size and torch threads, in this process:

- bare loop: the images decoded and preprocessed beforehand (not timed), then ``encode_image`` and
  ``encode_text`` batches (the stage stores both, so both towers run in each);
- winnow: ``embed_shard`` on the same shard, which reads the tar, decodes and preprocesses the JPEGs in threads
  while the model runs, and writes the row-aligned ``.npz`` and the embed ledger.

Target: winnow's overhead <= 10%. Models: ``--models winnow-tiny-clip,ViT-B-32`` (random init: speed only).
On a GPU (``--device cuda``) the same comparison measures the GPU path.

    python benchmarks/bench_embed.py [--images 512] [--models winnow-tiny-clip,ViT-B-32] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time


def main() -> None:
    import torch
    from PIL import Image

    from winnow.pipeline.data import shards
    from winnow.pipeline.stages.embed import EmbedConfig, EmbedTask, embed_shard
    from winnow.pipeline.synth.world import SynthConfig, _jpeg, _spec_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--models", default="winnow-tiny-clip,ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="winnow-bench-embed-")
    pool = os.path.join(root, "pool")
    cfg = SynthConfig()
    images = [_jpeg(_spec_for(cfg, 1, i)) for i in range(args.images)]
    rows = [{"uid": f"{i:032x}", "key": f"00000000{i:04d}", "caption": f"a photo of a shape number {i}",
             "status": "success", "state": "ok"} for i in range(args.images)]
    shards.write_shard(pool, 0, rows, {r["key"]: img for r, img in zip(rows, images)})

    results = []
    for model_name in args.models.split(","):
        ecfg = EmbedConfig(model=model_name, pretrained="", tag="b", batch_size=args.batch_size,
                           device=args.device, decode_threads=4)
        from winnow.pipeline.stages.embed import cached_model

        model, preprocess, tokenizer = cached_model(ecfg)
        captions = [r["caption"] for r in rows]
        tensors = [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
        with torch.inference_mode():  # warm-up
            model.encode_image(torch.stack(tensors[: args.batch_size]).to(args.device))
        t = time.time()
        with torch.inference_mode():
            for s in range(0, len(tensors), args.batch_size):
                model.encode_image(torch.stack(tensors[s: s + args.batch_size]).to(args.device), normalize=True)
            for s in range(0, len(captions), args.batch_size):
                model.encode_text(tokenizer(captions[s: s + args.batch_size]).to(args.device), normalize=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        bare = time.time() - t
        out = os.path.join(root, f"emb-{model_name}")
        t = time.time()
        embed_shard(EmbedTask(pool, out, 0, ecfg.__dict__))
        ours = time.time() - t
        results.append((model_name, bare, ours))
        print(f"bench: {model_name}: bare {bare:.1f} s, winnow {ours:.1f} s", flush=True)

    print()
    print(f"embedding {args.images} images (synthetic JPEGs, 300-600 px), batch {args.batch_size}, "
          f"device {args.device}, {torch.get_num_threads()} torch threads")
    print(f"{'model':<18} {'bare img/s':>11} {'winnow img/s':>13} {'overhead':>9}")
    for name, bare, ours in results:
        print(f"{name:<18} {args.images / bare:>11.1f} {args.images / ours:>13.1f} {ours / bare - 1:>+9.1%}")
    print("target: overhead <= 10% (winnow also reads the tar and decodes the JPEGs; "
          "the bare loop starts from tensors)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
