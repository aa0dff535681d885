"""What each ``winnow`` subcommand does with its arguments and the run config: call its stage, print the result,
and return it (the Python API, :mod:`winnow`, returns what these return).

One function per subcommand (the table in :mod:`winnow.workflows.cli` names it); the work itself is in the stage module
that ``pipeline/README.md`` maps the command to.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace

from winnow.pipeline.core.errors import RunFailed, UserError


def _runner(cfg):
    """The cluster of an enclosing ``with winnow.cluster():``, else a new one for this command."""

    from winnow.pipeline.run.runner import Runner

    active = Runner.active()
    return nullcontext(active) if active is not None else Runner(cfg.cluster)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise UserError(f"{flag} {value!r}: expected NAME=VALUE")
        k, v = value.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def synth(args, cfg) -> dict:
    from winnow.pipeline.synth.world import build_world

    with _runner(cfg) as runner:
        doc = build_world(cfg.synth, args.world, runner, overwrite=args.overwrite)
    print(f"synth: wrote {args.world}: {doc['rows']} (urls.parquet is the pool's input; "
          f"serve it with `winnow serve {args.world}`)")
    return doc


def serve(args, cfg) -> None:
    from winnow.pipeline.synth.server import serve_world

    serve_world(args.world, int(args.port) if args.port else None)


def ingest(args, cfg) -> dict[str, int]:
    from winnow.pipeline.data.ledger import format_counts
    from winnow.pipeline.data.pool import ledger, refused_host
    from winnow.pipeline.stages.ingest import ingest as run_ingest

    with _runner(cfg) as runner:
        if args.retry:
            from winnow.pipeline.stages.retry import retry

            retry(args.pool, args.retry, runner)
        else:
            run_ingest(args.urls, args.pool, cfg.ingest, runner, overwrite=args.overwrite)
    counts, total = ledger(args.pool)
    print(format_counts(counts, total))
    if total and not counts.get("ok"):
        top = ", ".join(f"{s} {n:,}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        host = refused_host(args.pool) if max(counts, key=counts.get) == "refused_url" else None
        if host:
            raise RunFailed(f"no row of {total:,} was downloaded ({top}): the URL policy refused {host}, which is "
                            f"not a public address; if it is yours, allow it with --allow-hosts {host} and rerun "
                            "with --overwrite")
        raise RunFailed(f"no row of {total:,} was downloaded ({top}); is the server reachable? "
                        f"`winnow ledger {args.pool}` and the parquet's error_message say why each failed")
    return dict(counts)


def register(args, cfg) -> dict:
    from winnow.pipeline.stages.register import register as run_register

    with _runner(cfg) as runner:
        doc = run_register(args.pool, runner)
    print(f"register: {args.pool} is a valid pool: {doc['shards']} shards, {doc['rows']['input']:,} rows, "
          f"{doc['rows']['ok']:,} ok; manifest written")
    return doc


def ledger(args, cfg) -> dict[str, int]:
    from winnow.pipeline.data.pool import ledger as counts
    from winnow.pipeline.stages.ledger import report

    print(report(args.pool, args.truth))
    return dict(counts(args.pool)[0])


def embed(args, cfg) -> dict:
    from winnow.pipeline.stages.embed import embed as run_embed

    with _runner(cfg) as runner:
        doc = run_embed(args.pool, cfg.embed, runner, out=args.out, overwrite=args.overwrite,
                        allow_partial=args.allow_partial)
    print(f"embed: {doc['rows']}")
    return doc


def dedup(args, cfg) -> dict:
    from winnow.pipeline.stages.dedup import dedup as run_dedup

    with _runner(cfg) as runner:
        doc = run_dedup(args.pool, cfg.dedup, runner, out=args.out, overwrite=args.overwrite,
                        allow_partial=args.allow_partial)
    print(f"dedup: {doc['dropped']}")
    return doc


def copy_descriptor(args, cfg) -> str:
    from winnow.pipeline.models.copydetect import MODEL_NAME
    from winnow.pipeline.stages.copy_descriptor import train_descriptor

    path = train_descriptor(args.pool, args.out, cfg.copy_descriptor, overwrite=args.overwrite)
    print(f"copy-descriptor: {path}\nnext: winnow embed {args.pool} --model {MODEL_NAME} --pretrained {path} "
          "--tag copy; winnow dedup POOL --tag copy")
    return path


def evalset(args, cfg):
    if args.kind == "patchmix":
        from winnow.pipeline.evalsets.patchmix import build_patchmix

        result = build_patchmix(args.source, args.out, cfg.patchmix, overwrite=args.overwrite)
        what = f"{len(result)} conditions"
    elif args.kind == "dist":
        from winnow.pipeline.evalsets.dist import build_dist

        result = build_dist(args.source, args.out, cfg.dist, overwrite=args.overwrite)
        what = f"{result['kept']} triplets"
    else:
        raise UserError(f"evalset {args.kind!r}: choose patchmix or dist")
    print(f"evalset: {what} -> {args.out}; evaluate with --tasks {os.path.join(args.out, 'tasks.yaml')}")
    return result


def subset(args, cfg):
    from winnow.pipeline.core.fsio import join, load_npy
    from winnow.pipeline.run.runner import Runner
    from winnow.pipeline.stages.subset import check_variables
    from winnow.pipeline.stages.subset import subset as run_subset

    check_variables(args.recipe, _pairs(args.var, "--var"))
    with _runner(cfg) as runner:
        run_subset(args.recipe, args.pool, args.out, runner, variables=_pairs(args.var, "--var"),
                   embeddings=_pairs(args.embeddings, "--embeddings") or None, allow_partial=args.allow_partial,
                   overwrite=args.overwrite, cache=args.cache or "", release=Runner.active() is None,
                   allow_empty=args.allow_empty)
    return load_npy(join(args.out, "uids.npy"), "the subset's uids.npy")


def reshard(args, cfg) -> dict:
    from winnow.pipeline.stages.reshard import reshard as run_reshard

    with _runner(cfg) as runner:
        doc = run_reshard(args.pool, args.subset, args.out, runner, shard_size=cfg.reshard.shard_size,
                          overwrite=args.overwrite, allow_partial=args.allow_partial,
                          blur_faces=cfg.reshard.blur_faces, faces=cfg.reshard.faces)
    blurred = doc["rows"].get("blurred_samples")
    faces = f", {blurred:,} with faces blurred ({doc['rows']['blurred_faces']:,} faces)" if blurred is not None else ""
    print(f"reshard: {doc['rows']['samples']:,} samples in {doc['shards']} shards{faces} -> {args.out}")
    return doc


def train(args, cfg) -> str:
    from winnow.pipeline.stages.train import recorded_config
    from winnow.pipeline.stages.train import train as run_train

    tcfg = recorded_config(cfg.train.logs, args.name, args.data) if args.resume else cfg.train.config()
    if args.tasks:  # read before training: a wrong task list fails now, not after the run
        from winnow.pipeline.tasks import load_tasklist

        tasks = load_tasklist(args.tasks, _pairs(args.var, "--var"))
    launch = cfg.train.launch()
    if args.resume and launch.world == 1 and tcfg.processes > 1:  # on one machine: the count it started with

        launch = replace(launch, nproc_per_node=tcfg.processes)
    ckpt = run_train(args.data, cfg.train.logs, args.name, tcfg, overwrite=args.overwrite, resume=args.resume,
                     launch=launch)
    print(f"train: {ckpt}")
    if launch.node_rank > 0:
        return ckpt  # the rank-0 machine evaluates
    if args.tasks:
        from winnow.pipeline.core.fsio import join
        from winnow.pipeline.stages.evaluate import evaluate

        out = join(cfg.train.logs, args.name, "eval")
        summary = evaluate(tcfg.model, ckpt, tasks, out, overwrite=args.overwrite)
        average = summary["average"]
        print(f"train: average of main metrics {'n/a (diagnostic tasks only)' if average is None else f'{average:.4f}'}"
              f" ({out}/eval_results.jsonl)")
    return ckpt


def dfn(args, cfg) -> str:
    from winnow.pipeline.stages.dfn import train_dfn

    if args.action != "train":
        raise UserError(f"dfn {args.action!r}: the dfn command has one action, `winnow dfn train HQ_POOL --out DIR`")
    tcfg = cfg.dfn.config()
    with _runner(cfg) as runner:
        ckpt = train_dfn(args.hq_pool, args.out, args.name, tcfg, runner)
    print(f"dfn train: {ckpt}\nnext: winnow embed POOL --model {tcfg.model} --pretrained {ckpt} --tag dfn; "
          "winnow subset dfn_30pct --pool POOL --out ...")
    return ckpt


def evaluate(args, cfg) -> dict:
    from winnow.pipeline.run.runner import Runner
    from winnow.pipeline.stages.evaluate import evaluate as run_evaluate
    from winnow.pipeline.tasks import load_tasklist

    tasks = load_tasklist(args.tasks, _pairs(args.var, "--var"))
    if not (args.scheduler or args.workers or Runner.active()):  # one process: the model is loaded once
        return run_evaluate(cfg.evaluate.model, args.checkpoint, tasks, args.out, device=cfg.evaluate.device,
                            overwrite=args.overwrite)
    with _runner(cfg) as runner:  # the tasks spread over the workers (and their GPUs)
        return run_evaluate(cfg.evaluate.model, args.checkpoint, tasks, args.out, device=cfg.evaluate.device,
                            overwrite=args.overwrite, runner=runner)


def report(args, cfg) -> str:
    from winnow.workflows.report import html_report

    return html_report(args.runs, args.out)


def explain(args, cfg) -> list:
    from winnow.pipeline.stages.explain import as_json, explain, format_text

    docs = explain(args.pool, args.uids, args.subset, args.url or "", args.shards, args.cache or "")
    print(as_json(docs) if args.json else format_text(docs), end="" if not args.json else "\n")
    return docs


def diff(args, cfg) -> dict:
    from winnow.pipeline.stages.diff import diff as run_diff
    from winnow.pipeline.stages.diff import format_text
    from winnow.workflows.report import diff_html

    doc = run_diff(args.a, args.b, args.by, args.cache or "")
    print(format_text(doc))
    if args.out:
        print(f"diff: {diff_html(doc, args.out)}")
    return doc


def datasheet(args, cfg) -> str:
    from winnow.workflows.datasheet import write

    md, page = write(args.path, args.out)
    print(f"datasheet: {md} and {page}")
    return md


def compare(args, cfg) -> str:
    from winnow.workflows.compare import compare_runs

    text = compare_runs(args.runs)
    print(text)
    return text
