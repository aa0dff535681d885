"""The demo's report: the tables it prints and ``report.md`` (with the Patch Mixing plots) it writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.core import fsio
from pipeline.data.ledger import format_counts


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
    timings: dict


def write(report: str, summary: dict, r: Results) -> None:
    """``summary.json``, the CSV tables, the Patch Mixing plots and ``report.md`` in the folder ``report``."""
    plots = plot_curves(summary["runs"], report)
    fsio.write_json(os.path.join(report, "summary.json"), summary)
    r.recall.to_csv(os.path.join(report, "selection_recall.csv"), index=False, float_format="%.4f")
    r.precision.to_csv(os.path.join(report, "selection_precision.csv"), index=False, float_format="%.4f")
    r.table.to_csv(os.path.join(report, "training.csv"), index=False, float_format="%.4f")
    r.robust.to_csv(os.path.join(report, "robustness.csv"), index=False, float_format="%.4f")
    lines = [
        "# Winnow demo report", "",
        "## The fixed model trained on each subset", "",
        f"Same training for every subset ({r.scale_line}); only the data differs. Columns: subset size, main "
        "metric of each task (zero-shot top-1 accuracy, retrieval mean recall@1), their average; with several "
        "seeds, the mean and the spread (max - min).", "",
        "```", format_table(r.table), "```", "",
        "## DiST and Patch Mixing", "",
        "DiST: odd-one-out accuracy on (original, two texture syntheses) triplets, chance 0.333 "
        f"({dist_line(r.dist_gates)}). Patch Mixing: normalised area under zero-shot accuracy vs the share "
        "of foreign patches (7x7, 14x14 grids), tiles shuffled, patches dropped, occluded share.", "",
        "```", format_table(r.robust), "```", "",
        *[f"![{p}]({p})" for p in plots], "",
        "## Timings (seconds)", "", "| stage | s |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in r.timings.items()], "",
        "## Ledger", "", "```", format_counts(r.counts, r.total), "```", "",
        "## Planted defects vs ledger state", "", "```", r.check.to_string(index=False), "```", "",
        "## Filters and recipes vs planted defects", "",
        "Over downloaded samples. `precision`: share of dropped samples that carry a planted defect; each defect "
        "column: share of the samples with that defect that the subset drops (recall).", "",
        "```", _fmt(r.recall), "```", "",
        "Per defect, share of the dropped samples that have it (precision by kind): "
        "`selection_precision.csv`.", "",
        "## Deduplication and decontamination vs planted truth", "",
        "A planted copy is found when it shares an exact or near group with its source; `precision`: share of "
        "the samples dedup drops that are true duplicates of their group's kept member; contamination: pool "
        "copies of evaluation images flagged.", "",
        "```", _fmt_dedup(r.dedup), "```", "",
    ]
    fsio.write_bytes(os.path.join(report, "report.md"), "\n".join(lines).encode())


def log_summary(r: Results, pool: str, dedup_cfg, paths: dict, log) -> None:
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
    log(format_table(r.table))
    log("\nThe same models on DiST (odd-one-out accuracy, chance 0.333) and Patch Mixing (area under accuracy vs "
        "share of foreign patches / tiles / dropped patches / occlusion; plots in the report folder):")
    log(format_table(r.robust))
    log("DiST set: " + dist_line(r.dist_gates))
    log(f"\ntimings (s): {json.dumps(r.timings)}")
    log("outputs: " + " | ".join(f"{k} {v}" for k, v in paths.items()))
