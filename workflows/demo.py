"""The main job on the embedded default: synth -> serve -> ingest -> ledger checked against the truth -> report."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import pandas as pd

from pipeline import fsio
from pipeline.ingest import ingest
from pipeline.ledger import format_counts
from pipeline.pool import ledger, read_states
from pipeline.runner import Runner
from pipeline.synth.server import WebPoolServer
from pipeline.synth.world import build_world, expected_state, read_truth

from .settings import RunConfig


class Timings(dict):
    @contextmanager
    def stage(self, name: str):
        start = time.monotonic()
        yield
        self[name] = round(time.monotonic() - start, 2)


def truth_check(pool: str, world: str, min_image_size: int) -> pd.DataFrame:
    """Per planted defect: how many rows, and how many ended in the state the defect must produce."""
    truth = read_truth(world)
    states = read_states(pool)[["uid", "state"]]
    joined = truth.merge(states, on="uid", how="left")
    joined["expected"] = [expected_state(d, min_image_size) for d in joined["defect"]]
    joined["matched"] = joined["state"] == joined["expected"]
    table = joined.groupby("defect").agg(
        rows=("uid", "size"), expected=("expected", "first"), matched=("matched", "sum"),
        states=("state", lambda s: ", ".join(f"{k} {v}" for k, v in s.value_counts().items())),
    )
    return table.reset_index()


def run(out: str, cfg: RunConfig, overwrite: bool = False, log=print) -> dict:
    world, pool, report = (os.path.join(out, d) for d in ("world", "pool", "report"))
    timings = Timings()
    with Runner(cfg.cluster) as runner:
        with timings.stage("synth"):
            build_world(cfg.synth, world, runner, overwrite=overwrite, log=log)
        with WebPoolServer.for_url(world, cfg.synth.base_url) as server:
            log(f"serve: {world}/site at {server.url}")
            with timings.stage("ingest"):
                doc = ingest(os.path.join(world, "urls.parquet"), pool, cfg.ingest, runner, overwrite=overwrite,
                             log=log)
    counts, total = ledger(pool)
    check = truth_check(pool, world, cfg.ingest.min_image_size)
    summary = {"timings_s": dict(timings), "ledger": counts, "input_rows": total,
               "truth_check": check.to_dict("records"), "manifest": doc}
    _write_report(report, summary, counts, total, check)
    log("\nLedger of " + pool + ":\n" + format_counts(counts, total))
    log("\nPlanted defects vs ledger state (truth from " + os.path.join(world, "truth.parquet") + "):")
    log(check.to_string(index=False))
    matched, rows = int(check["matched"].sum()), int(check["rows"].sum())
    log(f"\n{matched}/{rows} pool rows ended in the state their planted defect implies")
    log(f"timings (s): {json.dumps(dict(timings))}")
    log(f"outputs: world {world} | pool {pool} | report {report}/report.md")
    return summary


def _write_report(report: str, summary: dict, counts: dict, total: int | None, check: pd.DataFrame) -> None:
    fsio.write_json(os.path.join(report, "summary.json"), summary)
    lines = [
        "# Winnow demo report", "",
        "## Timings (seconds)", "", "| stage | s |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary["timings_s"].items()], "",
        "## Ledger", "", "```", format_counts(counts, total), "```", "",
        "## Planted defects vs ledger state", "", "```", check.to_string(index=False), "```", "",
    ]
    fsio.write_bytes(os.path.join(report, "report.md"), "\n".join(lines).encode())
