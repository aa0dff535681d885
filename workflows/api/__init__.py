"""Winnow from Python: ``import winnow``, every command as a function (for notebooks and scripts).

Each function is the command of the same name (``winnow ingest`` is :func:`ingest`, ``winnow copy-descriptor``
:func:`copy_descriptor`), made from the same table as the command line (:data:`winnow.workflows.cli.COMMANDS`): its
positionals, its plain options (``out``, ``name``, ``variables`` for ``--var NAME=VALUE`` ...) and every key of the
config sections it reads, as typed keywords with the config dataclasses' defaults (``help(winnow.ingest)`` lists
them; ``ingest(urls, pool, timeout=5)`` is ``--timeout 5``, i.e. ``--set ingest.timeout=5``; an unknown keyword
is an error naming the nearest). ``config`` (a YAML file) and ``overrides`` (``["section.key=value"]``) work as
``--config`` and ``--set``. Stages run on a Dask cluster the call starts and stops; ``with
winnow.cluster(n_workers=2):``
keeps one running for every call inside it (``scheduler="tcp://host:8786"`` joins an existing one,
``scheduler="sync"`` runs in this process).

    import winnow

    winnow.synth("runs/w", n_pool=400)
    with winnow.cluster(n_workers=2), winnow.serve("runs/w"):
        winnow.ingest("runs/w/urls.parquet", "runs/pool", allow_hosts=["127.0.0.1"])
        kept = winnow.subset("basic", pool="runs/pool", out="runs/subsets/basic")
    print(winnow.ledger("runs/pool"), len(kept))

Functions return plain data: paths, dicts, numpy arrays (``subset`` returns the kept uids as sorted ``u8,u8``,
:func:`uids_hex` turns them into strings) and pandas frames (:func:`scores`). A recipe given to :func:`subset` may
be a dict whose ``filters`` hold Filter objects defined in Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import typing
from contextlib import contextmanager, nullcontext

from winnow.pipeline import __version__  # noqa: F401 - winnow.__version__

_COMMANDS = ("demo", "synth", "serve", "ingest", "register", "ledger", "embed", "dedup", "copy_descriptor", "evalset",
             "subset", "reshard", "train", "dfn", "evaluate", "report", "compare", "datasheet", "explain", "diff")
__all__ = [*_COMMANDS, "cluster", "scores", "uids_hex"]
_MADE: dict = {}


def __getattr__(name: str):
    """The command functions are made on first use (their signatures read every config class)."""
    if name in _COMMANDS and name != "serve":
        if name not in _MADE:
            _MADE[name] = _function(name)
        return _MADE[name]
    raise AttributeError(f"module 'winnow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def parameters(name: str) -> list[inspect.Parameter]:
    """The keywords of command ``name``'s function, in order: positionals, plain options, the config sections'
    fields, then ``overwrite``/``scheduler``/``workers`` (commands that write and run on a cluster), ``config`` and
    ``overrides``."""

    from winnow.workflows.cli import BY_NAME
    from winnow.workflows.settings import RunConfig

    command = BY_NAME[name.replace("_", "-")]
    P, out, seen = inspect.Parameter, [], set()

    def add(keyword: str, default, annotation, kind=P.KEYWORD_ONLY):
        if keyword in seen:
            raise TypeError(f"winnow.{name}: keyword {keyword!r} twice")  # a table error, caught by the tests
        seen.add(keyword)
        out.append(P(keyword, kind, default=default, annotation=annotation))

    for arg, _ in command.args:  # "name...": one or more; "name*": any number (default none)
        if arg.endswith("*"):
            add(arg.rstrip("*"), None, "list[str] | None", P.POSITIONAL_OR_KEYWORD)
            continue
        add(arg.rstrip("."), P.empty, "list[str]" if arg.endswith("...") else "str", P.POSITIONAL_OR_KEYWORD)
    for flag in command.flags:
        if flag.key:
            continue
        if flag.switch:
            add(flag.keyword, False, "bool")
        elif flag.pairs:
            add(flag.keyword, None, "dict[str, str] | None")
        elif flag.many:
            add(flag.keyword, (), "list[str]")
        else:
            add(flag.keyword, P.empty if flag.required else flag.default, "str" if flag.required else "str | None",
                P.POSITIONAL_OR_KEYWORD if flag.required else P.KEYWORD_ONLY)
    hints = typing.get_type_hints(RunConfig)
    sections = [s for s in command.sections if s != "{kind}"]
    kinds = ["dist", "patchmix"] if "{kind}" in command.sections else []
    for section in [*sections, *kinds]:
        cls = hints[section]
        for f in dataclasses.fields(cls):
            if not f.init or f.name in seen:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            add(f.name, None if kinds else default, typing.get_type_hints(cls)[f.name])
    if command.stage:
        add("overwrite", False, "bool")
        add("scheduler", "", "str")
        add("workers", 0, "int")
    add("config", "", "str")
    add("overrides", (), "list[str]")
    # required keywords before optional ones (a signature's rule), each group in table order
    return [p for p in out if p.default is P.empty] + [p for p in out if p.default is not P.empty]


def _function(name: str):

    from winnow.pipeline.core.errors import UserError, did_you_mean
    from winnow.workflows.cli import BY_NAME, absolute_paths
    from winnow.workflows.settings import demo_config_path, load

    command = BY_NAME[name.replace("_", "-")]
    params = parameters(name)
    signature = inspect.Signature(params)
    plain = {f.keyword: f for f in command.flags if not f.key}
    positional = [a.rstrip(".*") for a, _ in command.args]
    extras = {"overwrite", "scheduler", "workers", "config", "overrides"}
    fields = [p.name for p in params if p.name not in plain and p.name not in positional and p.name not in extras]

    def call(*args, **kwargs):
        allowed = [p.name for p in params]
        for key in kwargs:
            if key not in allowed:
                raise UserError(f"{name}: unknown key {key!r}; {did_you_mean(key, allowed)}allowed keys: "
                                f"{', '.join(allowed)}")
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        ns = argparse.Namespace(**{a: values[a] for a in positional})
        for keyword, flag in plain.items():
            value = values[keyword]
            if flag.pairs:
                value = [f"{k}={v}" for k, v in (value or {}).items()]
            elif flag.many:
                value = list(value)
            setattr(ns, flag.name.lstrip("-").replace("-", "_"), value)
        ns.overwrite, ns.scheduler = values.get("overwrite", False), values.get("scheduler", "")
        ns.workers = str(values["workers"]) if values.get("workers") else None
        section = getattr(ns, "kind", None) if "{kind}" in command.sections else None
        flags: dict = {}
        for f in fields:
            if f in kwargs and (section is None or kwargs[f] is not None):
                target = section or next(s for s in command.sections if f in _fields(s))
                flags.setdefault(target, {})[f] = kwargs[f]
        if ns.scheduler:
            flags.setdefault("cluster", {})["scheduler"] = ns.scheduler
        if ns.workers:
            flags.setdefault("cluster", {})["n_workers"] = int(ns.workers)
        path = values["config"] or (str(demo_config_path()) if name == "demo" else None)
        cfg = load(path, list(values["overrides"]), flags)
        absolute_paths(command, ns, cfg)
        module, function = command.run.split(":")
        return getattr(importlib.import_module(module), function)(ns, cfg)

    call.__name__ = call.__qualname__ = name
    call.__signature__ = signature
    call.__doc__ = (f"{command.help} (as `winnow {command.name}`).\n\n" + "\n".join(
        f"    {p.name}: " + _describe(command, p.name) for p in params))
    return call


def _fields(section: str) -> set[str]:

    from winnow.workflows.settings import RunConfig

    return {f.name for f in dataclasses.fields(typing.get_type_hints(RunConfig)[section])}


def _describe(command, keyword: str) -> str:
    for flag in command.flags:
        if flag.keyword == keyword or (flag.key and flag.key.rsplit(".", 1)[1] == keyword):
            return flag.help or f"sets {flag.key}"
    for arg, text in command.args:
        if arg.rstrip(".") == keyword:
            return text
    return {"overwrite": "replace an output folder holding a different run of the same command",
            "scheduler": "address of a running Dask scheduler (default: a local cluster)",
            "workers": "worker processes of the local cluster (0: one per core)",
            "config": "a YAML run config (as --config)",
            "overrides": "section.key=value settings (as --set)"}.get(keyword, "a config key of its section")


@contextmanager
def cluster(**settings):
    """One Dask cluster for every call inside the block.

    Keywords: :class:`winnow.pipeline.run.runner.ClusterConfig`."""
    from winnow.pipeline.core.config import from_dict
    from winnow.pipeline.run.runner import ClusterConfig, Runner

    with Runner(from_dict(ClusterConfig, settings, "cluster")) as runner, runner.activate():
        yield runner


def serve(world: str, port: int | None = None):
    """Serve a synthetic world on 127.0.0.1 for the ``with`` block (its URLs point at the world's port); the
    command ``winnow serve`` serves in the foreground instead."""

    from winnow.pipeline.core.errors import UserError
    from winnow.pipeline.core.fsio import read_json
    from winnow.pipeline.synth.server import WebPoolServer

    manifest = os.path.join(world, "_manifest.json")
    if not os.path.isfile(manifest):
        raise UserError(f"{world} is not a synthetic world (no _manifest.json); make one with winnow.synth()")
    base_url = read_json(manifest)["params"]["base_url"]
    return WebPoolServer.for_url(world, base_url if port is None else f"http://127.0.0.1:{port}",
                                 hint=", or serve it on another: `winnow.serve(world, port=PORT)`")


def scores(pool: str, recipe: str | dict, variables: dict[str, str] | None = None, cache: str = ""):
    """Every row of the pool with the score columns of a recipe's filters (cached like ``subset``'s): a frame of
    ``uid`` (hex), ``ok`` and one column per filter, for looking at distributions. Holds the whole pool in memory:
    meant for pools up to a few million rows."""
    import numpy as np
    import pandas as pd

    from winnow.pipeline.data.uid import array_to_uids
    from winnow.pipeline.run.runner import ClusterConfig, Runner
    from winnow.pipeline.select.score import score
    from winnow.pipeline.stages.subset import load_recipe

    spec = load_recipe(recipe, {"pool": str(pool), **(variables or {})})

    with nullcontext(Runner.active()) if Runner.active() else Runner(ClusterConfig()) as runner:
        found = score(pool, spec.all_filters(), runner, cache=cache, log=lambda m: None)
    frames = []
    for part in found.parts:
        sorted_uid, order = found.sorted_uids(part)
        uid = np.empty_like(sorted_uid)
        uid[order] = sorted_uid
        frame = {"uid": array_to_uids(uid), "ok": found.ok(part)}
        frames.append(pd.DataFrame({**frame, **{c: found.column(c, part) for c in found.folders}}))
    return pd.concat(frames, ignore_index=True)


def uids_hex(uids) -> list[str]:
    """Sorted ``u8,u8`` uids as DataComp's 32-character hex strings."""
    from winnow.pipeline.data.uid import array_to_uids

    return array_to_uids(uids)
