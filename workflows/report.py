"""Reports: ``winnow report RUNS --out FILE.html`` (one self-contained page, :func:`html_report`) and the demo's
closing printout, ``report.md`` and tables (:func:`write`), which end with the same page.

The page's sections appear when their data exists: from a demo folder the pool's ledger, each one-filter subset
(score histogram with its threshold, kept and dropped examples), each recipe (size, planted-defect precision and
recall on the synthetic world), duplicate groups and the timings; from every evaluated run (demo, training or
evaluation folders, :mod:`winnow.workflows.compare`) the training table with intervals and paired tests, accuracy vs
subset size, DiST and the Patch Mixing curves.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.images import encode_jpeg, open_rgb
from winnow.pipeline.data.ledger import OK, format_counts
from winnow.pipeline.data.manifest import read_manifest
from winnow.pipeline.data.shards import image_bytes, iter_tar
from winnow.pipeline.stages.diff import diff, share
from winnow.pipeline.tasks.stats import ONE_SEED, verdict
from winnow.pipeline.tasks.zeroshot import CLASS_PREFIX, KIND
from winnow.workflows import html, readme
from winnow.workflows.compare import (
    METHOD,
    Group,
    ci_text,
    find_runs,
    format_text,
    frame,
    group_runs,
    interval,
    notes,
    p_text,
    paired,
    table,
)

EXAMPLES = 6  # thumbnails kept and dropped per filter
THUMB = 96


# ---------------------------------------------------------------------------------------------- the demo's tables

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


def dist_line(gates: dict) -> str:
    base = gates.get("baselines", {})
    return (f"{gates['kept']}/{gates['sources']} triplets kept ({gates['redone']} redone, {gates['dropped']} dropped "
            f"by the gates); reference models (must be near chance 0.333): " +
            ", ".join(f"{k} {v['acc']:.3f} [{v['acc_ci_low']:.3f}, {v['acc_ci_high']:.3f}]" for k, v in base.items()))


def timing_text(t: dict) -> str:
    """A step's time: seconds of work, or "reused" (an earlier run's output was up to date)."""
    made = f"; made in {t['made_s']:.1f} s" if "made_s" in t else ""
    return f"reused ({t['s']:.1f} s to check{made})" if t["reused"] else f"{t['s']:.1f}"


def _fmt(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in shown.columns[3:]:
        shown[col] = shown[col].map(lambda v: f"{v:.2f}")
    shown["precision"] = table["precision"].map(lambda v: f"{v:.2f}")
    return shown.to_string(index=False)


def _fmt_dedup(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")


@dataclass
class Results:
    """Everything the demo measured, for the report."""

    counts: dict
    total: int | None
    check: pd.DataFrame
    recall: pd.DataFrame
    precision: pd.DataFrame
    table: pd.DataFrame
    robust: pd.DataFrame
    dedup: pd.DataFrame
    dist_gates: dict
    scale_line: str
    timings: dict  # step -> {"s": seconds, "reused": bool}


def write(out: str, report: str, summary: dict, r: Results, log=print) -> str:
    """``summary.json``, the CSV tables, the short ``report.md`` and ``report.html`` (:func:`html_report` of the
    demo folder ``out``) in the folder ``report``; returns the comparison table's text."""
    fsio.write_json(os.path.join(report, "summary.json"), summary)
    r.recall.to_csv(os.path.join(report, "selection_recall.csv"), index=False, float_format="%.4f")
    r.precision.to_csv(os.path.join(report, "selection_precision.csv"), index=False, float_format="%.4f")
    r.table.to_csv(os.path.join(report, "training.csv"), index=False, float_format="%.4f")
    r.robust.to_csv(os.path.join(report, "robustness.csv"), index=False, float_format="%.4f")
    rows = _training_rows(group_runs(find_runs([out])))
    training = format_text(rows)

    fsio.write_json(os.path.join(report, "figures.json"), readme.figures(summary, rows))
    lines = [
        "# Winnow demo report", "",
        ("The full report, with score histograms, example images, duplicate groups and charts, is `report.html` "
         "(one self-contained file; `winnow report RUNS --out FILE.html` makes it for any runs)."), "",
        "## The fixed model trained on each subset", "",
        (f"Same training for every subset ({r.scale_line}); only the data differs. Mean over seeds of each main "
         "metric (zero-shot top-1 accuracy, retrieval mean recall@1) and their average, its 95% interval and a "
         "paired test against the first subset."), "",
        "```", training, "```", "",
        "## DiST and Patch Mixing", "",
        (f"DiST: odd-one-out accuracy, chance 0.333 ({dist_line(r.dist_gates)}). Patch Mixing: normalised area "
         "under zero-shot accuracy vs the share of foreign patches, tiles shuffled, patches dropped, occluded "
         "share."), "",
        "```", format_table(r.robust), "```", "",
        "## Timings (seconds; reused: an earlier run's output was up to date)", "", "| step | s |", "|---|---|",
        *[f"| {k} | {timing_text(v)} |" for k, v in r.timings.items()], "",
        "## Ledger", "", "```", format_counts(r.counts, r.total), "```", "",
        "Filters and recipes against the planted defects: `selection_recall.csv`, `selection_precision.csv`.", "",
    ]
    fsio.write_bytes(os.path.join(report, "report.md"), "\n".join(lines).encode())
    html_report([out], os.path.join(report, "report.html"), log=log)
    return training


def _readme_line(report: str) -> str:
    """Whether this run's figures are the ones the README quotes (``benchmarks/results/demo.json``)."""

    run = fsio.read_json(os.path.join(report, "figures.json"))
    if not readme.RECORDED.is_file():
        return "README figures: none recorded (`make readme-figures` records this run's)"
    recorded = json.loads(readme.RECORDED.read_text())
    if run["settings"] != recorded["settings"]:
        return "README figures: recorded with other demo settings, so not comparable with this run"
    diff = readme.differences(run, recorded)
    if not diff:
        return "README figures: this run gives exactly the figures the README quotes"
    return ("README figures differ from this run (another machine or torch build can round differently): "
            + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "") + "; `make readme-figures` records this run's")


def log_summary(r: Results, training: str, pool: str, dedup_cfg, paths: dict, log) -> None:
    """The demo's closing printout: ledger, planted truth, selections, dedup, training, robustness, timings."""
    log("\nLedger of " + pool + ":\n" + format_counts(r.counts, r.total))
    log("\nPlanted defects vs ledger state:")
    log(r.check.to_string(index=False))
    log(f"{int(r.check['matched'].sum())}/{int(r.check['rows'].sum())} pool rows ended in the state their planted "
        "defect implies")
    log("\nFilters and recipes vs planted defects (downloaded samples; precision = dropped samples that are "
        "defective; other columns = share of that defect dropped):")
    log(_fmt(r.recall))
    log(f"\nDedup ({dedup_cfg.tag} descriptor, near cosine >= {dedup_cfg.near_threshold}, contamination >= "
        f"{dedup_cfg.contamination_threshold}) vs planted duplicates and eval copies:")
    log(_fmt_dedup(r.dedup))
    log(f"\nThe fixed model trained on each subset ({r.scale_line}):")
    log(training)
    log(_readme_line(paths["report"]))
    log("\nThe same models on DiST (odd-one-out accuracy, chance 0.333) and Patch Mixing (area under accuracy vs "
        "share of foreign patches / tiles / dropped patches / occlusion):")
    log(format_table(r.robust))
    log("DiST set: " + dist_line(r.dist_gates))
    log("\ntimings (s): " + ", ".join(f"{k} {timing_text(v)}" for k, v in r.timings.items()))
    log("outputs: " + " | ".join(f"{k} {v}" for k, v in paths.items()))


# ------------------------------------------------------------------------------------------------- the HTML page

def html_report(paths: list[str], out: str, log=print) -> str:
    """Write the report of the runs in ``paths`` to ``out`` (one HTML file); return its path. It opens with its
    answer (the summary), then the evidence: training table and tests, loss curves, robustness, then the data:
    filters, recipes, ledger, duplicates, timings."""
    demos = [p for p in paths if os.path.isdir(os.path.join(p, "pool")) and os.path.isdir(os.path.join(p, "subsets"))]
    runs = [p for p in paths if p not in demos or os.path.isdir(os.path.join(p, "train"))]
    groups = group_runs(find_runs(runs)) if runs else []
    rows = _training_rows(groups) if groups else []
    sections = [("summary", "Summary", _summary_section(rows, demos[0] if demos else None))]
    if groups:
        sections += _training_sections(groups, rows)
    if demos:
        demo = demos[0]
        images = Images(os.path.join(demo, "pool"))
        filters = [_filter_data(f, images) for f in sorted(glob.glob(os.path.join(demo, "subsets", "filters", "*")))
                   if os.path.isfile(os.path.join(f, "subset.json"))]
        dups = _dedup_data(demo, images)
        images.load()
        sections += [("filters", "Filters", "".join(_filter_html(f, images) for f in filters))] if filters else []
        sections += [("recipes", "Recipes", _recipes_section(demo))]
        who = _groups_section(demo)
        sections += [("groups", "Who each trained subset keeps", who)] if who else []
        sections += [("ledger", "Ledger: how every input row ended", _ledger_section(demo))]
        sections += [("publishing", "Publishing: opt-outs, blocklists, personal data", _publishing_section(demo))]
        sections += [("dedup", "Duplicates", _dedup_html(demo, dups, images))] if dups is not None else []
    if demos and os.path.isfile(os.path.join(demos[0], "report", "summary.json")):
        timings = fsio.read_json(os.path.join(demos[0], "report", "summary.json")).get("timings") or {}
        if timings:
            sections.append(("timings", "Timings", _timings_section(timings)))
    if len(sections) == 1 and not rows and not demos:
        raise UserError(f"nothing to report in {', '.join(paths)}; give a demo folder, training runs or evaluation "
                        "folders")
    intro = "Made from " + ", ".join(html.esc(p) for p in paths) + " by <code>winnow report</code>."
    fsio.write_bytes(out, html.page("Winnow report", intro, sections).encode())
    log(f"report: {out}")
    return out


def _funnel_line(demo: str, rows: list) -> str:
    """The pool in one line: input rows, ok, the main failures, then each trained subset's size."""
    from winnow.pipeline.data.pool import ledger

    counts, total = ledger(os.path.join(demo, "pool"))
    total = total or sum(counts.values())
    ok = counts.get(OK, 0)
    failed = sorted(((s, n) for s, n in counts.items() if s != OK), key=lambda kv: -kv[1])
    worst = ", ".join(f"{s} {n:,}" for s, n in failed[:3]) + (", ..." if len(failed) > 3 else "")
    sizes = ", ".join(f"{r.group.name} {r.group.size:,}" for r in rows if r.group.size)
    return (f"{total:,} input rows &rarr; {ok:,} downloaded ({ok / max(total, 1):.1%}; failed: {html.esc(worst)})"
            + (f" &rarr; trained subsets: {html.esc(sizes)}" if sizes else ""))


def _summary_section(rows: list, demo: str | None) -> str:
    """The answer first: the best trained subset and its difference to the baseline, with interval, Holm-adjusted
    p and verdict; the pool's funnel in one line."""
    out = []
    if len(rows) > 1:
        base = rows[0]
        best = max(rows[1:], key=lambda r: r.average)
        d = best.vs
        seeds = f"{len(best.group.runs)} seed{'s' if len(best.group.runs) > 1 else ''}"
        claim = {"significant": "a significant difference", "not significant":
                 "<b>not</b> a significant difference: the data do not separate them",
                 ONE_SEED: "no verdict (one seed: no seed variance; train 2 or more seeds per subset)",
                 "n/a": "no test (no per-sample outcomes)"}[best.verdict]
        out.append(f"<p class=\"answer\">Best subset: <b>{html.esc(best.group.name)}</b> ({seeds}), average "
                   f"{best.average:.3f} {ci_text(best.interval)}; vs {html.esc(base.group.name)}: "
                   f"<b>{best.average - base.average:+.3f}</b> {ci_text(d, True)}, p (Holm) {p_text(best.p_holm)}: "
                   f"{claim}.</p>")
        out.append(html.note(f"Average of the main metrics ({', '.join(map(html.esc, base.metrics))}); 95% "
                             f"intervals over eval images and seeds; p adjusted (Holm) for the {len(rows) - 1} "
                             "subsets compared with the baseline. Details in the training section."))
    elif rows:
        r = rows[0]
        out.append(f"<p class=\"answer\"><b>{html.esc(r.group.name)}</b>: average {r.average:.3f} "
                   f"{ci_text(r.interval)} ({len(r.group.runs)} seed(s)); no other subset to compare with.</p>")
    if demo:
        out.append(html.note("Pool: " + _funnel_line(demo, rows)))
    return "".join(out) or html.note("No trained subset in these folders: the sections below show the data.")


class Images:
    """Thumbnails of pool samples (JPEG data URIs), read from the shard tars in one pass per tar."""

    def __init__(self, pool: str):
        self.pool, self.want, self.uris = pool, {}, {}

    def ask(self, stem: str, key: str) -> tuple[str, str]:
        self.want.setdefault(stem, set()).add(key)
        return stem, key

    def load(self) -> None:
        from PIL import Image


        for stem, keys in self.want.items():
            tar = os.path.join(self.pool, f"{stem}.tar")
            if not os.path.isfile(tar):
                continue
            left = set(keys)
            for sample in iter_tar(tar):
                data = image_bytes(sample) if sample["__key__"] in left else None
                if data:
                    img = open_rgb(data, draft_side=THUMB)
                    img.thumbnail((THUMB, THUMB), Image.BICUBIC)
                    self.uris[stem, sample["__key__"]] = html.data_uri(encode_jpeg(img, quality=80))
                    left.discard(sample["__key__"])
                if not left:
                    break

    def uri(self, ref: tuple[str, str]) -> str | None:
        return self.uris.get(ref)


def _ledger_section(demo: str) -> str:
    from winnow.pipeline.data.pool import ledger

    counts, total = ledger(os.path.join(demo, "pool"))
    rows = sum(counts.values())
    total = total or rows
    failed = sorted(((s, n) for s, n in counts.items() if s != OK), key=lambda kv: -kv[1])
    funnel = [("input rows", total, "")] + [(f"− {s}", n, "fail") for s, n in failed] + [
        (f"= {OK}", counts.get(OK, 0), "")]
    df = pd.DataFrame([{"": name, "rows": f"{n:,}", "share": f"{n / total:.1%}",
                        " ": html.bar(n / total, fail == "fail")} for name, n, fail in funnel])
    text = html.note(f"{total:,} input rows &rarr; {counts.get(OK, 0):,} ok ({counts.get(OK, 0) / total:.1%}); every "
                     "row ends in exactly one state (<code>pipeline/data/ledger.py</code>).")
    summary = _demo_summary(demo)
    check = ""
    if summary.get("ingest_check"):
        check = "<h3>Planted defects vs ledger state</h3>" + html.table(pd.DataFrame(summary["ingest_check"]))
    return text + html.table(df, raw={" "}) + check


def _groups_section(demo: str, top: int = 6) -> str:
    """Per group (caption language, host, caption length, image size): the candidates and each trained subset's
    kept share (``winnow diff`` of no_filter and the subset)."""
    base = os.path.join(demo, "subsets", "no_filter")
    trained = sorted({os.path.basename(p).rsplit("-seed", 1)[0] for p in glob.glob(os.path.join(demo, "train",
                                                                                               "*-seed*"))})
    names = [n for n in trained if n != "no_filter" and os.path.isfile(os.path.join(demo, "subsets", n,
                                                                                    "subset.json"))]
    if not os.path.isfile(os.path.join(base, "subset.json")) or not names:
        return ""
    table = None
    for name in names:
        groups = diff(base, os.path.join(demo, "subsets", name))["groups"]
        part = groups[["by", "group", "candidates"]].copy()
        part[name] = [share(k, n) for k, n in zip(groups["in B"], groups["candidates"])]
        table = part if table is None else table.merge(part, on=["by", "group", "candidates"])
    body = html.note("Of the downloaded rows in each group, the share each trained subset keeps (<code>winnow "
                     "diff</code>), with its 95% Wilson interval; a filter that drops one language, one site or "
                     "small images wholesale shows here. The largest groups of each kind:")
    for kind in dict.fromkeys(table["by"]):
        body += f"<h3>{html.esc(kind)}</h3>" + html.table(table[table["by"] == kind].head(top).drop(columns=["by"]))
    return body


def _publishing_section(demo: str) -> str:
    """What ingest kept out of the pool for the pool to be publishable, the planted cases against their states,
    and the datasheets."""
    from winnow.pipeline.data.pool import ledger
    from winnow.pipeline.stages.ledger import _safety_lines
    from winnow.pipeline.synth.world import SafetyPlants

    pool = os.path.join(demo, "pool")
    counts, _ = ledger(pool)
    doc = read_manifest(pool) or {}
    kept_out = [(state, counts.get(state, 0)) for state in ("opted_out", "disallowed", "blocked", "nsfw")]
    text = html.note("Rows kept out before anything was written: " + ", ".join(f"<b>{n:,}</b> {s}" for s, n in
                                                                             kept_out) +
                     ". Opted-out and blocklisted images were never requested or never written; personal data in "
                     "captions was masked before any worker saw it.")
    text += "".join(html.note(html.esc(line)) for line in _safety_lines(doc))
    check = _demo_summary(demo).get("ingest_check") or []
    plants = {f.name for f in dataclasses.fields(SafetyPlants)}
    planted = [row for row in check if row.get("defect") in plants]
    if planted:
        text += "<h3>Planted opt-outs, blocklisted images and personal data vs ledger state</h3>"
        text += html.table(pd.DataFrame(planted))
    sheets = sorted(glob.glob(os.path.join(demo, "subsets", "*", "datasheet.html")))
    if sheets:
        links = ", ".join(f'<a href="../subsets/{html.esc(os.path.basename(os.path.dirname(p)))}/datasheet.html">'
                          f'{html.esc(os.path.basename(os.path.dirname(p)))}</a>' for p in sheets)
        text += html.note(f"Datasheets (<code>winnow datasheet</code>, Markdown beside each): {links}.")
    return text


def _demo_summary(demo: str) -> dict:
    path = os.path.join(demo, "report", "summary.json")
    return fsio.read_json(path) if os.path.isfile(path) else {}


def _subset_lines(folder: str, doc: dict) -> list[tuple[float, str]]:
    """The thresholds of a one-filter recipe, as (value, label) lines on its score histogram."""
    recipe = (read_manifest(folder) or {}).get("params", {}).get("recipe", {})
    lines = []
    for rule in recipe.get("select", []):
        kind, arg = next(iter(rule.items()))
        if kind == "threshold":
            lines += [(float(arg[k]), f"{k} {arg[k]}") for k in ("min", "max") if k in arg]
    for step in doc.get("steps", []):
        if "threshold" in step:
            lines.append((float(step["threshold"]), f"top {step['rule'].split()[1]}"))
    return lines


def _filter_data(folder: str, images: Images, max_parts: int = 4) -> dict:
    """A one-filter subset: its score column over the pool's candidates, thresholds, and examples."""
    from winnow.pipeline.data.parts import list_parts, read_part
    from winnow.pipeline.data.uid import isin_uids, uids_to_array
    from winnow.pipeline.select.score import load_array

    doc = fsio.read_json(os.path.join(folder, "subset.json"))
    column, cache = next(iter(doc["scores"].items()))
    parts = list_parts(doc["pool"])
    rows_dir = os.path.join(os.path.dirname(cache), "rows")
    data = {"name": os.path.basename(folder), "doc": doc, "column": column, "lines": _subset_lines(folder, doc),
            "values": None, "kept": [], "dropped": []}
    if all(os.path.isfile(os.path.join(cache, f"{p.stem}.npy")) for p in parts):
        data["values"] = np.concatenate([load_array(os.path.join(cache, f"{p.stem}.npy"))[
            load_array(os.path.join(rows_dir, f"{p.stem}.ok.npy"))] for p in parts]).astype(float)
    kept_uids = np.load(os.path.join(folder, "uids.npy"), allow_pickle=False)
    frames = []
    for part in parts[:max_parts]:  # examples come from the first parts
        t = read_part(part, ["key", "caption"])
        ok = (t["state"] == OK).to_numpy()
        t = t[ok]
        cached = os.path.join(cache, f"{part.stem}.npy")
        score = load_array(cached)[ok] if os.path.isfile(cached) else np.full(len(t), np.nan)
        kept = isin_uids(uids_to_array(t["uid"].array, sort=False), kept_uids)
        frames.append(pd.DataFrame({"stem": part.stem, "key": t["key"].astype(str).to_numpy(),
                                    "caption": t["caption"].astype(str).to_numpy(), "score": score, "kept": kept}))
    table = pd.concat(frames, ignore_index=True)
    for side, kept in (("kept", True), ("dropped", False)):  # spread over the score range, lowest first
        chosen = table[table["kept"] == kept].sort_values(["score", "key"], na_position="last")
        picks = np.unique(np.linspace(0, len(chosen) - 1, min(EXAMPLES, len(chosen))).round().astype(int))
        data[side] = [(images.ask(r.stem, r.key), f"{r.score:.3g} · {r.caption[:40]}") for r in
                      chosen.iloc[picks].itertuples()]
    return data


def _filter_html(f: dict, images: Images) -> str:
    doc = f["doc"]
    ok = doc["steps"][0]["kept"] if doc.get("steps") else doc["rows"]
    head = (f"<h3>{html.esc(f['name'])}: {html.esc(doc.get('description', ''))}</h3>" +
            html.note(f"keeps {doc['kept']:,} of {ok:,} downloaded samples ({doc['kept'] / max(ok, 1):.1%}); score "
                      f"column <code>{html.esc(f['column'])}</code>"))
    chart = html.histogram(f["values"], f["lines"], f["column"]) if f["values"] is not None else html.note(
        "score cache not found (it was removed); the histogram needs it")
    shots = "".join(html.thumbs([(images.uri(ref), cap, side) for ref, cap in f[side]],
                                f"{side} (score, caption), lowest score first")
                    for side in ("kept", "dropped") if f[side])
    return head + chart + shots


def _recipes_section(demo: str) -> str:
    pool, world = os.path.join(demo, "pool"), os.path.join(demo, "world")
    folders = [f for f in sorted(glob.glob(os.path.join(demo, "subsets", "*")) +
                                 glob.glob(os.path.join(demo, "subsets", "filters", "*")))
               if os.path.isfile(os.path.join(f, "subset.json"))]
    rows, arrays = [], {}
    for f in folders:
        doc = fsio.read_json(os.path.join(f, "subset.json"))
        name = ("filter " if os.path.basename(os.path.dirname(f)) == "filters" else "") + os.path.basename(f)
        ok = doc["steps"][0]["kept"] if doc.get("steps") else doc["rows"]
        rows.append({"subset": name, "size": doc["kept"], "share of ok": f"{doc['kept'] / max(ok, 1):.1%}"})
        arrays[name] = np.load(os.path.join(f, "uids.npy"), allow_pickle=False)
    df = pd.DataFrame(rows)
    text = html.note("Size: samples a recipe keeps (of the downloaded ones).")
    if os.path.isfile(os.path.join(world, "truth.parquet")):
        from winnow.pipeline.synth.truth import selection_check

        recall, _ = selection_check(pool, world, arrays)
        df = df.merge(recall.drop(columns=["kept"]), on="subset")
        text = html.note("On the synthetic world every sample's planted defect is known. <b>precision</b>: share of "
                         "the dropped samples that carry a planted defect; each defect column: share of the samples "
                         "with that defect that the subset drops (recall).")
    return text + html.table(df)


def _dedup_data(demo: str, images: Images, per_kind: int = 3, max_members: int = 6) -> pd.DataFrame | None:
    """A few duplicate groups per kind (largest first), with each member's image asked for."""
    from winnow.pipeline.data.parts import list_parts, read_part

    found = sorted(glob.glob(os.path.join(demo, "pool", "dedup", "*", "duplicates.parquet")))
    tag = _demo_summary(demo).get("config", {}).get("demo", {}).get("dedup", {}).get("tag")
    found = [p for p in found if p.split(os.sep)[-2] == tag] or found
    if not found:
        return None
    table = pd.read_parquet(found[0])
    picks = []
    for kind in ("exact_image", "near", "semantic", "contaminated"):
        rows = table[table["kind"] == kind]
        if kind == "contaminated":
            picks.append(rows.sort_values(["similarity", "uid"], ascending=[False, True]).head(max_members)
                         .assign(members=1))
            continue
        sizes = rows.groupby("group").size().sort_values(ascending=False, kind="stable")
        for group in sizes[sizes > 1].index[:per_kind]:
            picks.append(rows[rows["group"] == group].sort_values(["kept", "uid"], ascending=[False, True])
                         .head(max_members).assign(members=sizes[group]))
    chosen = pd.concat(picks, ignore_index=True) if picks else table.head(0)
    where, wanted = {}, set(chosen["uid"])
    for part in list_parts(os.path.join(demo, "pool")):
        if not wanted - set(where):
            break
        t = read_part(part, ["key"])
        for uid, key in zip(t["uid"].astype(str), t["key"].astype(str)):
            if uid in wanted:
                where[uid] = images.ask(part.stem, key)
    chosen["ref"] = chosen["uid"].map(where)
    return chosen.assign(path=found[0])


def _dedup_html(demo: str, chosen: pd.DataFrame, images: Images) -> str:
    path = chosen["path"].iloc[0] if len(chosen) else ""
    out = html.note(f"A few duplicate groups of <code>{html.esc(os.path.relpath(path, demo) if path else '')}"
                    "</code>, largest first: the kept member (green) and the ones dropped (red); the number is the "
                    "similarity to the group (semantic) or to the evaluation image (contaminated).")
    groups = ""  # contaminated rows are one group per pool image: shown together below
    for (kind, _), rows in chosen[chosen["kind"] != "contaminated"].groupby(["kind", "group"], sort=False):
        items = [(images.uri(r.ref) if isinstance(r.ref, tuple) else None,
                  f"{r.similarity:.3f}" if np.isfinite(r.similarity) else r.uid[:8], "kept" if r.kept else "dropped")
                 for r in rows.itertuples()]
        groups += f"<div>{html.thumbs(items, f'{kind}: a group of {rows.members.iloc[0]}')}</div>"
    out += f'<div class="groups">{groups}</div>'
    flagged = chosen[chosen["kind"] == "contaminated"]
    if len(flagged):
        out += html.thumbs([(images.uri(r.ref) if isinstance(r.ref, tuple) else None, f"{r.similarity:.3f}", "dropped")
                            for r in flagged.itertuples()], "contaminated: pool images that copy an evaluation image")
    check = _demo_summary(demo).get("dedup_check")
    if check:
        out += "<h3>Against the planted duplicates</h3>" + html.table(pd.DataFrame(check))
    return out


def _baseline(groups: list[Group]) -> int:
    return next((i for i, g in enumerate(groups) if g.name == "no_filter"), 0)


def _training_rows(groups: list[Group]):
    order = _baseline(groups)
    return table([groups[order]] + [g for i, g in enumerate(groups) if i != order])


def _training_sections(groups: list[Group], rows: list) -> list[tuple[str, str, str]]:
    tasks, base = list(rows[0].metrics), rows[0]
    heads = [{"comparison": f"{r.group.name} vs {base.group.name}", "difference": f"{r.average - base.average:+.3f}",
              "95% interval": ci_text(r.vs, True), "p": p_text(r.vs), "p (Holm)": p_text(r.p_holm),
              "verdict": r.verdict} for r in rows[1:]]
    best = sorted(rows, key=lambda r: -r.average)
    if len(best) > 2 and all(r is not base for r in best[:2]):
        d = paired(best[0].group, best[1].group, tasks)
        heads.append({"comparison": f"best {best[0].group.name} vs next {best[1].group.name}",
                      "difference": f"{best[0].average - best[1].average:+.3f}", "95% interval": ci_text(d, True),
                      "p": p_text(d), "p (Holm)": "",
                      "verdict": "exploratory" if d is None or not d.one_seed else verdict(d)})
    missing = any(r.interval is None for r in rows)
    said = notes(rows)
    text = (html.note(f"Mean over seeds of each main metric ({', '.join(tasks)}) and their average. {METHOD}.") +
            "".join(html.note(html.esc(n)) for n in said if not n.startswith("n/a")) +
            (html.note("n/a: these evaluations have no per-sample outcomes (<code>samples/*.npy</code>); evaluate "
                       "again to get intervals and tests.") if missing else "") +
            html.table(frame(rows).iloc[:, :-5], highlight={0}) +
            ("<h3>Headline comparisons</h3>" + html.note(
                f"Each subset against {html.esc(base.group.name)}: the family of {len(rows) - 1} tests whose p is "
                "adjusted with Holm's method (significant: p (Holm) &lt; 0.05 with 2 or more seeds on both sides). "
                "<b>exploratory</b>: the best and next subsets were picked from these very results, so their test "
                "is not one planned in advance; read it as a lead, not a finding.") +
             html.table(pd.DataFrame(heads)) if heads else ""))
    out = [("training", "Training: the fixed model on each subset", text + _tail_html(tail_tables(groups)))]
    loss = _loss_section(groups)
    if loss:
        out.append(("loss", "Training loss", loss))
    sized = [(r.group.name, float(r.group.size), r.average, r.interval.low if r.interval else None,
              r.interval.high if r.interval else None) for r in rows if r.group.size]
    if sized:
        out.append(("size", "Average vs subset size", html.points(
            sized, "training samples in the subset", "average of main metrics", chance=_chance(rows[0].group, tasks))))
    robust = _robustness_section(groups)
    if robust:
        out.append(("robustness", "DiST and Patch Mixing", robust))
    return out


def _loss_section(groups: list[Group]) -> str:
    """Per subset, the training loss of each seed against samples seen (open_clip_train's step lines)."""
    charts = []
    for g in groups:
        series = {}
        for r in g.runs:
            steps = r.losses()
            if steps:
                series[r.name] = ([s for s, _ in steps], [v for _, v in steps])
        if series:
            charts.append(html.lines(series, "samples seen", "contrastive loss", g.name))
    if not charts:
        return ""
    return (html.note("The loss open_clip_train logged every 10 steps of each run (its <code>out.log</code>); "
                      "seeds of a subset should fall together.") + f'<div class="charts">{"".join(charts)}</div>')


def tail_tables(groups: list[Group]) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Per zero-shot task on a synthetic world's evaluation set (the set's parent folder holds the world's
    ``classes.parquet``): (task, the world's classes, one row per subset with the mean over seeds of the top-1
    accuracy averaged over the head classes and over the tail classes, and tail - head). The head and tail are the
    most and least frequent thirds of the classes in the pool (:func:`winnow.pipeline.synth.world.class_table`);
    subsets
    evaluated without per-class accuracy are left out."""
    from winnow.pipeline.synth.world import read_classes

    out = []
    for task in groups[0].tasks:
        classes = None if task.kind != KIND or task.diagnostic else read_classes(
            os.path.dirname(os.path.normpath(task.data)))
        if classes is None:
            continue
        sides = {side: list(classes.loc[classes["group"] == side, "class"]) for side in ("head", "tail")}
        rows = []
        for g in groups:
            per_seed = [_class_accuracy(r.out, task.name, CLASS_PREFIX) for r in g.runs]
            if not all(per_seed):
                continue
            acc = {side: float(np.mean([np.nanmean([m.get(c, np.nan) for c in names]) for m in per_seed]))
                   for side, names in sides.items()}
            rows.append({"subset": g.name, "seeds": len(g.runs), "head classes": acc["head"],
                         "tail classes": acc["tail"], "tail - head": acc["tail"] - acc["head"]})
        if rows:
            out.append((task.name, classes, pd.DataFrame(rows)))
    return out


def _class_accuracy(out: str, task: str, prefix: str) -> dict[str, float]:
    """A task's per-class accuracy (class -> value) from an evaluation's results lines; {} when it has none."""
    path = fsio.join(out, "eval_results.jsonl")
    lines = fsio.read_bytes(path).decode().splitlines() if fsio.exists(path) else []
    for row in map(json.loads, lines):
        if row.get("dataset") == task:
            return {k[len(prefix):]: v for k, v in row["metrics"].items() if k.startswith(prefix)}
    return {}


def _tail_html(tables: list[tuple[str, pd.DataFrame, pd.DataFrame]]) -> str:
    out = ""
    for name, classes, df in tables:
        share = {side: classes[classes["group"] == side] for side in ("head", "tail")}
        said = [f"{len(c)} {side} classes ({', '.join(c['class'])}: {c['pool'].sum() / classes['pool'].sum():.0%} "
                "of the pool)" for side, c in share.items()]
        shown = df.assign(**{"tail - head": df["tail - head"].map(lambda v: f"{v:+.3f}")})
        out += (f"<h3>Head and tail classes: {html.esc(name)}</h3>" + html.note(
            f"Zero-shot top-1 accuracy averaged over the {said[0]} and over the {said[1]}: the most and least "
            "frequent thirds of the classes in the long-tailed pool (the evaluation set is balanced); mean over "
            "seeds.") + html.table(shown))
    return out


def _chance(group: Group, tasks: list[str]) -> float | None:
    scores = [t.random_score for t in group.tasks if t.name in tasks]
    return float(np.mean(scores)) if scores else None


def _robustness_section(groups: list[Group]) -> str:
    from winnow.pipeline.evalsets.patchmix import TILES

    out = ""
    dist = [t for t in groups[0].tasks if t.kind == "odd_one_out"]
    for task in dist:
        rows, marks = [], []
        for g in groups:
            mean, est = g.mean(task.name), interval(g, [task.name])
            if mean is None:  # this subset was not evaluated on it
                continue
            values = g.values(task.name)
            above = "n/a" if est is None else "yes" if est.low > task.random_score else "no: overlaps chance"
            rows.append({"subset": g.name, "seeds": len(g.runs), "odd-one-out accuracy": f"{mean:.3f}",
                         "95% interval": ci_text(est), "above chance": above,
                         "seed spread": f"{np.ptp(values):.3f}" if len(values) > 1 else ""})
            marks.append((g.name, mean, est.low if est else None, est.high if est else None))
        if not rows:
            continue
        out += (f"<h3>DiST: {html.esc(task.name)}</h3>" + html.note(
            f"Odd-one-out accuracy on (original, two texture syntheses) triplets; chance {task.random_score:.3f} "
            "(dashed). Interval as in the training table: with few seeds it is wide (the seed term has seeds - 1 "
            "degrees of freedom); an interval that reaches chance does not show shape over texture.") +
            html.forest(marks, "odd-one-out accuracy", chance=task.random_score) + html.table(pd.DataFrame(rows)))
    curves = {c: t.random_score for t in groups[0].tasks if (c := t.curve)}
    charts, aucs = [], []
    for curve, chance in curves.items():
        series = {}
        for g in groups:
            got = [r.summary.get("curves", {}).get(curve) for r in g.runs]
            if all(got):
                series[g.name] = (got[0]["x"], list(np.mean([c["y"] for c in got], axis=0)))
        if not series:
            continue
        ticks = None
        if curve == "shuffle":
            ticks = [(x, str(t)) for x, t in zip(next(iter(series.values()))[0], TILES)]
        xlabel = {"occlude": "occluded share", "shuffle": "tiles shuffled"}.get(
            curve, "share of patches replaced" if curve.startswith("mix") else "share of patches dropped")
        charts.append(html.lines(series, xlabel, "zero-shot accuracy", f"Patch Mixing: {curve}", chance, ticks))
    from winnow.pipeline.tasks.curves import trapezoid_weights

    points = {c: [t for t in groups[0].tasks if t.curve == c] for c in curves}
    for g in groups:
        got = [r.summary.get("curves", {}) for r in g.runs]
        if any(got):
            row = {"subset": g.name, "seeds": len(g.runs)}
            for c in curves:
                if any(c in x for x in got):
                    est = interval(g, [t.name for t in points[c]], trapezoid_weights([t.x for t in points[c]]))
                    row[f"{c} area"] = f"{np.mean([x[c]['auc'] for x in got if c in x]):.3f}"
                    row[f"{c} 95%"] = ci_text(est)
            aucs.append(row)
    if charts:
        out += ("<h3>Patch Mixing</h3>" + html.note(
            "Zero-shot accuracy as foreign patches replace, tiles shuffle, patches drop or an occluder grows (mean "
            "over seeds); the dashed line is chance. Area: the normalised area under each curve, with its 95% "
            "interval over eval images and seeds (as the training table's).") +
            f'<div class="charts">{"".join(charts)}</div>' + (html.table(pd.DataFrame(aucs)) if aucs else ""))
    return out


def _timings_section(timings: dict) -> str:
    df = pd.DataFrame([{"step": k, "seconds": f"{v['s']:.1f}", "": "reused" if v["reused"] else "ran",
                        "made in (s)": f"{v['made_s']:.1f}" if "made_s" in v else ""} for k, v in timings.items()])
    return html.note("Wall-clock seconds of each demo step in its last run. <b>reused</b>: every stage of the step "
                     "found its output up to date from an earlier run (same parameters and inputs) and did no work; "
                     "the time is the check, and <b>made in</b> the time the step took when it did the work (when "
                     "an earlier report recorded it).") + html.table(df)



def diff_html(d: dict, out: str, top: int = 12) -> str:
    """The HTML page of ``winnow diff``: overlap, separating rules, states, who each keeps by group, and example
    thumbnails of the rows only in each."""
    images = Images(d["pool"])
    refs = {side: [(images.ask(e["part"], e["key"]), e) for e in rows if e["key"]]
            for side, rows in d["examples"].items()}
    images.load()
    sections = [("overlap", "Overlap", html.table(d["summary"]))]
    for name, rules in d["rules"].items():
        if len(rules):
            sections.append((name.split(",")[0].replace(" ", "-"), f"Rows {name} rule", html.table(rules)))
    groups = d["groups"].copy()
    body = html.note("Per group: the candidates (downloaded rows), how many each subset keeps and its kept share; "
                     "each breakdown sums to the totals. A filter that drops one language or one site wholesale "
                     "shows here.")
    for kind in dict.fromkeys(groups["by"]):
        part = groups[groups["by"] == kind].head(top).copy()
        part["A kept"] = [share(k, n) for k, n in zip(part["in A"], part["candidates"])]
        part["B kept"] = [share(k, n) for k, n in zip(part["in B"], part["candidates"])]
        body += f"<h3>{html.esc(kind)}</h3>" + html.table(part.drop(columns=["by"]))
    sections.append(("groups", "Who is kept, by group", body))
    sections.append(("states", "Pool rows by ledger state", html.table(d["states"])))
    shown = "".join(html.thumbs([(images.uri(ref), str(e.get("caption") or "")[:60], "") for ref, e in refs[side]],
                                label=f"{side} ({d['a'] if side.endswith('A') else d['b']})") for side in refs)
    sections.append(("examples", "Examples", shown))
    page = html.page(f"winnow diff: {d['a']} vs {d['b']}", f"Subsets of {html.esc(d['pool'])}.", sections)
    fsio.write_bytes(out, page.encode())
    return out
