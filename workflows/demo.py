"""The main job on the embedded default.

synth -> serve -> ingest -> ledger vs truth -> train the fixed tiny model on the unfiltered pool (its model is
the CLIP scorer, the demo's stand-in for OpenAI's CLIP) -> embed the pool with it -> fine-tune it on the clean
set into a data filtering network (DFN) and embed the pool with that -> score and select every recipe, measured
against the planted truth -> train and evaluate the same fixed model on each subset (the evaluation set, its
DiST triplets and its Patch Mixing conditions) -> report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, replace

import numpy as np
import pandas as pd

from pipeline.core import fsio
from pipeline.models import copydetect
from pipeline.stages.copy_descriptor import train_descriptor
from pipeline.stages.dedup import TABLE as DEDUP_TABLE
from pipeline.stages.dedup import dedup
from pipeline.stages.dedup import default_out as dedup_out
from pipeline.stages.dedup import read_table as read_dedup_table
from pipeline.stages.embed import EmbedConfig, embed
from pipeline.core.errors import UserError
from pipeline.evalsets.dist import build_dist
from pipeline.stages.evaluate import evaluate
from pipeline.tasks import load_tasklist
from pipeline.stages.ingest import ingest
from pipeline.data.ledger import format_counts
from pipeline.data.manifest import MANIFEST
from pipeline.evalsets.patchmix import build_patchmix
from pipeline.data.pool import ledger
from pipeline.stages.reshard import reshard
from pipeline.run.runner import Runner
from pipeline.stages.subset import load_recipe, subset
from pipeline.synth.server import WebPoolServer
from pipeline.synth.truth import dedup_check, ingest_check, selection_check
from pipeline.synth.world import build_world
from pipeline.stages.dfn import train_dfn
from pipeline.stages.train import TrainConfig, from_scale, train

from .settings import RunConfig, tasks_path

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
    subsets_dir = os.path.join(out, "subsets")
    demo = cfg.demo
    timings = Timings()
    trained: dict[str, list[dict]] = {}
    with Runner(cfg.cluster) as runner:
        with timings.stage("synth"):
            build_world(cfg.synth, world, runner, overwrite=overwrite, log=log)
        with timings.stage("eval sets: DiST + Patch Mixing"):
            robustness = build_evalsets(os.path.join(out, "evalsets"), os.path.join(world, "eval"), demo, overwrite,
                                        log)
        with WebPoolServer.for_url(world, cfg.synth.base_url) as server:
            log(f"serve: {world}/site at {server.url}")
            with timings.stage("ingest"):
                ingest(os.path.join(world, "urls.parquet"), pool, cfg.ingest, runner, overwrite=overwrite, log=log)
        tasks = load_tasklist(str(tasks_path()), {"world": world}) + robustness
        runs = TrainRuns(out, pool, demo, tasks, runner, overwrite, log)

        with timings.stage("train no_filter (its model is the CLIP scorer)"):
            subset("no_filter", pool, os.path.join(subsets_dir, "no_filter"), runner, log=log)
            trained["no_filter"] = runs.train("no_filter")
            scorer = trained["no_filter"][0]["checkpoint"]
        with timings.stage("embed with the CLIP scorer"):
            ecfg = EmbedConfig(model=runs.model, pretrained=scorer, tag="demo", batch_size=128)
            embed(pool, ecfg, runner, overwrite=overwrite, log=log)
            embed(os.path.join(world, "clean"), ecfg, runner, overwrite=overwrite, log=log)
        with timings.stage("DFN: fine-tune the scorer on the clean set, embed"):
            dfn = runs.train_dfn(os.path.join(world, "clean"), scorer)
            embed(pool, EmbedConfig(model=runs.model, pretrained=dfn, tag="dfn", batch_size=128), runner,
                  overwrite=overwrite, log=log)
        with timings.stage("dedup: copy descriptor, embed, dedup + decontaminate"):
            descriptor = train_descriptor(pool, os.path.join(out, "copy"), steps=demo.copy_steps, log=log)
            embed(pool, EmbedConfig(model=copydetect.MODEL_NAME, pretrained=descriptor, tag=demo.dedup.tag,
                                    batch_size=256), runner, overwrite=overwrite, log=log)
            dcfg = replace(demo.dedup, decontaminate=[*demo.dedup.decontaminate, os.path.join(world, "eval")])
            dedup(pool, dcfg, runner, overwrite=overwrite, log=log)
            duplicates = read_dedup_table(os.path.join(dedup_out(pool, dcfg.tag), DEDUP_TABLE))
        with timings.stage("subsets"):
            made = {}
            variables = {"world": world, "dedup_tag": demo.dedup.tag}
            for name in dict.fromkeys(demo.recipes + demo.train):
                made[name] = subset(name, pool, os.path.join(subsets_dir, name), runner, variables=variables,
                                    log=log)
            for name, inline in SINGLE_FILTERS.items():
                recipe = load_recipe({"name": name, **inline})
                made[name] = subset(recipe, pool, os.path.join(subsets_dir, "filters", name), runner, log=lambda m: None)
        with timings.stage(f"train {len(demo.train) - 1 + len(demo.patch_mixing)} subsets x {len(demo.seeds)} seed(s)"):
            for name in demo.train:
                if name not in trained:
                    trained[name] = runs.train(name)
            for name in demo.patch_mixing:
                trained[f"{name}+patchmix"] = runs.train(name, patch_mixing=True)

    counts, total = ledger(pool)
    check = ingest_check(pool, world, cfg.ingest.min_image_size)
    arrays = {name: _load_uids(subsets_dir, name) for name in made}
    recall, precision = selection_check(pool, world, arrays)
    dedup_table = dedup_check(pool, world, duplicates)
    main_tasks = [t.name for t in tasks if not t.curve and t.kind != "odd_one_out"]
    table = results_table(trained, {name: len(arrays[name.split("+")[0]]) for name in trained}, main_tasks)
    robust = robustness_table(trained)
    dist_gates = fsio.read_json(os.path.join(out, "evalsets", "dist", "gates.json"))
    summary = {"timings_s": dict(timings), "ledger": counts, "input_rows": total,
               "ingest_check": check.to_dict("records"), "selection_recall": recall.to_dict("records"),
               "selection_precision": precision.to_dict("records"), "training": table.to_dict("records"),
               "dedup_check": dedup_table.to_dict("records"), "robustness": robust.to_dict("records"),
               "dist_gates": {k: v for k, v in dist_gates.items() if k != "config"},
               "runs": trained, "config": asdict(cfg)}
    _write_report(report, summary, counts, total, check, recall, precision, table, runs.scale_line, dedup_table,
                  robust, plot_curves(trained, report))
    log("\nLedger of " + pool + ":\n" + format_counts(counts, total))
    log("\nPlanted defects vs ledger state:")
    log(check.to_string(index=False))
    matched, rows = int(check["matched"].sum()), int(check["rows"].sum())
    log(f"{matched}/{rows} pool rows ended in the state their planted defect implies")
    log("\nFilters and recipes vs planted defects (downloaded samples; precision = dropped samples that are "
        "defective; other columns = share of that defect dropped):")
    log(_fmt(recall))
    log(f"\nDedup ({demo.dedup.tag} descriptor, near cosine >= {demo.dedup.near_threshold}, contamination >= "
        f"{demo.dedup.contamination_threshold}) vs planted duplicates and eval copies:")
    log(_fmt_dedup(dedup_table))
    log(f"\nThe fixed model trained on each subset ({runs.scale_line}):")
    log(format_table(table))
    log("\nThe same models on DiST (odd-one-out accuracy, chance 0.333) and Patch Mixing (area under accuracy vs "
        "share of foreign patches / tiles / dropped patches / occlusion; plots in the report folder):")
    log(format_table(robust))
    log("DiST set: " + dist_line(dist_gates))
    log(f"\ntimings (s): {json.dumps(dict(timings))}")
    log(f"outputs: world {world} | pool {pool} | subsets {subsets_dir} | report {report}/report.md")
    return summary


class TrainRuns:
    """Reshard a subset, train the fixed model on it for each seed, evaluate; finished runs are reused."""

    def __init__(self, out: str, pool: str, demo, tasks, runner, overwrite: bool, log):
        self.out, self.pool, self.demo, self.tasks, self.runner = out, pool, demo, tasks, runner
        self.overwrite, self.log = overwrite, log
        base = from_scale(demo.scale, demo.arch)
        self.model = base.model
        self.scale_line = (f"scale {demo.scale}, {base.model}, {base.samples_seen:,} samples seen, batch "
                           f"{base.batch_size}, lr {base.lr:g}, seeds {', '.join(map(str, demo.seeds))}")

    def train(self, name: str, patch_mixing: bool = False) -> list[dict]:
        shards_dir = os.path.join(self.out, "shards", name)
        reshard(self.pool, os.path.join(self.out, "subsets", name, "uids.npy"), shards_dir, self.runner,
                shard_size=self.demo.shard_size, overwrite=self.overwrite, log=self.log)
        results = []
        for seed in self.demo.seeds:
            tcfg = from_scale(self.demo.scale, self.demo.arch, seed=seed)
            run_name = f"{name}-seed{seed}"
            if patch_mixing:  # the paper's setting: half of the images, r ~ U(0, 0.5), 7 x 7 grid
                tcfg = replace(tcfg, patch_mixing=0.5)
                run_name = f"{name}+patchmix-seed{seed}"
            ckpt = self._train(shards_dir, run_name, tcfg)
            summary = evaluate(tcfg.model, ckpt, self.tasks, os.path.join(self.out, "train", run_name, "eval"),
                               log=self.log)
            results.append({"seed": seed, "checkpoint": ckpt, **summary})
        return results

    def train_dfn(self, clean: str, scorer: str) -> str:
        tcfg = replace(self.demo.dfn, model=self.model, pretrained=scorer)
        out = os.path.join(self.out, "dfn")
        return self._once(os.path.join(out, "train", "dfn"), tcfg, clean,
                          lambda: train_dfn(clean, out, "dfn", tcfg, self.runner, log=self.log))

    def _train(self, shards_dir: str, run_name: str, tcfg: TrainConfig) -> str:
        logs = os.path.join(self.out, "train")
        return self._once(os.path.join(logs, run_name), tcfg, shards_dir,
                          lambda: train(shards_dir, logs, run_name, tcfg, log=self.log))

    def _once(self, run_dir: str, tcfg: TrainConfig, data: str, run) -> str:
        """The run's last checkpoint: reused when the same config already finished on the same data."""
        ckpt = os.path.join(run_dir, "checkpoints", f"epoch_{tcfg.epochs}.pt")
        if self._reusable(run_dir, ckpt, tcfg, data):
            return ckpt
        ckpt = run()
        fsio.write_json(os.path.join(run_dir, "winnow_run.json"), self._key(tcfg, data))
        return ckpt

    def _key(self, tcfg: TrainConfig, data: str) -> dict:
        meta = os.path.join(data, MANIFEST)
        return {"config": asdict(tcfg), "data": data,
                "data_manifest": fsio.fingerprint(meta) if os.path.exists(meta) else None}

    def _reusable(self, run_dir: str, ckpt: str, tcfg: TrainConfig, data: str) -> bool:
        """True if a finished run of the same config on the same data is there; clears a stale or broken one."""
        marker = os.path.join(run_dir, "winnow_run.json")
        done = os.path.isfile(ckpt) and os.path.isfile(marker)
        if done and not self.overwrite and fsio.read_json(marker) == self._key(tcfg, data):
            self.log(f"train: {run_dir} is up to date; reusing it")
            return True
        if os.path.exists(run_dir):
            if done and not self.overwrite:
                raise UserError(f"{run_dir} was trained with another config or data; rerun with --overwrite")
            shutil.rmtree(run_dir)  # unfinished (no marker) or overwritten: train it again
        return False


def results_table(trained: dict[str, list[dict]], sizes: dict[str, int], tasks: list[str]) -> pd.DataFrame:
    """One row per subset: size, and per main metric of ``tasks`` (and their average) the mean over seeds with
    its spread (max - min)."""
    rows = []
    for name, results in trained.items():
        row = {"subset": name, "size": sizes[name], "seeds": len(results)}
        metrics = {task: [r["tasks"][task] for r in results] for task in tasks}
        metrics["average"] = [float(np.mean([r["tasks"][t] for t in tasks])) for r in results]
        _mean_and_spread(row, metrics)
        rows.append(row)
    return pd.DataFrame(rows)


def robustness_table(trained: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per subset: DiST odd-one-out accuracy and the area of every Patch Mixing curve (mean, spread)."""
    rows = []
    for name, results in trained.items():
        row = {"subset": name, "seeds": len(results)}
        metrics = {"dist": [r["tasks"]["dist"] for r in results]}
        for curve in results[0].get("curves", {}):
            metrics[f"{curve} auc"] = [r["curves"][curve]["auc"] for r in results]
        _mean_and_spread(row, metrics)
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_and_spread(row: dict, metrics: dict[str, list[float]]) -> None:
    for key, values in metrics.items():
        row[key] = float(np.mean(values))
        row[f"{key} spread"] = float(np.max(values) - np.min(values))


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in shown.columns:
        if col not in ("subset", "size", "seeds"):
            shown[col] = shown[col].map(lambda v: f"{v:.3f}")
    if (table["seeds"] <= 1).all():
        shown = shown[[c for c in shown.columns if not c.endswith(" spread")]]
    return shown.to_string(index=False)


def build_evalsets(out: str, source: str, demo, overwrite: bool, log) -> list:
    """The DiST and Patch Mixing sets of the world's evaluation set (reused when built with the same settings);
    returns their tasks."""
    dist_dir, pm_dir = os.path.join(out, "dist"), os.path.join(out, "patchmix")
    settings = {"dist": asdict(demo.dist), "patchmix": [demo.patchmix_size, demo.patchmix_per_class],
                "source": source}
    marker = os.path.join(out, "winnow_evalsets.json")
    if overwrite or not os.path.exists(marker) or fsio.read_json(marker) != settings:
        for folder in (dist_dir, pm_dir):
            shutil.rmtree(folder, ignore_errors=True)
        build_dist(source, dist_dir, demo.dist, log=log)
        build_patchmix(source, pm_dir, size=demo.patchmix_size, per_class=demo.patchmix_per_class, log=log)
        fsio.write_json(marker, settings)
    else:
        log(f"eval sets: {out} is up to date; reusing it")
    return load_tasklist(os.path.join(dist_dir, "tasks.yaml")) + load_tasklist(os.path.join(pm_dir, "tasks.yaml"))


def plot_curves(trained: dict[str, list[dict]], report: str) -> list[str]:
    """One PNG per Patch Mixing curve: accuracy vs the curve's x for every trained subset (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evalsets.patchmix import TILES

    files = []
    curves = next(iter(trained.values()))[0].get("curves", {})
    for curve in curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, results in trained.items():
            xs = results[0]["curves"][curve]["x"]
            ys = np.mean([r["curves"][curve]["y"] for r in results], axis=0)
            ax.plot(xs, ys, marker="o", label=name)
        if curve == "shuffle":
            ax.set_xticks(range(len(TILES)), [str(t) for t in TILES])
            ax.set_xlabel("tiles shuffled")
        else:
            ax.set_xlabel({"occlude": "occluded share"}.get(curve, "share of patches replaced" if curve.startswith(
                "mix") else "share of patches dropped"))
        ax.set_ylabel("zero-shot accuracy")
        ax.set_title(f"Patch Mixing: {curve}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(report, f"patchmix_{curve}.png")
        os.makedirs(report, exist_ok=True)
        with fsio.atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        files.append(os.path.basename(path))
    return files


def dist_line(gates: dict) -> str:
    base = gates.get("baselines", {})
    return (f"{gates['kept']}/{gates['sources']} triplets kept ({gates['redone']} redone, {gates['dropped']} dropped "
            f"by the gates); reference models (must be near chance 0.333): " +
            ", ".join(f"{k} {v['acc']:.3f} [{v['acc_ci_low']:.3f}, {v['acc_ci_high']:.3f}]" for k, v in base.items()))


def _load_uids(subsets_dir: str, name: str):
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


def _fmt_dedup(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")


def _write_report(report: str, summary: dict, counts: dict, total: int | None, check: pd.DataFrame,
                  recall: pd.DataFrame, precision: pd.DataFrame, table: pd.DataFrame, scale_line: str,
                  dedup_table: pd.DataFrame, robust: pd.DataFrame, plots: list[str]) -> None:
    fsio.write_json(os.path.join(report, "summary.json"), summary)
    recall.to_csv(os.path.join(report, "selection_recall.csv"), index=False, float_format="%.4f")
    precision.to_csv(os.path.join(report, "selection_precision.csv"), index=False, float_format="%.4f")
    table.to_csv(os.path.join(report, "training.csv"), index=False, float_format="%.4f")
    robust.to_csv(os.path.join(report, "robustness.csv"), index=False, float_format="%.4f")
    lines = [
        "# Winnow demo report", "",
        "## The fixed model trained on each subset", "",
        f"Same training for every subset ({scale_line}); only the data differs. Columns: subset size, main "
        "metric of each task (zero-shot top-1 accuracy, retrieval mean recall@1), their average; with several "
        "seeds, the mean and the spread (max - min).", "",
        "```", format_table(table), "```", "",
        "## DiST and Patch Mixing", "",
        "DiST: odd-one-out accuracy on (original, two texture syntheses) triplets, chance 0.333 "
        f"({dist_line(summary['dist_gates'])}). Patch Mixing: normalised area under zero-shot accuracy vs the share "
        "of foreign patches (7x7, 14x14 grids), tiles shuffled, patches dropped, occluded share.", "",
        "```", format_table(robust), "```", "",
        *[f"![{p}]({p})" for p in plots], "",
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
        "## Deduplication and decontamination vs planted truth", "",
        "A planted copy is found when it shares an exact or near group with its source; `precision`: share of "
        "the samples dedup drops that are true duplicates of their group's kept member; contamination: pool "
        "copies of evaluation images flagged.", "",
        "```", _fmt_dedup(dedup_table), "```", "",
    ]
    fsio.write_bytes(os.path.join(report, "report.md"), "\n".join(lines).encode())
