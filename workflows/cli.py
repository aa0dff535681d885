"""The ``winnow`` command.

User errors (bad config, bad path, bad layout) print one line, ``winnow: error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from dataclasses import replace

from pipeline.core.errors import UserError, describe
from pipeline.run.runner import TaskFailed

DESCRIPTION = """\
Winnow curates vision-language training data: web image-text pools in, DataComp-style subsets out.

Typical session:
  winnow demo                               # everything below on a synthetic pool served on 127.0.0.1
  winnow synth runs/w                       # write a synthetic web world (URL list, images, truth)
  winnow serve runs/w                       # serve it on 127.0.0.1 (foreground)
  winnow ingest runs/w/urls.parquet runs/p  # download a URL list into a pool of WebDataset shards
  winnow ledger runs/p                      # how every input row ended: ok, or why it failed
  winnow register /data/datacomp/shards     # adopt an existing img2dataset/DataComp pool
  winnow embed runs/p --model ViT-B-32 --pretrained openai --tag b32
  winnow subset basic --pool runs/p --out runs/subsets/basic        # recipes: manifests/subsets/*.yaml
  winnow reshard runs/p runs/subsets/basic/uids.npy runs/shards/basic
  winnow train runs/shards/basic --scale tiny --name basic --tasks manifests/tasks/demo.yaml --var world=runs/w
  winnow evaluate runs/train/basic/checkpoints/epoch_1.pt --tasks manifests/tasks/demo.yaml --var world=runs/w \
      --out runs/eval/basic

Stages run on an embedded Dask LocalCluster; --scheduler tcp://HOST:8786 uses an existing cluster.
"""


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a local cluster)")
    p.add_argument("--workers", type=int, help="worker processes of the local cluster (default: CPU cores)")


def _partial_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-partial", action="store_true",
                   help="use the finished shards of a pool whose ingest has not finished (default: refuse it)")


def _config_args(p: argparse.ArgumentParser, default_note: str = "built-in defaults") -> None:
    p.add_argument("--config", help=f"YAML run config with sections synth/ingest/cluster (default: {default_note})")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                   help="override one config value, e.g. --set ingest.timeout=5 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a different run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winnow", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the main job end to end on the embedded synthetic pool")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    _config_args(p, "manifests/demo.yaml")
    _cluster_args(p)

    p = sub.add_parser("synth", help="write a synthetic web world with known ground truth")
    p.add_argument("world", help="output folder")
    _config_args(p)
    _cluster_args(p)

    p = sub.add_parser("serve", help="serve a synthetic world's images on 127.0.0.1 until Ctrl-C")
    p.add_argument("world", help="a folder written by `winnow synth`")
    p.add_argument("--port", type=int, help="port (default: the one in the world's base_url)")

    p = sub.add_parser("ingest", help="download a URL list (parquet/csv/tsv/jsonl) into a pool")
    p.add_argument("urls", help="URL list file or folder; columns url, text and (optionally) uid")
    p.add_argument("pool", help="output pool folder (local path or fsspec URL)")
    _config_args(p)
    _cluster_args(p)

    p = sub.add_parser("register", help="validate an existing img2dataset/DataComp pool and record its manifest")
    p.add_argument("pool", help="pool folder")
    _cluster_args(p)

    p = sub.add_parser("embed", help="store image and text embeddings of every ok sample (DataComp .npz layout)")
    p.add_argument("pool", help="pool folder")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip tag (openai, datacomp1b, dfn2b...) or checkpoint path; '' for random init")
    p.add_argument("--tag", default="b32", help="name of the arrays: <tag>_img, <tag>_txt (default b32)")
    p.add_argument("--out", help="output folder (default POOL/embeddings/TAG)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--overwrite", action="store_true")
    _partial_arg(p)
    _cluster_args(p)

    p = sub.add_parser("dedup", help="exact, near, semantic duplicates and eval-set contamination of a pool")
    p.add_argument("pool", help="pool folder, embedded with `winnow embed --tag TAG`")
    p.add_argument("--tag", default="l14", help="embedding tag to compare images with (default l14)")
    p.add_argument("--keep-tag", default="", help="tag whose image-text cosine decides which copy is kept "
                   "(default: --tag)")
    p.add_argument("--near-threshold", type=float, default=0.95, help="cosine for near duplicates (default 0.95)")
    p.add_argument("--semantic-eps", default="0.05,0.02,0.01", help="SemDeDup eps values, comma-separated")
    p.add_argument("--decontaminate", action="append", default=[], metavar="EVAL_SET",
                   help="evaluation set folder whose images must not be in the pool (repeatable)")
    p.add_argument("--contamination-threshold", type=float, default=0.9)
    p.add_argument("--out", help="output folder (default POOL/dedup/TAG)")
    p.add_argument("--overwrite", action="store_true")
    _partial_arg(p)
    _cluster_args(p)

    p = sub.add_parser("copy-descriptor", help="train a small copy-detection descriptor on a pool's own images")
    p.add_argument("pool", help="pool folder")
    p.add_argument("--out", required=True, help="folder for descriptor.pt")
    p.add_argument("--steps", type=int, default=300)

    p = sub.add_parser("evalset", help="build an evaluation set from labeled images: patchmix or dist")
    p.add_argument("kind", choices=["patchmix", "dist"],
                   help="patchmix: foreign patches, tile shuffles, patch drops, occlusion; dist: texture-synthesis "
                        "triplets for the odd-one-out test")
    p.add_argument("source", help="labeled images: an eval set folder (test/*.tar with .cls, clip_benchmark layout) "
                                  "or a folder with one sub-folder of images per class")
    p.add_argument("--out", required=True, help="output folder (eval sets, manifest.parquet, tasks.yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="side of the square images (default 224)")
    p.add_argument("--per-class", type=int, default=0, help="first N images of each class (default: all)")
    p.add_argument("--steps", type=int, default=200, help="dist: L-BFGS iterations per synthesis (default 200)")
    p.add_argument("--batch", type=int, default=32, help="dist: images synthesised together (default 32)")
    p.add_argument("--vgg19", default="", help="dist: a local torchvision VGG-19 state dict as the texture network "
                                              "(default: a fixed random multi-scale CNN)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("subset", help="score a pool with a recipe's filters and write its uids.npy")
    p.add_argument("recipe", help="recipe name (manifests/subsets/NAME.yaml) or YAML path")
    p.add_argument("--pool", required=True, help="pool folder, or a DataComp metadata folder")
    p.add_argument("--out", required=True, help="output folder for uids.npy and subset.json")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="fill ${NAME} in the recipe")
    p.add_argument("--embeddings", action="append", default=[], metavar="TAG=DIR",
                   help="where embeddings of TAG live (default POOL/embeddings/TAG, or .npz beside the parquet)")
    _partial_arg(p)
    _cluster_args(p)

    p = sub.add_parser("reshard", help="materialise a subset into new WebDataset shards (byte copy)")
    p.add_argument("pool", help="pool folder the subset was selected from")
    p.add_argument("subset", help="uids.npy (sorted u8,u8)")
    p.add_argument("out", help="output folder")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per output shard (default 10000)")
    p.add_argument("--overwrite", action="store_true")
    _partial_arg(p)
    _cluster_args(p)

    p = sub.add_parser("train", help="train the fixed CLIP/ViTamin of a scale on resharded shards (open_clip_train)")
    p.add_argument("data", help="a `winnow reshard` output folder")
    p.add_argument("--scale", default="tiny", help="tiny (CPU), small, medium, large or xlarge (DataComp's values)")
    p.add_argument("--arch", default="clip", choices=["clip", "vit", "vitamin"],
                   help="the scale's CLIP (a ViT; a small ResNet at tiny; vit is an alias) or a ViTamin of matching size")
    p.add_argument("--name", required=True, help="run name (a finished name is refused, not silently reused)")
    p.add_argument("--logs", default="runs/train", help="parent folder of runs (default runs/train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", default="", help="start from an open_clip tag or checkpoint (DFN fine-tuning)")
    p.add_argument("--patch-mixing", type=float, default=0.0, metavar="P",
                   help="Patch Mixing augmentation: share of images mixed (0: off; the paper's experiment: 0.5)")
    p.add_argument("--tasks", help="task list to evaluate the final checkpoint on (writes results.jsonl)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="fill ${NAME} in the task list")

    p = sub.add_parser("dfn", help="data filtering networks: `winnow dfn train HQ_POOL --out DIR`")
    dfn = p.add_subparsers(dest="dfn_command", required=True, metavar="train")
    p = dfn.add_parser("train", help="train a data filtering network on a high-quality image-text pool")
    p.add_argument("hq_pool", help="a pool of trusted image-text pairs (the synthetic world's clean/ in the demo)")
    p.add_argument("--out", required=True, help="folder for the resharded set and the training run")
    p.add_argument("--name", default="dfn", help="run name (default dfn)")
    p.add_argument("--scale", default="tiny", help="fixed hyper-parameters of this scale (default tiny)")
    p.add_argument("--arch", default="clip", choices=["clip", "vit", "vitamin"], help="the scale's CLIP or a ViTamin")
    p.add_argument("--pretrained", default="", help="fine-tune from an open_clip tag or checkpoint (as DFN does)")
    _cluster_args(p)

    p = sub.add_parser("evaluate", help="evaluate an open_clip model on a task list")
    p.add_argument("checkpoint", help="checkpoint path, or an open_clip pretrained tag with --model")
    p.add_argument("--model", default="winnow-tiny-clip", help="open_clip architecture (default winnow-tiny-clip)")
    p.add_argument("--tasks", required=True, help="task list YAML (e.g. manifests/tasks/demo.yaml)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="fill ${NAME} in the task list")
    p.add_argument("--out", required=True, help="folder for eval_results.jsonl and summary.json")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("ledger", help="print how every input row of a pool ended (counts per state)")
    p.add_argument("pool", help="pool folder")
    p.add_argument("--truth", help="a synthetic world folder: also compare states with its planted defects")
    return parser


def _load(args):
    from .settings import demo_config_path, load

    path = args.config
    if path is None and args.command == "demo":
        path = str(demo_config_path())
    return load(path, args.overrides, getattr(args, "scheduler", None), getattr(args, "workers", None))


def _runner(cfg):
    from pipeline.run.runner import Runner

    return Runner(cfg.cluster)


def cmd_demo(args) -> None:
    from workflows import demo

    demo.run(args.out, _load(args), overwrite=args.overwrite)


def cmd_synth(args) -> None:
    from pipeline.synth.world import build_world

    cfg = _load(args)
    with _runner(cfg) as runner:
        doc = build_world(cfg.synth, args.world, runner, overwrite=args.overwrite)
    print(f"synth: wrote {args.world}: {doc['rows']} (urls.parquet is the pool's input; "
          f"serve it with `winnow serve {args.world}`)")


def cmd_serve(args) -> None:
    import json
    import time
    from urllib.parse import urlparse

    from pipeline.synth.server import WebPoolServer

    manifest_path = os.path.join(args.world, "_manifest.json")
    if not os.path.isfile(manifest_path):
        raise UserError(f"{args.world} is not a synthetic world (no _manifest.json); run `winnow synth` first")
    with open(manifest_path) as f:
        base = urlparse(json.load(f)["params"]["base_url"])
    with WebPoolServer(args.world, base.hostname or "127.0.0.1", args.port or base.port or 80) as server:
        print(f"serving {args.world}/site at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def cmd_ingest(args) -> None:
    from pipeline.stages.ingest import ingest
    from pipeline.data.ledger import format_counts
    from pipeline.data.pool import ledger

    cfg = _load(args)
    with _runner(cfg) as runner:
        ingest(args.urls, args.pool, cfg.ingest, runner, overwrite=args.overwrite)
    counts, total = ledger(args.pool)
    print(format_counts(counts, total))
    if total and not counts.get("ok"):
        top = ", ".join(f"{s} {n:,}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        raise NoRowDownloaded(f"no row of {total:,} was downloaded ({top}); is the server reachable? "
                              f"`winnow ledger {args.pool}` and the parquet's error_message say why each failed")


class NoRowDownloaded(Exception):
    """An ingest that finished with every row failed: exit 1 with one line."""


def cmd_register(args) -> None:
    from pipeline.stages.register import register

    with _cluster(args) as runner:
        doc = register(args.pool, runner)
    print(f"register: {args.pool} is a valid pool: {doc['shards']} shards, {doc['rows']['input']:,} rows, "
          f"{doc['rows']['ok']:,} ok; manifest written")


def _cluster(args):
    from pipeline.run.runner import ClusterConfig, Runner

    return Runner(ClusterConfig(scheduler=args.scheduler or "", n_workers=args.workers or 0))


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise UserError(f"{flag} {value!r}: expected NAME=VALUE")
        k, v = value.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_embed(args) -> None:
    from pipeline.stages.embed import EmbedConfig, embed

    cfg = EmbedConfig(model=args.model, pretrained=args.pretrained, tag=args.tag, batch_size=args.batch_size,
                      device=args.device, precision=args.precision)
    with _cluster(args) as runner:
        doc = embed(args.pool, cfg, runner, out=args.out, overwrite=args.overwrite,
                    allow_partial=args.allow_partial)
    print(f"embed: {doc['rows']}")


def cmd_dedup(args) -> None:
    from pipeline.stages.dedup import DedupConfig, dedup

    try:
        eps = [float(e) for e in args.semantic_eps.split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--semantic-eps {args.semantic_eps!r}: give numbers like 0.05,0.02") from None
    cfg = DedupConfig(tag=args.tag, keep_tag=args.keep_tag, near_threshold=args.near_threshold, semantic_eps=eps,
                      decontaminate=args.decontaminate, contamination_threshold=args.contamination_threshold)
    with _cluster(args) as runner:
        doc = dedup(args.pool, cfg, runner, out=args.out, overwrite=args.overwrite,
                    allow_partial=args.allow_partial)
    print(f"dedup: {doc['dropped']}")


def cmd_copy_descriptor(args) -> None:
    from pipeline.models.copydetect import MODEL_NAME
    from pipeline.stages.copy_descriptor import train_descriptor

    path = train_descriptor(args.pool, args.out, steps=args.steps)
    print(f"copy-descriptor: {path}\nnext: winnow embed {args.pool} --model {MODEL_NAME} --pretrained {path} "
          "--tag copy; winnow dedup POOL --tag copy")


def cmd_evalset(args) -> None:
    if args.size < 16:
        raise UserError(f"--size {args.size} is too small; use 16 px or more (224 for ImageNet-scale models)")
    if args.kind == "patchmix":
        from pipeline.evalsets.patchmix import build_patchmix

        tasks = build_patchmix(args.source, args.out, seed=args.seed, size=args.size, per_class=args.per_class)
        what = f"{len(tasks)} conditions"
    else:
        from pipeline.evalsets.dist import DistConfig, build_dist

        cfg = DistConfig(size=args.size, per_class=args.per_class, seed=args.seed, steps=args.steps,
                         batch=args.batch, vgg19=args.vgg19, device=args.device)
        summary = build_dist(args.source, args.out, cfg)
        what = f"{summary['kept']} triplets"
    print(f"evalset: {what} -> {args.out}; evaluate with --tasks {os.path.join(args.out, 'tasks.yaml')}")


def cmd_subset(args) -> None:
    from pipeline.stages.subset import subset

    with _cluster(args) as runner:
        subset(args.recipe, args.pool, args.out, runner, variables=_pairs(args.var, "--var"),
               embeddings=_pairs(args.embeddings, "--embeddings") or None, allow_partial=args.allow_partial)


def cmd_reshard(args) -> None:
    from pipeline.stages.reshard import reshard

    with _cluster(args) as runner:
        doc = reshard(args.pool, args.subset, args.out, runner, shard_size=args.shard_size, overwrite=args.overwrite,
                      allow_partial=args.allow_partial)
    print(f"reshard: {doc['rows']['samples']:,} samples in {doc['shards']} shards -> {args.out}")


def cmd_train(args) -> None:
    import os

    from pipeline.stages.train import from_scale, train

    if not 0 <= args.patch_mixing <= 1:
        raise UserError(f"--patch-mixing {args.patch_mixing} must be a share between 0 and 1")
    cfg = replace(from_scale(args.scale, args.arch, seed=args.seed, pretrained=args.pretrained),
                  patch_mixing=args.patch_mixing)
    ckpt = train(args.data, args.logs, args.name, cfg)
    print(f"train: {ckpt}")
    if args.tasks:
        from pipeline.stages.evaluate import evaluate
        from pipeline.tasks import load_tasklist

        tasks = load_tasklist(args.tasks, _pairs(args.var, "--var"))
        summary = evaluate(cfg.model, ckpt, tasks, os.path.join(args.logs, args.name))
        os.replace(os.path.join(args.logs, args.name, "eval_results.jsonl"),
                   os.path.join(args.logs, args.name, "results.jsonl"))
        print(f"train: average of main metrics {summary['average']:.4f}")


def cmd_dfn_train(args) -> None:
    from pipeline.stages.dfn import train_dfn
    from pipeline.stages.train import from_scale

    cfg = from_scale(args.scale, args.arch, pretrained=args.pretrained)
    with _cluster(args) as runner:
        ckpt = train_dfn(args.hq_pool, args.out, args.name, cfg, runner)
    print(f"dfn train: {ckpt}\nnext: winnow embed POOL --model {cfg.model} --pretrained {ckpt} --tag dfn; "
          "winnow subset dfn_30pct --pool POOL --out ...")


def cmd_evaluate(args) -> None:
    from pipeline.stages.evaluate import evaluate
    from pipeline.tasks import load_tasklist

    tasks = load_tasklist(args.tasks, _pairs(args.var, "--var"))
    evaluate(args.model, args.checkpoint, tasks, args.out, device=args.device)


def cmd_ledger(args) -> None:
    from pipeline.data.ledger import format_counts
    from pipeline.data.pool import ledger

    from pipeline.data.pool import unfinished_ingest

    counts, total = ledger(args.pool)
    print(format_counts(counts, total))
    unfinished = unfinished_ingest(args.pool)
    if unfinished:
        print(f"{unfinished}: the counts above cover the finished shards only; rerun the same `winnow ingest` "
              "to finish it")
    _embed_ledgers(args.pool)
    if args.truth:
        from pipeline.synth.truth import ingest_check

        print()
        print(ingest_check(args.pool, args.truth, min_image_size=_min_image_size(args.pool)).to_string(index=False))


def _embed_ledgers(pool: str) -> None:
    """Later stages' ledgers: images that failed to decode when embedding, per embedding tag."""
    from pipeline.data.manifest import read_manifest

    base = os.path.join(pool, "embeddings")
    for tag in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        doc = read_manifest(os.path.join(base, tag))
        if doc:
            rows = doc["rows"]
            print(f"embed '{tag}': {rows.get('embedded_images', 0):,} images embedded, "
                  f"{rows.get('decode_errors', 0):,} decode_error (see embeddings/{tag}/*.parquet)")


def _min_image_size(pool: str) -> int:
    from pipeline.data.manifest import read_manifest

    doc = read_manifest(pool) or {}
    return int(doc.get("params", {}).get("min_image_size", 0))


COMMANDS = {"demo": cmd_demo, "synth": cmd_synth, "serve": cmd_serve, "ingest": cmd_ingest,
            "register": cmd_register, "embed": cmd_embed, "dedup": cmd_dedup, "copy-descriptor": cmd_copy_descriptor, "evalset": cmd_evalset, "subset": cmd_subset, "reshard": cmd_reshard,
            "train": cmd_train, "dfn": cmd_dfn_train, "evaluate": cmd_evaluate, "ledger": cmd_ledger}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from pipeline import __version__

        print(f"winnow {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        COMMANDS[args.command](args)
    except UserError as exc:
        print(f"winnow: error: {exc}", file=sys.stderr)
        return 2
    except TaskFailed as exc:
        print(f"winnow: error: {exc}; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 1
    except NoRowDownloaded as exc:
        print(f"winnow: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the driver's own reads and writes (full or read-only disk, a vanished file)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        print(f"winnow: error: {describe(exc)}" + ("; finished shards are kept, rerun the same command to resume"
                                                   if full else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("winnow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
