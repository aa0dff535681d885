"""The demo's training table: mean and spread over seeds, per subset."""

import pytest

from winnow.workflows.report import format_table, results_table, robustness_table, timing_text

TASKS = ["shapes", "retrieval"]


def result(seed, zs, ret, dist=0.5, auc=0.1):
    return {"seed": seed, "tasks": {"shapes": zs, "retrieval": ret, "dist": dist, "patchmix-mix-g7-r0.0": zs},
            "average": 0.0, "curves": {"mix-g7": {"x": [0.0, 0.5], "y": [zs, 0.0], "auc": auc}}}


def test_mean_and_spread_over_seeds():
    trained = {"no_filter": [result(0, 0.10, 0.02), result(1, 0.14, 0.04)],
               "dfn_30pct": [result(0, 0.30, 0.05), result(1, 0.20, 0.03)]}
    table = results_table(trained, {"no_filter": 4500, "dfn_30pct": 1300}, TASKS).set_index("subset")
    assert table.loc["no_filter", "size"] == 4500 and table.loc["no_filter", "seeds"] == 2
    assert table.loc["no_filter", "shapes"] == pytest.approx(0.12)
    assert table.loc["no_filter", "shapes spread"] == pytest.approx(0.04)
    assert table.loc["dfn_30pct", "average"] == pytest.approx(0.145)
    assert table.loc["dfn_30pct", "average spread"] == pytest.approx(0.175 - 0.115)
    assert "spread" in format_table(table.reset_index())


def test_one_seed_hides_the_spread_columns():
    table = results_table({"basic": [result(0, 0.2, 0.1)]}, {"basic": 10}, TASKS)
    shown = format_table(table)
    assert "spread" not in shown and "0.200" in shown and "0.150" in shown


def test_main_table_averages_only_its_tasks_and_robustness_has_its_own():
    trained = {"basic": [result(0, 0.2, 0.1, dist=0.4, auc=0.12), result(1, 0.3, 0.1, dist=0.6, auc=0.08)]}
    table = results_table(trained, {"basic": 10}, TASKS).set_index("subset")
    assert table.loc["basic", "average"] == pytest.approx(0.175)  # the robustness tasks do not enter it
    assert "dist" not in table.columns
    robust = robustness_table(trained).set_index("subset")
    assert robust.loc["basic", "dist"] == pytest.approx(0.5)
    assert robust.loc["basic", "dist spread"] == pytest.approx(0.2)
    assert robust.loc["basic", "mix-g7 auc"] == pytest.approx(0.10)
    assert "0.500" in format_table(robust.reset_index())


def test_a_step_whose_stages_are_up_to_date_is_marked_reused(tmp_path):
    from winnow.pipeline.core import fsio
    from winnow.pipeline.run.stage import Stage
    from winnow.workflows.demo import Timings

    timings = Timings(str(tmp_path))

    def step():
        stage = Stage("x", str(tmp_path / "x"), {"a": 1}, log=lambda m: None)
        if not stage.done:
            stage.finish(rows={})

    for name in ("first", "again"):
        with timings.stage(name):
            step()
    assert timings["first"]["reused"] is False and timings["again"]["reused"] is True
    assert timing_text(timings["again"]).startswith("reused") and "reused" not in timing_text(timings["first"])
    fsio.write_json(str(tmp_path / "report" / "summary.json"), {"timings": {"first": {"s": 41.5, "reused": False}}})
    rerun = Timings(str(tmp_path))
    with rerun.stage("first"):
        step()
    assert rerun["first"]["reused"] and rerun["first"]["made_s"] == 41.5  # the time it took when it did the work
    assert "made in 41.5 s" in timing_text(rerun["first"])
