"""The stage skeleton: every stage runs through one executor, which owns skip, resume, completion markers and
the manifest (datatrove's executor is the model). A stage supplies its task list and a function of one task.

    stage = Stage("embed", out, params=asdict(cfg), inputs=[...], runner=runner, overwrite=overwrite, log=log)
    if stage.done:                                  # same stage, parameters and inputs already finished
        return stage.manifest
    stats = stage.map(embed_shard, tasks)           # only the tasks without a marker run; stats of all of them
    return stage.finish(rows=sum_counts(stats))

A task is a small frozen dataclass with a ``marker`` property: the path of a JSON file holding the task's stats,
which the stage writes (atomically) when the task's function has returned them (:class:`Marked`). A task with a marker
is finished and is not run again, so an
interrupted stage resumes where it stopped, whatever killed it. ``Stage.map`` returns every task's stats, read
from the markers, in task order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from winnow.pipeline.core import fsio
from winnow.pipeline.data.manifest import StageRun, describe_inputs, read_manifest, unlock


class Stage:
    """One stage writing into the folder ``out``; decides skip / resume / fresh when created.

    Args:
        name: the stage (``ingest``, ``embed``...), recorded in its run files.
        out: the output folder (its ``_run.json`` and ``_manifest.json`` live there).
        params: the stage's configuration; another value is another run.
        inputs: files whose content fingerprints identify the input (another content is another run).
        runner: a :class:`winnow.pipeline.run.runner.Runner` for :meth:`map` (None: tasks run in this process).
        overwrite / protect / enclosing: see :meth:`winnow.pipeline.data.manifest.StageRun.open`.
        redo: a finished run of this stage with these parameters whose inputs have changed since (a pool
            retried) is redone without ``--overwrite`` (for cheap outputs derived from their inputs: subsets,
            reshards); otherwise it is refused, as any other run in the folder.
    """

    def __init__(self, name: str, out: str, params: dict, inputs: Sequence[str] = (), runner=None,
                 overwrite: bool = False, protect: Sequence[str] = (), enclosing: Sequence[str] = (), log=print,
                 redo: bool = False):
        self.name, self.out, self.runner, self.log = name, out, runner, log
        self.run = StageRun(name, out, params=params, inputs=describe_inputs(list(inputs)))
        self.mode = self.run.open(overwrite=overwrite, protect=list(protect), enclosing=list(enclosing), log=log,
                                  redo=redo)
        if self.done:
            log(f"{name}: {out} is up to date; nothing to do")
        else:  # the folder is this run's now: what killed runs left half-written goes
            fsio.sweep_stale(out)

    @property
    def done(self) -> bool:
        """True when this stage already finished with the same parameters and inputs."""
        return self.mode == "skip"

    @property
    def manifest(self) -> dict:
        return read_manifest(self.out)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], label: str | None = None,
            unit: str = "tasks", sizes: Sequence[int] | None = None) -> list[dict]:
        """Run ``fn`` on the tasks without a marker; return the stats of every task (from the markers). ``sizes``:
        rows of each task, for the runner's lines of rows done (tasks report them with ``task_progress``)."""
        tasks = list(tasks)
        pending = [not fsio.exists(t.marker) for t in tasks]
        todo = [t for t, p in zip(tasks, pending) if p]
        todo_sizes = [n for n, p in zip(sizes, pending) if p] if sizes is not None else None
        if len(todo) < len(tasks) and self.mode == "resume":
            self.log(f"{self.name}: resuming: {len(tasks) - len(todo)} of {len(tasks)} {unit} already done")
        if todo:
            marked = Marked(fn)
            try:
                if self.runner is None:
                    for task in todo:
                        marked(task)
                else:
                    self.runner.map(marked, todo, label=label or self.name, sizes=todo_sizes)
            except BaseException:
                unlock(self.out)  # a rerun, in this process or another, resumes
                raise
        return [fsio.read_json(t.marker) for t in tasks]

    def finish(self, rows: dict[str, int], outputs: list[str] | None = None, **extra: Any) -> dict:
        """Write the manifest (row counts, outputs with sizes, anything in ``extra``); return it."""
        return self.run.finish(rows=rows, outputs=outputs, **extra)


@dataclass(frozen=True)
class Marked:
    """A task function whose returned stats become the task's marker: written (atomically) after the function
    returned, i.e. after every output it wrote, so a task with a marker is finished. Stages only return."""

    fn: Callable[[Any], Any]

    def __call__(self, task: Any) -> Any:
        stats = self.fn(task)
        fsio.write_json(task.marker, stats)
        return stats


def sum_counts(stats: Sequence[dict], skip: Sequence[str] = ("duration", "start_time", "end_time")) -> dict:
    """The integer fields of the tasks' stats, summed (nested dicts such as per-state counts summed per key)."""
    total: dict = {}
    for s in stats:
        for k, v in s.items():
            if k in skip:
                continue
            if isinstance(v, dict):
                sub = total.setdefault(k, {})
                for kk, vv in v.items():
                    if isinstance(vv, int) and not isinstance(vv, bool):
                        sub[kk] = sub.get(kk, 0) + vv
            elif isinstance(v, int) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total
