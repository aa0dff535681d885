"""The per-URL CPU budget (a runaway block is stopped, its neighbours and everything after it are not) and the
stall guard's blame (only rows at work when the download process stopped, never rows that were waiting)."""

from __future__ import annotations

import threading
import time

from winnow.pipeline.core.budget import OverBudget, cpu_budget
from winnow.pipeline.stages.ingest import _in_flight


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_block_over_its_cpu_budget_is_stopped_and_nothing_else_is():
    outcome: dict[int, str] = {}

    def row(i: int) -> None:
        try:
            with cpu_budget(0.3):
                _spin(60.0 if i % 2 else 0.05)  # odd rows run away
            outcome[i] = "ok"
        except OverBudget:
            outcome[i] = "over"
        _spin(0.5)  # work after the block, longer than the budget, is never interrupted
        outcome[i] += " after"

    threads = [threading.Thread(target=row, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcome == {i: ("over after" if i % 2 else "ok after") for i in range(6)}


def test_the_budget_counts_cpu_time_not_waiting():
    with cpu_budget(0.2):
        time.sleep(0.6)  # sleeping spends no CPU: not stopped


def test_only_rows_at_work_are_blamed_for_a_stall(tmp_path):
    progress = tmp_path / "progress.log"
    # 0 written; 1 downloading; 2 waiting for a decode slot; 3 decoding; 4 prepared, waiting to be written
    progress.write_text("+0\n~0\n*0\n=0\n-0\n+1\n+2\n~2\n+3\n~3\n*3\n+4\n~4\n*4\n=4\n+5")
    assert _in_flight(str(progress)) == [1, 3]  # "+5" has no newline yet: maybe cut short, not read
