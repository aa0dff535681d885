"""The ``winnow`` command: one table of subcommands, each mapped to its module in one hop.

Every subcommand reads the run configuration (:class:`winnow.workflows.settings.RunConfig`: ``--config FILE``, then
``--set section.key=value``); a flag is a short name for one key of it (``winnow embed --tag b32`` is
``--set embed.tag=b32``), so the config dataclasses are the one source of defaults. User errors (bad config,
bad path, bad layout) print one line, ``winnow: error: ...``, and exit 2; a failed run exits 1 with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import importlib
import os
import sys
import typing
from dataclasses import dataclass, field

from winnow.pipeline import __version__
from winnow.pipeline.core.errors import RunFailed, UserError, describe
from winnow.pipeline.run.runner import TaskFailed

DESCRIPTION = """\
Winnow curates vision-language training data: web image-text pools in, DataComp-style subsets out.

Typical session:
  winnow demo                               # everything below on a synthetic pool served on 127.0.0.1
  winnow synth runs/w                       # write a synthetic web world (URL list, images, truth)
  winnow serve runs/w                       # serve it on 127.0.0.1 (foreground)
  winnow ingest runs/w/urls.parquet runs/p --allow-hosts 127.0.0.1
  winnow ledger runs/p                      # how every input row ended: ok, or why it failed
  winnow register /data/datacomp/shards     # adopt an existing img2dataset/DataComp pool
  winnow embed runs/p --model ViT-B-32 --pretrained openai --tag b32
  winnow subset basic --pool runs/p --out runs/subsets/basic        # recipes: manifests/subsets/*.yaml
  winnow reshard runs/p runs/subsets/basic/uids.npy runs/shards/basic
  winnow train runs/shards/basic --scale tiny --name basic --tasks manifests/tasks/demo.yaml --var world=runs/w
  winnow evaluate runs/train/basic/checkpoints/epoch_1.pt --tasks manifests/tasks/demo.yaml --var world=runs/w \\
      --out runs/eval/basic

Every command takes --config FILE and --set section.key=value; stages run on an embedded Dask LocalCluster,
--scheduler tcp://HOST:8786 uses an existing cluster.
"""


@dataclass
class Flag:
    """A command-line flag: ``key`` is the config key it sets (``{kind}`` filled from the command's first
    positional), or "" for a plain argument of the command (a path, a name)."""

    name: str
    key: str = ""
    help: str = ""
    many: bool = False  # repeatable; the values form a list
    switch: bool = False  # no value: true when given
    required: bool = False
    default: str | None = None  # plain arguments only: config keys take their default from the config
    pairs: bool = False  # NAME=VALUE values: a dict in the Python API
    api: str = ""  # its keyword in the Python API (default: the flag's name)

    @property
    def keyword(self) -> str:
        return self.api or self.name.lstrip("-").replace("-", "_")


@dataclass
class Command:
    """One command: its positionals and flags, and the config sections whose every key it reads. The CLI and the
    Python API (``import winnow``) are both made from this table: a flag sets a config key or is a plain argument;
    the API takes the positionals, the plain arguments and every field of the sections as typed keywords."""

    name: str
    help: str
    run: str  # the function that runs it, "module:function" (imported only when the command runs)
    args: list[tuple[str, str]] = field(default_factory=list)  # positionals: (name, help)
    flags: list[Flag] = field(default_factory=list)
    stage: bool = True  # writes an output folder: --overwrite; runs on the cluster: --scheduler / --workers
    sections: tuple[str, ...] = ()  # config sections (winnow.workflows.settings.RunConfig) it reads; "{kind}": per kind


PARTIAL = Flag("--allow-partial", help="use the finished shards of a pool whose ingest has not finished", switch=True)
COMMANDS = [
    Command("demo", "run the main job end to end on the embedded synthetic pool", "winnow.workflows.demo:main",
            flags=[Flag("--out", help="run folder", default="runs/demo")]),
    Command("synth", "write a synthetic web world with known ground truth", "winnow.workflows.commands:synth",
            [("world", "output folder")], sections=("synth",)),
    Command("serve", "serve a synthetic world's images on 127.0.0.1 until Ctrl-C", "winnow.workflows.commands:serve",
            [("world", "a folder written by `winnow synth`")],
            [Flag("--port", help="port (default: the one in the world's base_url)")], stage=False),
    Command("ingest", "download a URL list (parquet/csv/tsv/jsonl) into a pool", "winnow.workflows.commands:ingest",
            [("urls", "URL list file or folder; columns url and text/caption, optionally uid"),
             ("pool", "output pool folder (local path or fsspec URL)")],
            [Flag("--retry", help="fetch again, into the finished pool, only the rows in these states: transient "
                  "(timeouts, connection errors, 429/5xx), http_5xx or a state name (repeatable)", many=True),
             Flag("--shard-size", "ingest.shard_size", "rows per shard (img2dataset's number_sample_per_shard)"),
             Flag("--thread-count", "ingest.thread_count", "concurrent downloads per shard"),
             Flag("--timeout", "ingest.timeout", "seconds one network wait may take"),
             Flag("--retries", "ingest.retries", "extra attempts after a failure that may pass"),
             Flag("--url-col", "ingest.url_col"), Flag("--caption-col", "ingest.caption_col"),
             Flag("--min-image-size", "ingest.min_image_size", "a shorter side below this is too_small"),
             Flag("--image-size", "ingest.image_size"), Flag("--resize-mode", "ingest.resize_mode"),
             Flag("--allow-hosts", "ingest.allow_hosts", "hosts, addresses or networks fetched although not "
                  "public, e.g. 127.0.0.1 (repeatable)", many=True)], sections=("ingest",)),
    Command("register", "validate an existing img2dataset/DataComp pool and record its manifest",
            "winnow.workflows.commands:register", [("pool", "pool folder")]),
    Command("ledger", "print how every input row of a pool ended (counts per state)",
            "winnow.workflows.commands:ledger",
            [("pool", "pool folder")],
            [Flag("--truth", help="a synthetic world folder: also compare states with its planted defects")],
            stage=False),
    Command("embed", "store image and text embeddings of every ok sample (DataComp .npz layout)",
            "winnow.workflows.commands:embed", [("pool", "pool folder")],
            [Flag("--model", "embed.model", "open_clip architecture"),
             Flag("--pretrained", "embed.pretrained", "open_clip tag or checkpoint path; '' for random init"),
             Flag("--tag", "embed.tag", "name of the arrays: <tag>_img, <tag>_txt"),
             Flag("--out", help="output folder (default POOL/embeddings/TAG)"),
             Flag("--batch-size", "embed.batch_size"), Flag("--device", "embed.device"),
             Flag("--precision", "embed.precision"),
             Flag("--detect", "embed.detect", "detectors on the same pixels: faces, nsfw (repeatable)", many=True),
             PARTIAL], sections=("embed",)),
    Command("dedup", "exact, near, semantic duplicates and eval-set contamination of a pool",
            "winnow.workflows.commands:dedup", [("pool", "pool folder, embedded with `winnow embed --tag TAG`")],
            [Flag("--tag", "dedup.tag", "embedding tag to compare images with"),
             Flag("--keep-tag", "dedup.keep_tag", "tag whose image-text cosine decides which copy is kept"),
             Flag("--near-threshold", "dedup.near_threshold", "cosine for near duplicates"),
             Flag("--semantic-eps", "dedup.semantic_eps", "SemDeDup eps values", many=True),
             Flag("--decontaminate", "dedup.decontaminate", "evaluation set folder whose images must not be in "
                  "the pool (repeatable)", many=True),
             Flag("--contamination-threshold", "dedup.contamination_threshold"),
             Flag("--out", help="output folder (default POOL/dedup/TAG)"), PARTIAL], sections=("dedup",)),
    Command("copy-descriptor", "train a small copy-detection descriptor on a pool's own images",
            "winnow.workflows.commands:copy_descriptor", [("pool", "pool folder")],
            [Flag("--out", help="folder for descriptor.pt", required=True),
             Flag("--steps", "copy_descriptor.steps", "training steps")], sections=("copy_descriptor",)),
    Command("evalset", "build an evaluation set from labeled images: patchmix or dist",
            "winnow.workflows.commands:evalset",
            [("kind", "patchmix: foreign patches, tile shuffles, patch drops, occlusion; dist: texture-synthesis "
                      "triplets for the odd-one-out test"),
             ("source", "labeled images: an eval set folder (test/*.tar with .cls) or a folder of class folders")],
            [Flag("--out", help="output folder (eval sets, manifest.parquet, tasks.yaml)", required=True),
             Flag("--seed", "{kind}.seed"), Flag("--size", "{kind}.size", "side of the square images"),
             Flag("--per-class", "{kind}.per_class", "first N images of each class (0: all)"),
             Flag("--steps", "dist.steps", "dist: L-BFGS iterations per synthesis"),
             Flag("--batch", "dist.batch", "dist: images synthesised together"),
             Flag("--vgg19", "dist.vgg19", "dist: a local torchvision VGG-19 state dict as the texture network"),
             Flag("--device", "dist.device")], sections=("{kind}",)),
    Command("subset", "score a pool with a recipe's filters and write its uids.npy", "winnow.workflows.commands:subset",
            [("recipe", "recipe name (manifests/subsets/NAME.yaml) or YAML path")],
            [Flag("--pool", help="pool folder, or a DataComp metadata folder", required=True),
             Flag("--out", help="output folder for uids.npy and subset.json", required=True),
             Flag("--var", help="fill ${NAME} in the recipe (NAME=VALUE, repeatable)", many=True, pairs=True,
                  api="variables"),
             Flag("--embeddings", help="where embeddings of TAG live (TAG=DIR, repeatable; default "
                  "POOL/embeddings/TAG, or .npz beside the parquet)", many=True, pairs=True),
             Flag("--cache", help="score cache folder, kept between subsets (default $WINNOW_CACHE or "
                  "~/.cache/winnow; with workers on other machines, a folder or URL they all see)"), PARTIAL,
             Flag("--allow-empty", help="write an empty subset instead of stopping when no row is kept",
                  switch=True)]),
    Command("reshard", "materialise a subset into new WebDataset shards (byte copy)",
            "winnow.workflows.commands:reshard",
            [("pool", "pool folder the subset was selected from"), ("subset", "uids.npy (sorted u8,u8)"),
             ("out", "output folder")],
            [Flag("--shard-size", "reshard.shard_size", "samples per output shard"),
             Flag("--blur-faces", "reshard.blur_faces", "blur the samples' face boxes (as DataComp's download)",
                  switch=True),
             Flag("--faces", "reshard.faces", "folder of `winnow embed --detect faces` whose face boxes are used"),
             PARTIAL], sections=("reshard",)),
    Command("train", "train the fixed CLIP/ViTamin of a scale on resharded shards (open_clip_train)",
            "winnow.workflows.commands:train", [("data", "a `winnow reshard` output folder")],
            [Flag("--name", help="run name", required=True),
             Flag("--scale", "train.scale", "tiny (CPU), small, medium, large or xlarge (DataComp's values)"),
             Flag("--arch", "train.arch", "clip (the scale's CLIP; vit is an alias) or vitamin"),
             Flag("--logs", "train.logs", "parent folder of runs"), Flag("--seed", "train.seed"),
             Flag("--pretrained", "train.pretrained", "start from an open_clip tag or checkpoint"),
             Flag("--patch-mixing", "train.patch_mixing", "Patch Mixing augmentation: share of images mixed"),
             Flag("--nproc-per-node", "train.nproc_per_node", "training processes on this machine (one per GPU; "
                  "gloo processes on CPU), through torchrun"),
             Flag("--nnodes", "train.nnodes", "machines training together (0: SLURM's node count in a job)"),
             Flag("--node-rank", "train.node_rank", "this machine's rank (-1: SLURM's node id, else 0)"),
             Flag("--master", "train.master", "HOST:PORT of the rank-0 machine (default: MASTER_ADDR/MASTER_PORT or "
                  "SLURM's first host)"),
             Flag("--accum-freq", "train.accum_freq", "gradient accumulation steps (the scale's batch = per-device "
                  "batch x processes x accum-freq)"),
             Flag("--resume", help="continue the interrupted run NAME from its latest checkpoint, with the settings "
                  "it was started with", switch=True),
             Flag("--tasks", help="task list to evaluate the final checkpoint on (as evaluate's --tasks)"),
             Flag("--var", help="fill ${NAME} in the task list (NAME=VALUE, repeatable)", many=True, pairs=True,
                  api="variables")], sections=("train",)),
    Command("dfn", "data filtering networks: `winnow dfn train HQ_POOL --out DIR`", "winnow.workflows.commands:dfn",
            [("action", "train"), ("hq_pool", "a pool of trusted image-text pairs")],
            [Flag("--out", help="folder for the resharded set and the training run", required=True),
             Flag("--name", help="run name", default="dfn"),
             Flag("--scale", "dfn.scale"), Flag("--arch", "dfn.arch"),
             Flag("--pretrained", "dfn.pretrained", "fine-tune from an open_clip tag or checkpoint (as DFN does)")],
            sections=("dfn",)),
    Command("evaluate", "evaluate an open_clip model on a task list", "winnow.workflows.commands:evaluate",
            [("checkpoint", "checkpoint path, or an open_clip pretrained tag with --model")],
            [Flag("--model", "evaluate.model", "open_clip architecture"),
             Flag("--tasks", help="task list: a shipped name (manifests/tasks/NAME.yaml, e.g. demo) or a YAML "
                  "path, Winnow's format or DataComp's tasklist.yml (with --var data_dir=FOLDER of its "
                  "wds_<task>_test eval sets)", required=True),
             Flag("--var", help="fill ${NAME} in the task list (NAME=VALUE, repeatable)", many=True, pairs=True,
                  api="variables"),
             Flag("--out", help="folder for eval_results.jsonl and summary.json", required=True),
             Flag("--device", "evaluate.device")], sections=("evaluate",)),
    Command("report", "one self-contained HTML report of demo, training or evaluation folders",
            "winnow.workflows.commands:report", [("runs...", "demo folders, training run folders, evaluation folders")],
            [Flag("--out", help="the HTML file to write", default="report.html")], stage=False),
    Command("compare", "the training table of runs: means, 95%% intervals, seed spread, tests vs the first",
            "winnow.workflows.commands:compare", [("runs...", "training run or evaluation folders (<subset>-seed<k> "
                                                       "are seeds of one subset), or demo folders")], stage=False),
    Command("explain", "one sample's history: input row, state, attempts, scores, the rule that dropped it, "
            "duplicates, shards", "winnow.workflows.commands:explain",
            [("pool", "pool folder or DataComp metadata folder"), ("uids*", "uids (32 hex digits)")],
            [Flag("--subset", help="a subset folder: is it in, and which rule dropped it (repeatable)", many=True),
             Flag("--url", help="explain the rows with this url"),
             Flag("--shards", help="a reshard output folder: which shard holds it (repeatable)", many=True),
             Flag("--cache", help="score cache folder (default: the subsets', $WINNOW_CACHE or ~/.cache/winnow)"),
             Flag("--json", help="print JSON", switch=True)], stage=False),
    Command("diff", "two subsets of a pool side by side: overlap, the rules that separate them, who each keeps "
            "by group", "winnow.workflows.commands:diff",
            [("a", "subset folder A (winnow subset)"), ("b", "subset folder B")],
            [Flag("--by", help="a column of the pool's tables to break the counts down by (repeatable)", many=True),
             Flag("--out", help="also write the comparison as an HTML page here"),
             Flag("--cache", help="score cache folder (default: the subsets')")], stage=False),
    Command("datasheet", "a data card (Markdown and HTML) of a subset or pool: sources, opt-outs, states, drops",
            "winnow.workflows.commands:datasheet", [("path", "a subset folder (winnow subset) or a pool folder")],
            [Flag("--out", help="folder for datasheet.md and datasheet.html (default: PATH)")], stage=False),
]
BY_NAME = {c.name: c for c in COMMANDS}


def _flag_help(flag: Flag) -> str:
    if not flag.key:
        return flag.help + (f" (default {flag.default})" if flag.default else "")
    from winnow.pipeline.core.config import default_of
    from winnow.workflows.settings import RunConfig

    key = flag.key.replace("{kind}", "dist")
    text = f"sets {flag.key}" if not flag.help else f"{flag.help}; sets {flag.key}"
    return f"{text} (default {default_of(RunConfig, key)!r})"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the flags of that one command alone (the others get their name and
    help): their help shows config defaults, which cost importing every stage's config, so the top-level help and
    other commands do not pay for it."""
    parser = argparse.ArgumentParser(prog="winnow", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if only is not None and command.name != only:
            continue
        for name, text in command.args:  # "name...": one or more; "name*": any number
            p.add_argument(name.rstrip(".*"), help=text,
                           nargs="+" if name.endswith("...") else "*" if name.endswith("*") else None)
        for flag in command.flags:
            kw = {"action": "store_true"} if flag.switch else {"action": "append" if flag.many else "store"}
            p.add_argument(flag.name, help=_flag_help(flag), required=flag.required,
                           default=[] if flag.many and not flag.key else flag.default, **kw)
        p.add_argument("--config", help="YAML run config (sections: see workflows/settings.py RunConfig)")
        p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                       help="override one config value, e.g. --set ingest.timeout=5 (repeatable)")
        if command.stage:
            p.add_argument("--overwrite", action="store_true",
                           help="replace an output folder holding a different run of the same command")
            p.add_argument("--scheduler", help="address of a running Dask scheduler (default: a local cluster)")
            p.add_argument("--workers", help="worker processes of the local cluster (default: CPU cores)")
    return parser


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser (unknown flags are reported by :func:`main`, with "did you mean")."""


def options(parser: argparse.ArgumentParser, command: str | None = None) -> list[str]:
    """Every flag ``winnow COMMAND`` accepts (``winnow`` itself when ``command`` is None), read from the parser."""
    if command:
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subs.choices[command]
    return [o for a in parser._actions for o in a.option_strings]


def _unknown(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> str:
    """One line for arguments the command does not take, with the nearest flag when one is close."""
    word = next((w for w in extra if w.startswith("-")), extra[0])
    where = f"winnow {command}" if command else "winnow"
    close = difflib.get_close_matches(word.split("=")[0], options(parser, command), n=1) if word[:1] == "-" else []
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{where} takes no {'flag' if word[:1] == '-' else 'argument'} {word}{hint} (`{where} --help` lists them)"


def config_keys() -> dict[str, bool]:
    """Every dotted key of the run config, True for a section (a dataclass, nested ones included)."""

    from winnow.workflows.settings import RunConfig

    def walk(cls, prefix: str):
        for name, tp in typing.get_type_hints(cls).items():
            yield prefix + name, dataclasses.is_dataclass(tp)
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{name}.")

    return dict(walk(RunConfig, ""))


def check_overrides(pairs: list[str]) -> None:
    """A ``--set`` key that names no config key is one line with the nearest key (did you mean)."""
    keys = None
    for pair in pairs:
        key = pair.split("=", 1)[0].strip()
        keys = keys or config_keys()
        if key in keys or any(key.startswith(k + ".") for k, section in keys.items() if not section):
            continue  # a key, or a key inside a mapping value (the config checks those)
        parent, _, leaf = key.rpartition(".")
        if keys.get(parent):  # a section: the nearest of its keys
            own = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
            close = difflib.get_close_matches(leaf, own, n=1)
            hint = f"did you mean {parent}.{close[0]}?" if close else f"its keys: {', '.join(own)}"
            raise UserError(f"--set {key}: unknown key {leaf!r} in {parent}; {hint}")
        close = difflib.get_close_matches(key, keys, n=1) or sorted(k for k in keys if k.endswith("." + leaf))[:1]
        sections = sorted(k for k in keys if "." not in k)
        hint = f"did you mean {close[0]}?" if close else f"keys are section.key, sections: {', '.join(sections)}"
        raise UserError(f"--set {key}: no such config key; {hint}")


def flag_values(command: Command, args: argparse.Namespace) -> dict:
    """The config keys a command's flags set, as a nested dict (flags that were not given set nothing)."""
    import yaml

    out: dict = {}
    kind = getattr(args, "kind", "")
    for flag in command.flags:
        value = getattr(args, flag.name.lstrip("-").replace("-", "_"))
        if not flag.key or value is None or value == [] or (flag.switch and not value):
            continue
        key = flag.key.replace("{kind}", kind)
        if flag.many:
            value = [yaml.safe_load(v) for part in value for v in str(part).split(",") if v.strip()]
        elif not flag.switch:
            value = yaml.safe_load(value) if value.strip() else ""
            value = value if value is not None else ""
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    if getattr(args, "scheduler", None):
        out.setdefault("cluster", {})["scheduler"] = args.scheduler
    if getattr(args, "workers", None):
        if not args.workers.strip().isdigit() or int(args.workers) < 1:
            raise UserError(f"--workers {args.workers!r}: give a whole number of worker processes, e.g. --workers 2")
        out.setdefault("cluster", {})["n_workers"] = int(args.workers)
    return out


def load_config(command: Command, args: argparse.Namespace):
    from winnow.workflows.settings import demo_config_path, load

    path = args.config or (str(demo_config_path()) if command.name == "demo" else None)
    check_overrides(args.overrides)
    return load(path, args.overrides, flag_values(command, args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=argv[0] if argv and argv[0] in BY_NAME else "")
    if argv and not argv[0].startswith("-") and argv[0] not in BY_NAME:
        close = difflib.get_close_matches(argv[0], list(BY_NAME), n=1)
        hint = f"; did you mean `winnow {close[0]}`?" if close else f"; commands: {', '.join(BY_NAME)}"
        print(f"winnow: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"winnow: error: {_unknown(parser, args.command, extra)}", file=sys.stderr)
        return 2
    if args.version:

        print(f"winnow {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    return run(BY_NAME[args.command], args)


NAMES = {"kind", "action", "name", "port"}  # arguments that are never paths
MAYBE_PATHS = {"recipe", "checkpoint", "tasks"}  # a name or a path: changed only when the path exists here


def absolute_paths(command: Command, args: argparse.Namespace, cfg) -> None:
    """Every local path of the command made absolute, in ``args`` and in ``cfg``, before any task is built."""
    from winnow.pipeline.core.fsio import absolute

    names = [n for n in [a for a, _ in command.args] + [f.name.lstrip("-").replace("-", "_") for f in command.flags
                                                        if not f.key] if n not in NAMES]
    for name in names:
        value = getattr(args, name, None)
        if name == "var" or name == "embeddings":  # NAME=VALUE pairs: the value when it is a path here
            setattr(args, name, [f"{k}={absolute(v, only_existing=name == 'var')}" if sep else item
                                 for item in value for k, sep, v in [item.partition("=")]])
        elif isinstance(value, str) and value:
            setattr(args, name, absolute(value, only_existing=name in MAYBE_PATHS))

    for section in dataclasses.fields(cfg):  # config fields declared as paths (winnow.pipeline.core.config.path)
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
            kind = f.metadata.get("path")
            if kind:
                value = getattr(obj, f.name)
                existing = kind == "existing"
                setattr(obj, f.name, [absolute(v, only_existing=existing and not isinstance(value, list))
                                      for v in value] if isinstance(value, list) else
                        absolute(value, only_existing=existing))


def run(command: Command, args: argparse.Namespace) -> int:

    try:
        module, function = command.run.split(":")
        cfg = load_config(command, args)
        absolute_paths(command, args, cfg)
        getattr(importlib.import_module(module), function)(args, cfg)
    except UserError as exc:
        print(f"winnow: error: {exc}", file=sys.stderr)
        return 2
    except TaskFailed as exc:
        print(f"winnow: error: {exc}; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 1
    except RunFailed as exc:
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
    finally:
        from winnow.pipeline.data.manifest import release_all

        release_all()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
