"""The main job on the embedded default.

synth -> serve -> ingest -> ledger vs truth -> reshard the unfiltered pool and train a tiny CLIP on it (the demo's
stand-in for OpenAI's CLIP) -> embed the pool and the clean set with it -> score and select every demo recipe
-> how well each filter and recipe drops each planted defect -> report.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict

import pandas as pd

from pipeline import fsio
from pipeline.embed import EmbedConfig, embed
from pipeline.ingest import ingest
from pipeline.ledger import format_counts
from pipeline.pool import ledger
from pipeline.reshard import reshard
from pipeline.runner import Runner
from pipeline.select import load_recipe, subset
from pipeline.synth.server import WebPoolServer
from pipeline.synth.truth import ingest_check, selection_check
from pipeline.synth.world import build_world
from pipeline.train import TrainConfig, train

from .settings import RunConfig

#: single filters measured alone (one rule each), beside the recipes
SINGLE_FILTERS = {
    "english": {"filters": [{"key": "english"}], "select": [{"threshold": {"column": "english_score", "min": 1}}]},
    "caption_words>2": {"filters": [{"key": "caption_words"}],
                        "select": [{"threshold": {"column": "caption_words_score", "min": 3}}]},
    "caption_chars>5": {"filters": [{"key": "caption_chars"}],
                        "select": [{"threshold": {"column": "caption_chars_score", "min": 6}}]},
    "min_side>=200": {"filters": [{"key": "min_side"}],
                      "select": [{"threshold": {"column": "min_side_score", "min": 200}}]},
    "aspect_ratio<=3": {"filters": [{"key": "aspect_ratio"}],
                        "select": [{"threshold": {"column": "aspect_ratio_score", "max": 3}}]},
}


class Timings(dict):
    @contextmanager
    def stage(self, name: str):
        start = time.monotonic()
        yield
        self[name] = round(time.monotonic() - start, 1)


def run(out: str, cfg: RunConfig, overwrite: bool = False, log=print) -> dict:
    world, pool, report = (os.path.join(out, d) for d in ("world", "pool", "report"))
    subsets_dir, shards_dir = os.path.join(out, "subsets"), os.path.join(out, "shards")
    demo = cfg.demo
    timings = Timings()
    with Runner(cfg.cluster) as runner:
        with timings.stage("synth"):
            build_world(cfg.synth, world, runner, overwrite=overwrite, log=log)
        with WebPoolServer.for_url(world, cfg.synth.base_url) as server:
            log(f"serve: {world}/site at {server.url}")
            with timings.stage("ingest"):
                ingest(os.path.join(world, "urls.parquet"), pool, cfg.ingest, runner, overwrite=overwrite, log=log)

        with timings.stage("scorer CLIP (reshard + train)"):
            no_filter = os.path.join(subsets_dir, "no_filter")
            subset("no_filter", pool, no_filter, runner, log=log)
            reshard(pool, os.path.join(no_filter, "uids.npy"), os.path.join(shards_dir, "no_filter"), runner,
                    shard_size=demo.shard_size, overwrite=overwrite, log=log)
            checkpoint = _scorer(os.path.join(shards_dir, "no_filter"), os.path.join(out, "train"), demo.scorer, log)
        with timings.stage("embed"):
            ecfg = EmbedConfig(model=demo.scorer.model, pretrained=checkpoint, tag="demo", batch_size=128)
            embed(pool, ecfg, runner, overwrite=overwrite, log=log)
            embed(os.path.join(world, "clean"), ecfg, runner, overwrite=overwrite, log=log)
        with timings.stage("subsets"):
            made = {}
            variables = {"world": world}
            for name in demo.recipes:
                doc = subset(name, pool, os.path.join(subsets_dir, name), runner, variables=variables, log=log)
                made[name] = doc
            for name, inline in SINGLE_FILTERS.items():
                recipe = load_recipe({"name": name, **inline})
                made[name] = subset(recipe, pool, os.path.join(subsets_dir, "filters", name), runner, log=lambda m: None)

    counts, total = ledger(pool)
    check = ingest_check(pool, world, cfg.ingest.min_image_size)
    arrays = {name: _load_uids(subsets_dir, name) for name in made}
    recall, precision = selection_check(pool, world, arrays)
    summary = {"timings_s": dict(timings), "ledger": counts, "input_rows": total,
               "ingest_check": check.to_dict("records"), "selection_recall": recall.to_dict("records"),
               "selection_precision": precision.to_dict("records"),
               "config": asdict(cfg)}
    _write_report(report, summary, counts, total, check, recall, precision)
    log("\nLedger of " + pool + ":\n" + format_counts(counts, total))
    log("\nPlanted defects vs ledger state:")
    log(check.to_string(index=False))
    matched, rows = int(check["matched"].sum()), int(check["rows"].sum())
    log(f"{matched}/{rows} pool rows ended in the state their planted defect implies")
    log("\nFilters and recipes vs planted defects (downloaded samples; precision = dropped samples that are "
        "defective; other columns = share of that defect dropped):")
    log(_fmt(recall))
    log(f"\ntimings (s): {json.dumps(dict(timings))}")
    log(f"outputs: world {world} | pool {pool} | subsets {subsets_dir} | report {report}/report.md")
    return summary


def _scorer(data_dir: str, logs: str, tcfg: TrainConfig, log) -> str:
    checkpoint = os.path.join(logs, "scorer", "checkpoints", f"epoch_{tcfg.epochs}.pt")
    if os.path.isfile(checkpoint):
        log(f"train: {checkpoint} exists; reusing it")
        return checkpoint
    return train(data_dir, logs, "scorer", tcfg, log=log)


def _load_uids(subsets_dir: str, name: str):
    import numpy as np

    path = os.path.join(subsets_dir, name, "uids.npy")
    if not os.path.exists(path):
        path = os.path.join(subsets_dir, "filters", name, "uids.npy")
    return np.load(path, allow_pickle=False)


def _fmt(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in shown.columns[3:]:
        shown[col] = shown[col].map(lambda v: f"{v:.2f}")
    shown["precision"] = table["precision"].map(lambda v: f"{v:.2f}")
    return shown.to_string(index=False)


def _write_report(report: str, summary: dict, counts: dict, total: int | None, check: pd.DataFrame,
                  recall: pd.DataFrame, precision: pd.DataFrame) -> None:
    fsio.write_json(os.path.join(report, "summary.json"), summary)
    recall.to_csv(os.path.join(report, "selection_recall.csv"), index=False, float_format="%.4f")
    precision.to_csv(os.path.join(report, "selection_precision.csv"), index=False, float_format="%.4f")
    lines = [
        "# Winnow demo report", "",
        "## Timings (seconds)", "", "| stage | s |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary["timings_s"].items()], "",
        "## Ledger", "", "```", format_counts(counts, total), "```", "",
        "## Planted defects vs ledger state", "", "```", check.to_string(index=False), "```", "",
        "## Filters and recipes vs planted defects", "",
        "Over downloaded samples. `precision`: share of dropped samples that carry a planted defect; each defect "
        "column: share of the samples with that defect that the subset drops (recall).", "",
        "```", _fmt(recall), "```", "",
        "Per defect, share of the dropped samples that have it (precision by kind): "
        "`selection_precision.csv`.", "",
    ]
    fsio.write_bytes(os.path.join(report, "report.md"), "\n".join(lines).encode())
