"""Measuring stages against the synthetic world's planted truth (used by the demo and tests, never by filters)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from winnow.pipeline.data.pool import read_states
from winnow.pipeline.data.uid import array_to_uids

from .world import expected_state, read_truth


def ingest_check(pool: str, world: str, ingest) -> pd.DataFrame:
    """Per planted defect: rows, the state it must end in (given ``ingest``, the IngestConfig), how many did, and
    the states seen."""
    joined = read_truth(world).merge(read_states(pool)[["uid", "state"]], on="uid", how="left")
    joined["expected"] = [expected_state(d, ingest.min_image_size, ingest) for d in joined["defect"]]
    joined["matched"] = joined["state"] == joined["expected"]
    table = joined.groupby("defect").agg(
        rows=("uid", "size"), expected=("expected", "first"), matched=("matched", "sum"),
        states=("state", lambda s: ", ".join(f"{k} {v}" for k, v in s.value_counts().items())),
    )
    return table.reset_index()


def selection_check(pool: str, world: str, subsets: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How well each subset drops planted defects, over the downloaded (ok) samples.

    Returns two tables, one row per subset: ``summary`` (kept, dropped, precision = share of dropped samples that
    carry any planted defect, recall of each defect kind = share of that kind dropped) and ``precision`` (per kind:
    share of the dropped samples that are of that kind).
    """
    truth = read_truth(world).merge(read_states(pool)[["uid", "state"]], on="uid")
    truth = truth[truth["state"] == "ok"]
    kinds = [k for k in truth["defect"].value_counts().index if k != "none"]
    rows, prec_rows = [], []
    for name, arr in subsets.items():
        kept = truth["uid"].isin(set(array_to_uids(arr)))
        dropped = ~kept
        row = {"subset": name, "kept": int(kept.sum()), "dropped": int(dropped.sum()),
               "precision": float((truth.loc[dropped, "defect"] != "none").mean()) if dropped.any() else float("nan")}
        prec = {"subset": name}
        for kind in kinds:
            is_kind = truth["defect"] == kind
            row[kind] = float((is_kind & dropped).sum() / is_kind.sum())
            prec[kind] = float((is_kind & dropped).sum() / dropped.sum()) if dropped.any() else float("nan")
        rows.append(row)
        prec_rows.append(prec)
    return pd.DataFrame(rows), pd.DataFrame(prec_rows)


def dedup_check(pool: str, world: str, table: pd.DataFrame) -> pd.DataFrame:
    """Per planted duplicate kind and for contamination: how many planted pairs the dedup table finds, and how
    many of the samples it drops are true duplicates (over downloaded samples).

    A planted copy counts as found when it and its source share an ``exact_image`` or ``near`` group (or, for
    eval copies, when it is flagged ``contaminated``). A dropped sample is a true duplicate when some planted
    relation links it to its group's kept member: copy and source, two copies of one source, two copies of one
    evaluation image, or two members of one boilerplate cluster (near-identical by construction). The
    ``boilerplate`` row: cluster members in a group with another member of their cluster.
    """
    truth = read_truth(world).merge(read_states(pool)[["uid", "state"]], on="uid")
    truth = truth[truth["state"] == "ok"]
    ok = set(truth["uid"])
    # the "family" of a sample: the source it copies (or itself), the eval image it copies, its boilerplate cluster
    family = {u: (s if isinstance(s, str) else u) for u, s in zip(truth["uid"], truth["source_uid"])}
    for u, d, e in zip(truth["uid"], truth["defect"], truth["eval_index"]):
        if d == "eval_copy":
            family[u] = f"eval/{e}"
    cluster = truth["cluster"] if "cluster" in truth else pd.Series(-1, index=truth.index)  # older worlds: none
    for u, c in zip(truth["uid"], cluster):
        if c >= 0:
            family[u] = f"cluster/{c}"
    rows = []
    groups = table[table["kind"].isin(["exact_image", "near"])]
    group_of: dict[str, set[str]] = {}
    in_group: dict[str, set[str]] = {}
    for u, g in zip(groups["uid"], groups["group"]):
        group_of.setdefault(u, set()).add(g)
        in_group.setdefault(g, set()).add(u)
    for kind in ("exact_duplicate", "near_reencode", "near_resize", "near_crop"):
        planted = truth[(truth["defect"] == kind) & truth["source_uid"].isin(ok)]
        found = [bool(group_of.get(u, set()) & group_of.get(s, set())) for u, s in
                 zip(planted["uid"], planted["source_uid"])]
        rows.append({"kind": kind, "planted": len(planted), "found": int(sum(found)),
                     "recall": float(np.mean(found)) if found else float("nan")})
    members = truth[cluster >= 0]
    if len(members):
        found = [any(family.get(v) == family[u] for g in group_of.get(u, ()) for v in in_group[g] if v != u)
                 for u in members["uid"]]
        rows.append({"kind": "boilerplate", "planted": len(members), "found": int(sum(found)),
                     "recall": float(np.mean(found))})
    dropped = groups[~groups["kept"]].drop_duplicates("uid")
    true = [family.get(u) == family.get(g) for u, g in zip(dropped["uid"], dropped["group"])]
    rows.append({"kind": "all duplicates (dropped)", "planted": int(truth["defect"].isin(
        ["exact_duplicate", "near_reencode", "near_resize", "near_crop"]).sum()), "found": int(sum(true)),
        "recall": float("nan"), "dropped": len(dropped),
        "precision": float(np.mean(true)) if true else float("nan")})
    flagged = set(table.loc[table["kind"] == "contaminated", "uid"])
    copies = set(truth.loc[truth["defect"] == "eval_copy", "uid"])
    rows.append({"kind": "eval_copy (contaminated)", "planted": len(copies), "found": len(copies & flagged),
                 "recall": len(copies & flagged) / len(copies) if copies else float("nan"),
                 "dropped": len(flagged),
                 "precision": len(copies & flagged) / len(flagged) if flagged else float("nan")})
    return pd.DataFrame(rows)
