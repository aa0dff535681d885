"""The main job on the embedded default.

synth -> eval sets (DiST, Patch Mixing) -> serve -> ingest -> train the fixed tiny model on the unfiltered pool (its
model is the CLIP scorer, the demo's stand-in for OpenAI's CLIP) -> embed the pool with it -> fine-tune it on the
clean set into a data filtering network (DFN) and embed the pool with that -> copy descriptor, dedup and
decontamination -> score and select every recipe, measured against the planted truth -> train and evaluate the
same fixed model on each subset -> report (:mod:`winnow.workflows.report`).

Every step is a stage (:class:`winnow.pipeline.run.stage.Stage`): a rerun reuses what is up to date and resumes what
was
interrupted; ``--overwrite`` replaces what was made with other settings.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace

import numpy as np

from winnow.pipeline.core import fsio
from winnow.pipeline.data.manifest import MANIFEST
from winnow.pipeline.data.pool import ledger
from winnow.pipeline.evalsets.dist import build_dist
from winnow.pipeline.evalsets.patchmix import build_patchmix
from winnow.pipeline.models import copydetect
from winnow.pipeline.run.runner import Runner
from winnow.pipeline.stages.copy_descriptor import train_descriptor
from winnow.pipeline.stages.dedup import TABLE as DEDUP_TABLE
from winnow.pipeline.stages.dedup import dedup, read_table
from winnow.pipeline.stages.dedup import default_out as dedup_out
from winnow.pipeline.stages.dfn import train_dfn
from winnow.pipeline.stages.embed import EmbedConfig, embed
from winnow.pipeline.stages.ingest import ingest
from winnow.pipeline.stages.reshard import reshard
from winnow.pipeline.stages.subset import subset
from winnow.pipeline.stages.train import RunTask, from_scale, train_and_evaluate
from winnow.pipeline.synth.server import WebPoolServer
from winnow.pipeline.synth.truth import dedup_check, ingest_check, selection_check
from winnow.pipeline.synth.world import build_world
from winnow.pipeline.tasks import load_tasklist
from winnow.workflows import report
from winnow.workflows.datasheet import write as write_datasheet
from winnow.workflows.settings import RunConfig, tasks_path


def main(args, cfg: RunConfig) -> dict:
    return run(args.out, cfg, overwrite=args.overwrite)


class Timings(dict):
    """Per demo step: ``{"s": seconds, "reused": bool}``. A step is reused when none of its stages wrote a
    manifest (each found its output up to date from an earlier run); the seconds are then the check, and
    ``made_s`` the seconds the step took when it did the work (from the previous report, when known)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        last = os.path.join(out, "report", "summary.json")
        self.last = (fsio.read_json(last).get("timings") or {}) if os.path.isfile(last) else {}

    @contextmanager
    def stage(self, name: str):
        before, start = _manifests(self.out), time.monotonic()
        yield
        self[name] = {"s": round(time.monotonic() - start, 1), "reused": _manifests(self.out) == before}
        last = self.last.get(name)
        if self[name]["reused"] and isinstance(last, dict):
            made = last.get("made_s") if last.get("reused") else last.get("s")
            if made is not None:
                self[name]["made_s"] = made


def _manifests(root: str) -> dict[str, int]:
    """Every stage manifest under ``root`` with its modification time (ns)."""
    return {os.path.join(d, MANIFEST): os.stat(os.path.join(d, MANIFEST)).st_mtime_ns
            for d, _, files in os.walk(root) if MANIFEST in files}


def run(out: str, cfg: RunConfig, overwrite: bool = False, log=print) -> dict:
    """Run the demo into ``out``; returns the summary it writes to ``report/summary.json``."""

    with nullcontext(Runner.active()) if Runner.active() else Runner(cfg.cluster) as runner:
        demo = Demo(out, cfg, runner, overwrite, log)
        demo.run()
    results = demo.results()
    summary = {"timings": results.timings, "ledger": results.counts, "input_rows": results.total,
               "ingest_check": results.check.to_dict("records"), "selection_recall": results.recall.to_dict("records"),
               "selection_precision": results.precision.to_dict("records"),
               "training": results.table.to_dict("records"), "dedup_check": results.dedup.to_dict("records"),
               "robustness": results.robust.to_dict("records"),
               "dist_gates": {k: v for k, v in results.dist_gates.items() if k != "config"},
               "runs": demo.trained, "config": asdict(cfg)}
    training = report.write(out, demo.paths["report"], summary, results, log=lambda m: None)
    report.log_summary(results, training, demo.paths["pool"], cfg.demo.dedup, demo.paths, log)
    return summary


def _fmt_avg(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class Demo:
    """The demo's steps, in order; each calls stages, which skip or resume on their own."""

    def __init__(self, out: str, cfg: RunConfig, runner, overwrite: bool, log):
        self.cfg, self.demo, self.runner, self.overwrite, self.log = cfg, cfg.demo, runner, overwrite, log
        self.out = out
        self.paths = {name: os.path.join(out, name) for name in ("world", "pool", "subsets", "report")}
        self.timings = Timings(out)
        self.trained: dict[str, list[dict]] = {}
        self.made: dict[str, str] = {}  # subset name -> its folder
        base = from_scale(self.demo.scale, self.demo.arch)
        self.model = base.model
        self.scale_line = (f"scale {self.demo.scale}, {base.model}, {base.samples_seen:,} samples seen, batch "
                           f"{base.batch_size}, lr {base.lr:g}, seeds {', '.join(map(str, self.demo.seeds))}")

    def run(self) -> None:
        world, pool, step = self.paths["world"], self.paths["pool"], self.timings.stage
        with step("synth"):
            build_world(self.cfg.synth, world, self.runner, overwrite=self.overwrite, log=self.log)
        with step("eval sets: DiST + Patch Mixing"):
            self.tasks = load_tasklist(str(tasks_path()), {"world": world}) + self.evalsets()
        with WebPoolServer.for_url(world, self.cfg.synth.base_url) as server, step("ingest"):
            self.log(f"serve: {world}/site at {server.url}" + "".join(f", {o.server_address[0]}" for o in
                                                                     server.others))
            ingest(os.path.join(world, "urls.parquet"), pool, self.ingest_config(), self.runner,
                   overwrite=self.overwrite, log=self.log)
        with step("train no_filter (its model is the CLIP scorer)"):
            self.subset("no_filter")
            scorer = self.train([("no_filter", self.demo.seeds[0], False)])[0]["checkpoint"]
        with step("embed with the CLIP scorer"):
            self.embed(pool, self.model, scorer, "demo")
            self.embed(os.path.join(world, "clean"), self.model, scorer, "demo")
        with step("DFN: fine-tune the scorer on the clean set, embed"):
            tcfg = replace(self.demo.dfn, model=self.model, pretrained=scorer)
            dfn = train_dfn(os.path.join(world, "clean"), os.path.join(self.out, "dfn"), "dfn", tcfg, self.runner,
                            log=self.log)
            self.embed(pool, self.model, dfn, "dfn")
        with step("dedup: copy descriptor, embed, dedup + decontaminate"):
            self.dedup()
        with step("subsets"):
            for name in dict.fromkeys(self.demo.recipes + self.demo.train):
                self.subset(name)
            for ref in self.demo.filters:  # shown without the file's filter_ prefix
                self.subset(ref, folder=os.path.join("filters", ref.removeprefix("filter_")))
            for name in self.demo.train:  # a data card for each trained subset
                write_datasheet(os.path.join(self.paths["subsets"], name))
        runs = [(name, seed, False) for name in self.demo.train for seed in self.demo.seeds]
        runs += [(name, seed, True) for name in self.demo.patch_mixing for seed in self.demo.seeds]
        with step(f"train + evaluate {len(runs)} runs ({len(self.demo.train) + len(self.demo.patch_mixing)} "
                  f"subsets x {len(self.demo.seeds)} seeds), side by side"):
            for (name, _, mixing), result in zip(runs, self.train(runs)):
                self.trained.setdefault(f"{name}+patchmix" if mixing else name, []).append(result)

    def ingest_config(self):
        """The ingest settings, with the world's blocklist added when it has one (as dedup adds its eval set)."""
        listed = os.path.join(self.paths["world"], "blocklist.txt")
        if not os.path.isfile(listed) or listed in self.cfg.ingest.blocklists:
            return self.cfg.ingest
        return replace(self.cfg.ingest, blocklists=[*self.cfg.ingest.blocklists, listed])

    def evalsets(self) -> list:
        """The DiST and Patch Mixing sets of the world's evaluation set; returns their tasks."""
        source, base = os.path.join(self.paths["world"], "eval"), os.path.join(self.out, "evalsets")
        build_dist(source, os.path.join(base, "dist"), self.demo.dist, overwrite=self.overwrite, log=self.log)
        build_patchmix(source, os.path.join(base, "patchmix"), self.demo.patchmix, overwrite=self.overwrite,
                       log=self.log)
        return (load_tasklist(os.path.join(base, "dist", "tasks.yaml")) +
                load_tasklist(os.path.join(base, "patchmix", "tasks.yaml")))

    def embed(self, pool: str, model: str, pretrained: str, tag: str, batch_size: int = 128) -> None:
        embed(pool, EmbedConfig(model=model, pretrained=pretrained, tag=tag, batch_size=batch_size), self.runner,
              overwrite=self.overwrite, log=self.log)

    def dedup(self) -> None:
        pool, cfg = self.paths["pool"], self.demo.dedup
        descriptor = train_descriptor(pool, os.path.join(self.out, "copy"), self.demo.copy_descriptor,
                                      overwrite=self.overwrite, log=self.log)
        self.embed(pool, copydetect.MODEL_NAME, descriptor, cfg.tag, batch_size=256)
        cfg = replace(cfg, decontaminate=[*cfg.decontaminate, os.path.join(self.paths["world"], "eval")])
        dedup(pool, cfg, self.runner, overwrite=self.overwrite, log=self.log)

    def subset(self, ref: str, folder: str = "") -> None:
        out = os.path.join(self.paths["subsets"], folder or ref)
        name = os.path.basename(out)
        variables = {"world": self.paths["world"], "dedup_tag": self.demo.dedup.tag}
        subset(ref, self.paths["pool"], out, self.runner, variables=variables, overwrite=self.overwrite,
               cache=os.path.join(self.out, "cache"), log=self.log if not folder else (lambda m: None))
        self.made[name] = out

    def train(self, runs: list[tuple[str, int, bool]]) -> list[dict]:
        """Reshard each subset of ``runs`` ((subset, seed, Patch Mixing) each), then train the fixed model and
        evaluate it for every run, one run per worker at a time; returns one result per run."""
        logs, tasks = os.path.join(self.out, "train"), []
        for name in dict.fromkeys(name for name, _, _ in runs):
            reshard(self.paths["pool"], os.path.join(self.made[name], "uids.npy"),
                    os.path.join(self.out, "shards", name), self.runner, shard_size=self.demo.shard_size,
                    overwrite=self.overwrite, log=self.log)
        for name, seed, mixing in runs:
            shards_dir = os.path.join(self.out, "shards", name)
            tcfg = from_scale(self.demo.scale, self.demo.arch, seed=seed)
            run_name = f"{name}-seed{seed}"
            if mixing:  # the paper's setting: half of the images, r ~ U(0, 0.5), 7 x 7 grid
                tcfg, run_name = replace(tcfg, patch_mixing=0.5), f"{name}+patchmix-seed{seed}"
            tasks.append(RunTask(shards_dir, logs, run_name, tcfg, tuple(self.tasks),
                                 os.path.join(logs, run_name, "eval"), self.overwrite))

        def done(task: RunTask, result: dict) -> None:
            self.log(f"train + evaluate: {task.name}: average {_fmt_avg(result['average'])} -> {task.eval_out}")

        results = self.runner.map(train_and_evaluate, tasks, label="train + evaluate", on_result=done,
                                  sizes=[t.config.samples_seen for t in tasks], unit="samples")
        return [{"seed": t.config.seed, **r} for t, r in zip(tasks, results)]

    def results(self) -> report.Results:
        pool, world = self.paths["pool"], self.paths["world"]
        counts, total = ledger(pool)
        arrays = {name: np.load(os.path.join(folder, "uids.npy"), allow_pickle=False)
                  for name, folder in self.made.items()}
        recall, precision = selection_check(pool, world, arrays)
        duplicates = read_table(os.path.join(dedup_out(pool, self.demo.dedup.tag), DEDUP_TABLE))
        main_tasks = [t.name for t in self.tasks if not t.curve and t.kind != "odd_one_out"]
        sizes = {name: len(arrays[name.split("+")[0]]) for name in self.trained}
        return report.Results(
            counts=counts, total=total, check=ingest_check(pool, world, self.ingest_config()),
            recall=recall, precision=precision, table=report.results_table(self.trained, sizes, main_tasks),
            robust=report.robustness_table(self.trained), dedup=dedup_check(pool, world, duplicates),
            dist_gates=fsio.read_json(os.path.join(self.out, "evalsets", "dist", "gates.json")),
            scale_line=self.scale_line, timings=dict(self.timings))
