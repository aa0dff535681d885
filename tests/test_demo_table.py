"""The demo's training table: mean and spread over seeds, per subset."""

import pytest

from workflows.demo import format_table, results_table


def result(seed, zs, ret):
    return {"seed": seed, "tasks": {"shapes": zs, "retrieval": ret}, "average": (zs + ret) / 2}


def test_mean_and_spread_over_seeds():
    trained = {"no_filter": [result(0, 0.10, 0.02), result(1, 0.14, 0.04)],
               "dfn_30pct": [result(0, 0.30, 0.05), result(1, 0.20, 0.03)]}
    table = results_table(trained, {"no_filter": 4500, "dfn_30pct": 1300}).set_index("subset")
    assert table.loc["no_filter", "size"] == 4500 and table.loc["no_filter", "seeds"] == 2
    assert table.loc["no_filter", "shapes"] == pytest.approx(0.12)
    assert table.loc["no_filter", "shapes spread"] == pytest.approx(0.04)
    assert table.loc["dfn_30pct", "average"] == pytest.approx(0.145)
    assert table.loc["dfn_30pct", "average spread"] == pytest.approx(0.175 - 0.115)
    assert "spread" in format_table(table.reset_index())


def test_one_seed_hides_the_spread_columns():
    table = results_table({"basic": [result(0, 0.2, 0.1)]}, {"basic": 10})
    shown = format_table(table)
    assert "spread" not in shown and "0.200" in shown and "0.150" in shown
