"""Winnow from Python: ``import winnow``, the stages as functions (for notebooks and scripts).

Each function is the command of the same name (``winnow ingest`` is :func:`ingest`) and takes that command's
settings as keywords, checked against the same config dataclasses (``ingest(urls, pool, timeout=5)`` is
``--set ingest.timeout=5``; an unknown keyword is an error naming the allowed ones). Stages run on a Dask cluster
the call starts and stops; ``with winnow.cluster(n_workers=2):`` keeps one running for every call inside it
(``scheduler="tcp://host:8786"`` joins an existing one, ``scheduler="sync"`` runs in this process).

    import winnow

    winnow.synth("runs/w", n_pool=400)
    with winnow.cluster(n_workers=2), winnow.serve("runs/w"):
        winnow.ingest("runs/w/urls.parquet", "runs/pool", allow_hosts=["127.0.0.1"])
        kept = winnow.subset("basic", pool="runs/pool", out="runs/subsets/basic")
    print(winnow.ledger("runs/pool"), len(kept))

Functions return plain data: paths, dicts, numpy arrays (``subset`` returns the kept uids as sorted ``u8,u8``,
:func:`uids_hex` turns them into strings) and pandas frames (:func:`scores`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from pipeline import __version__  # noqa: F401 - winnow.__version__
from pipeline.core.config import from_dict
from pipeline.run.runner import ClusterConfig, Runner

_RUNNER: list[Runner] = []  # the cluster of an enclosing ``with cluster():``


@contextmanager
def cluster(**settings):
    """One Dask cluster for every call inside the block (keywords: :class:`ClusterConfig`)."""
    with Runner(from_dict(ClusterConfig, settings, "cluster")) as runner:
        _RUNNER.append(runner)
        try:
            yield runner
        finally:
            _RUNNER.remove(runner)


@contextmanager
def _runner():
    if _RUNNER:
        yield _RUNNER[-1]
    else:
        with Runner(ClusterConfig()) as runner:
            yield runner


def _config(cls, settings: dict, where: str):
    return from_dict(cls, settings, where)


def synth(world: str, overwrite: bool = False, **settings) -> dict:
    """A synthetic web world with planted defects (keywords: ``SynthConfig``); returns its description."""
    from pipeline.synth.world import SynthConfig, build_world

    with _runner() as runner:
        return build_world(_config(SynthConfig, settings, "synth"), world, runner, overwrite=overwrite)


def serve(world: str, port: int | None = None):
    """Serve a synthetic world on 127.0.0.1 for the ``with`` block (its URLs point at the world's port)."""
    from pipeline.core.errors import UserError
    from pipeline.core.fsio import read_json
    from pipeline.synth.server import WebPoolServer

    manifest = os.path.join(world, "_manifest.json")
    if not os.path.isfile(manifest):
        raise UserError(f"{world} is not a synthetic world (no _manifest.json); make one with winnow.synth()")
    base_url = read_json(manifest)["params"]["base_url"]
    return WebPoolServer.for_url(world, base_url if port is None else f"http://127.0.0.1:{port}",
                                 hint=", or serve it on another: `winnow.serve(world, port=PORT)`")


def ingest(urls: str, pool: str, overwrite: bool = False, **settings) -> dict:
    """Download a URL list into a pool (keywords: ``IngestConfig``); returns the ledger counts."""
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import ingest as run

    with _runner() as runner:
        run(urls, pool, _config(IngestConfig, settings, "ingest"), runner, overwrite=overwrite)
    return ledger(pool)


def ledger(pool: str) -> dict[str, int]:
    """How every input row of a pool ended: rows per state (``ok``, ``http_error``, ``timeout``, ...)."""
    from pipeline.data.pool import ledger as counts

    return dict(counts(pool)[0])


def embed(pool: str, out: str | None = None, overwrite: bool = False, allow_partial: bool = False,
          **settings) -> dict:
    """Image and text embeddings of every ok sample (keywords: ``EmbedConfig``: model, pretrained, tag, ...)."""
    from pipeline.stages.embed import EmbedConfig
    from pipeline.stages.embed import embed as run

    with _runner() as runner:
        return run(pool, _config(EmbedConfig, settings, "embed"), runner, out=out, overwrite=overwrite,
                   allow_partial=allow_partial)


def dedup(pool: str, out: str | None = None, overwrite: bool = False, **settings) -> dict:
    """Exact, near and semantic duplicates and eval-set copies (keywords: ``DedupConfig``)."""
    from pipeline.stages.dedup import DedupConfig
    from pipeline.stages.dedup import dedup as run

    with _runner() as runner:
        return run(pool, _config(DedupConfig, settings, "dedup"), runner, out=out, overwrite=overwrite)


def subset(recipe: str | dict, pool: str, out: str, variables: dict[str, str] | None = None,
           cache: str = "", overwrite: bool = False, **kwargs) -> np.ndarray:
    """Score the pool with a recipe (a shipped name, a YAML path or a dict) and write ``out/uids.npy``; returns
    the kept uids (sorted ``u8,u8``). ``subset.json`` beside it says what each rule kept."""
    from pipeline.stages.subset import check_variables
    from pipeline.stages.subset import subset as run

    if isinstance(recipe, str):
        check_variables(recipe, variables or {})
    with _runner() as runner:
        run(recipe, pool, out, runner, variables=variables, cache=cache, overwrite=overwrite, **kwargs)
    return np.load(os.path.join(out, "uids.npy"), allow_pickle=False)


def scores(pool: str, recipe: str | dict, variables: dict[str, str] | None = None, cache: str = "") -> "pd.DataFrame":
    """Every row of the pool with the score columns of a recipe's filters (cached like ``subset``'s): a frame of
    ``uid`` (hex), ``ok`` and one column per filter, for looking at distributions. Holds the whole pool in memory:
    meant for pools up to a few million rows."""
    import pandas as pd

    from pipeline.data.uid import array_to_uids
    from pipeline.stages.score import score
    from pipeline.stages.subset import load_recipe

    spec = load_recipe(recipe, {"pool": str(pool), **(variables or {})})
    with _runner() as runner:
        found = score(pool, spec.all_filters(), runner, cache=cache, log=lambda m: None)
    frames = []
    for part in found.parts:
        sorted_uid, order = found.sorted_uids(part)
        uid = np.empty_like(sorted_uid)
        uid[order] = sorted_uid
        frame = {"uid": array_to_uids(uid), "ok": found.ok(part)}
        frames.append(pd.DataFrame({**frame, **{c: found.column(c, part) for c in found.folders}}))
    return pd.concat(frames, ignore_index=True)


def uids_hex(uids: np.ndarray) -> list[str]:
    """Sorted ``u8,u8`` uids as DataComp's 32-character hex strings."""
    from pipeline.data.uid import array_to_uids

    return array_to_uids(uids)


def reshard(pool: str, uids: str, out: str, overwrite: bool = False, **settings) -> dict:
    """Copy a subset (a ``uids.npy`` path) into new WebDataset shards (keywords: ``ReshardConfig``)."""
    from pipeline.stages.reshard import ReshardConfig
    from pipeline.stages.reshard import reshard as run

    cfg = _config(ReshardConfig, settings, "reshard")
    with _runner() as runner:
        return run(pool, uids, out, runner, shard_size=cfg.shard_size, overwrite=overwrite)


def train(data: str, name: str, logs: str = "runs/train", overwrite: bool = False, **settings) -> str:
    """Train the fixed model of a scale on resharded shards (keywords: ``TrainSpec``: scale, arch, seed,
    pretrained, patch_mixing); returns the final checkpoint's path."""
    from pipeline.stages.train import TrainSpec
    from pipeline.stages.train import train as run

    spec = _config(TrainSpec, {**settings, "logs": logs}, "train")
    return run(data, spec.logs, name, spec.config(), overwrite=overwrite)


def evaluate(checkpoint: str, tasks: str, out: str, model: str = "",
             variables: dict[str, str] | None = None, device: str = "auto", overwrite: bool = False) -> dict:
    """Evaluate a model on a task list (a shipped name such as ``demo``, or a YAML path); returns the summary
    (every task's main metric and the average)."""
    from pipeline.stages.evaluate import evaluate as run
    from pipeline.tasks import load_tasklist

    return run(model, checkpoint, load_tasklist(tasks, variables or {}), out, device=device, overwrite=overwrite)


def demo(out: str = "runs/demo", overwrite: bool = False, **sections) -> dict:
    """The main job on the embedded synthetic pool (what ``make demo`` runs); keywords override sections of
    ``manifests/demo.yaml`` (``demo={"seeds": [0]}``). Returns the summary the report is made from."""
    from workflows import demo as main
    from workflows.settings import demo_config_path, load

    cfg = load(str(demo_config_path()), flags=sections)
    return main.run(out, cfg, overwrite=overwrite)
