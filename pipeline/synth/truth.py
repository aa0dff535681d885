"""Measuring stages against the synthetic world's planted truth (used by the demo and tests, never by filters)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..pool import read_states
from ..uid import array_to_uids
from .world import expected_state, read_truth


def ingest_check(pool: str, world: str, min_image_size: int) -> pd.DataFrame:
    """Per planted defect: rows, the state it must end in, how many did, and the states seen."""
    joined = read_truth(world).merge(read_states(pool)[["uid", "state"]], on="uid", how="left")
    joined["expected"] = [expected_state(d, min_image_size) for d in joined["defect"]]
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
