"""The README's demo figures, made by a command and checked by a test.

``make demo`` writes ``runs/demo/report/figures.json`` (:func:`figures`: the training comparison, the dedup check,
the ledger and the time, plus the demo settings they depend on) and says at its end whether they equal the ones
recorded in ``benchmarks/results/demo.json``, which the README quotes. ``make readme-figures``
(``python -m winnow.workflows.readme runs/demo``) records a demo's figures and rewrites the README's block between
``<!-- demo-figures -->`` and ``<!-- /demo-figures -->`` from them (:func:`block`); ``tests/test_readme.py`` checks
that the block is what the recorded figures give and that they were made with the current demo settings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "results" / "demo.json"
BEGIN, END = "<!-- demo-figures -->", "<!-- /demo-figures -->"


def settings(cfg: dict) -> dict:
    """The demo settings its figures depend on (a change in any of them makes recorded figures stale)."""
    demo, synth = cfg["demo"], cfg["synth"]
    return {"synth": {k: synth[k] for k in ("seed", "n_pool", "n_clean", "n_eval_per_class")},
            "demo": {k: demo[k] for k in ("scale", "arch", "seeds", "train")},
            "dedup": {k: demo["dedup"][k] for k in ("tag", "near_threshold", "contamination_threshold")}}


def figures(summary: dict, rows: list) -> dict:
    """What the README quotes from one demo run: ``summary`` is the demo's ``report/summary.json`` and ``rows``
    its training table (:func:`winnow.workflows.compare.table`)."""
    base = rows[0]
    comparison = []
    for r in rows:
        item = {"subset": r.group.name, "samples": r.group.size, "seeds": len(r.group.runs),
                "average": round(r.average, 3),
                "interval": [round(r.interval.low, 3), round(r.interval.high, 3)] if r.interval else None}
        if r is not base and r.vs is not None:
            item |= {"vs": round(r.average - base.average, 3), "vs_interval": [round(r.vs.low, 3),
                                                                                 round(r.vs.high, 3)],
                     "p_holm": round(r.p_holm, 3), "verdict": r.verdict}
        comparison.append(item)
    dedup = [{k: _number(d.get(k), 2 if k in ("recall", "precision") else 0)
              for k in ("planted", "found", "recall", "dropped", "precision")} | {"kind": d["kind"]}
             for d in summary.get("dedup_check", [])]
    seconds = sum(t.get("made_s", t["s"]) if t.get("reused") else t["s"] for t in summary["timings"].values())
    training = next((t for k, t in summary["timings"].items() if k.startswith("train + evaluate")), {"s": 0})
    return {"settings": settings(summary["config"]), "baseline": base.group.name, "comparison": comparison,
            "dedup": dedup, "ledger": {"input": summary["input_rows"], "ok": summary["ledger"].get("ok", 0)},
            "minutes": round(seconds / 60, 1),
            "training_minutes": round(training.get("made_s", training["s"]) / 60, 1)}


def _number(v, digits: int):
    """A figure as JSON keeps it: None for a missing or NaN value, a whole number for counts."""
    if v is None or v != v:
        return None
    return int(round(v)) if digits == 0 else round(float(v), digits)


def _cell(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def block(f: dict) -> str:
    """The README's markdown for recorded figures ``f``."""
    s = f["settings"]
    lines = [BEGIN, "",
             f"Recorded from `make demo` (`benchmarks/results/demo.json`; pool of {s['synth']['n_pool']:,} URLs, "
             f"seed {s['synth']['seed']}, scale {s['demo']['scale']}, seeds {', '.join(map(str, s['demo']['seeds']))}"
             f"): {f['minutes']:g} minutes on 2 CPU cores, {f['training_minutes']:g} of them training and "
             f"evaluating; {f['ledger']['ok']:,} of {f['ledger']['input']:,} URLs downloaded.", "",
             f"| subset | samples | seeds | average [95%] | vs {f['baseline']} [95%] | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in f["comparison"]:
        avg = f"{c['average']:.3f}" + (f" [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}]" if c["interval"] else "")
        vs = (f"{c['vs']:+.3f} [{c['vs_interval'][0]:+.3f}, {c['vs_interval'][1]:+.3f}]" if "vs" in c else "")
        p = (f"{c['p_holm']:.3f}" if c["p_holm"] >= 0.001 else "<0.001") if "vs" in c else ""
        lines.append(f"| {c['subset']} | {_cell(c['samples'], ',')} | {c['seeds']} | {avg} | {vs} | {p} | "
                     f"{c.get('verdict', '')} |")
    if f["dedup"]:
        lines += ["", f"Dedup against the planted duplicates (descriptor `{s['dedup']['tag']}`, near cosine >= "
                      f"{s['dedup']['near_threshold']:g}, contamination >= {s['dedup']['contamination_threshold']:g}):",
                  "", "| kind | planted | found | recall | dropped | precision of what it drops |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {d['kind']} | {_cell(d['planted'], ',')} | {_cell(d['found'], ',')} | {_cell(d['recall'], '.2f')}"
                  f" | {_cell(d['dropped'], ',')} | {_cell(d['precision'], '.2f')} |" for d in f["dedup"]]
    return "\n".join(lines + ["", END])


def rewrite(readme: Path, f: dict) -> None:
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + block(f) + text[end:])


def differences(run: dict, recorded: dict) -> list[str]:
    """Where a run's figures differ from the recorded ones, in words."""
    out = []
    for key in ("settings", "baseline", "ledger", "dedup"):
        if run.get(key) != recorded.get(key):
            out.append(key)
    mine = {c["subset"]: c for c in run["comparison"]}
    for c in recorded["comparison"]:
        other = mine.get(c["subset"])
        for k in ("average", "vs", "p_holm", "verdict"):
            if other is None or other.get(k) != c.get(k):
                out.append(f"{c['subset']} {k} {c.get(k)} (this run {None if other is None else other.get(k)})")
                break
    return out


def main(argv: list[str]) -> int:
    demo = argv[0] if argv else "runs/demo"
    path = os.path.join(demo, "report", "figures.json")
    if not os.path.isfile(path):
        print(f"no {path}: run `make demo` first", file=sys.stderr)
        return 2
    f = json.loads(Path(path).read_text())
    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    RECORDED.write_text(json.dumps(f, indent=2) + "\n")
    rewrite(ROOT / "README.md", f)
    print(f"recorded {path} in {RECORDED.relative_to(ROOT)} and rewrote the README's demo figures")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
