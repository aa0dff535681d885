"""The runner: the only module that knows Dask.

Stages are plain functions of one unit of work (a shard); :meth:`Runner.map` runs one over many units on a Dask
cluster and reports progress. By default the runner starts an embedded ``LocalCluster`` of worker processes
(and stops it on exit); ``scheduler="tcp://host:8786"`` uses an existing cluster instead (for example one that
dask-jobqueue started on SLURM, see the README), and ``scheduler="sync"`` runs in-process without Dask (for
debugging with pdb, and for unit tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures as concurrent_futures
from dataclasses import dataclass
from typing import Any

from winnow.pipeline.core.errors import RunFailed, UserError, describe


@dataclass
class ClusterConfig:
    """Where stages run.

    Args:
        scheduler: address of a running Dask scheduler (``tcp://host:8786``); empty for an embedded
            LocalCluster; ``"sync"`` to run in-process.
        n_workers: worker processes of the embedded cluster (default: the number of CPU cores, at least 2).
        threads_per_worker: threads in each worker process (stages are CPU-bound Python: keep 1).
        memory_limit: per-worker memory limit of the embedded cluster (Dask syntax, e.g. "4GiB" or "auto").
        dashboard_address: where the embedded cluster serves its dashboard (":0" picks a free port).
        retries: times Dask re-runs a task whose worker died (stages are idempotent per shard).
        progress_every: seconds between the lines of rows done inside running tasks (ingest's shards, embed).
    """

    scheduler: str = ""
    n_workers: int = 0
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard_address: str = ":0"
    retries: int = 1
    progress_every: float = 5.0

    def __post_init__(self) -> None:
        if self.n_workers < 0 or self.threads_per_worker < 1 or self.retries < 0 or not self.progress_every > 0:
            raise UserError("cluster: n_workers >= 0, threads_per_worker >= 1, retries >= 0 and progress_every > 0 "
                            "are required")


class TaskFailed(RuntimeError):
    """A stage raised on one or more units; completed units are kept, so a rerun resumes."""


def _name(item: Any, index: int) -> str:
    """How a task is named in messages: its shard when it has one."""
    for attr, what in (("shard_id", "shard"), ("out_id", "output shard")):
        if isinstance(getattr(item, attr, None), int):
            return f"{what} {getattr(item, attr):08d}"
    stem = getattr(item, "stem", None) or getattr(getattr(item, "part", None), "stem", None)
    return f"part {stem}" if stem else f"task {index + 1}"


class _QuietTaskFailures(logging.Filter):
    """Drops the worker's "Compute Failed" log (a traceback per failed task): :meth:`Runner.map` reports every
    failure itself, in one line naming the shard and the cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def _quiet_worker_logs(dask_worker=None) -> None:
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _QuietTaskFailures) for f in logger.filters):
        logger.addFilter(_QuietTaskFailures())


@contextlib.contextmanager
def _quiet_startup():
    """Dask logs a traceback per worker that fails to start ("Nanny failed to start"); the start's own
    exception says it once, in one line."""
    loggers = [logging.getLogger(n) for n in ("distributed.nanny", "distributed.deploy.spec", "distributed.core")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


STARTUP_SECONDS = 120


def _user_script() -> bool:
    """True when this process runs a user's script file (``python my_script.py``). Dask's LocalCluster spawns its
    workers with multiprocessing, which imports the main script again in every worker: an unguarded script
    (no ``if __name__ == "__main__":``, as people write them) would run itself there and fail. The ``winnow``
    command, ``python -m ...``, notebooks and test runners are not such scripts."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return bool(path) and getattr(main, "__spec__", None) is None and os.path.basename(path) != "winnow"


def _script_cluster(n: int, cfg: ClusterConfig, environ: dict):
    """A local cluster whose scheduler and workers are separate programs (Dask's SubprocessCluster), so nothing
    imports the user's script again."""
    from distributed.deploy.subprocess import SubprocessCluster

    os.environ["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"] = repr(environ)  # read by the nanny processes
    return SubprocessCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker,
                             dashboard_address=cfg.dashboard_address, silence_logs=logging.ERROR,
                             worker_kwargs={"memory_limit": cfg.memory_limit})


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _UserFailure:
    """What a task returns instead of raising a :class:`UserError`: Dask then neither retries it nor logs a
    traceback, and :meth:`Runner.map` raises the same one-line UserError on the driver."""

    message: str


@dataclass(frozen=True)
class _Call:
    """``fn`` as a task: a UserError it raises comes back as a :class:`_UserFailure`."""

    fn: Callable[[Any], Any]

    def __call__(self, item: Any) -> Any:
        try:
            return self.fn(item)
        except UserError as exc:
            return _UserFailure(str(exc))


_PROGRESS_TOPIC = "winnow-progress"
_ACTIVE: list = []  # runners made current by Runner.activate
_local = threading.local()  # in-process runs: where task_progress reports go


def task_progress(done: int, total: int) -> None:
    """Report from inside a running task how far it is (``done`` of its ``total`` rows); :meth:`Runner.map`
    prints the sum over its tasks every few seconds. Does nothing outside a task of :meth:`Runner.map`."""
    sink = getattr(_local, "sink", None)
    if sink is not None:
        sink(done, total)
        return
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except (ImportError, ValueError, AttributeError):  # not in a Dask task
        return
    if key is not None:
        worker.log_event(_PROGRESS_TOPIC, {"key": str(key), "done": int(done), "total": int(total)})


class Runner:
    """Context manager owning the Dask client (if any) for the duration of a command."""

    def __init__(self, config: ClusterConfig | None = None, log: Callable[[str], None] = _say):
        self.config = config or ClusterConfig()
        self.log = log
        self.client = None
        self._cluster = None
        self._started = False
        self._closing = None  # a release()'s shutdown thread
        self._starting = None  # a prestart()'s start thread

    @property
    def n_workers(self) -> int:
        if self.client is None:
            return 1
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def __enter__(self) -> Runner:
        return self

    @staticmethod
    def active() -> Runner | None:
        """The runner made current by :meth:`activate` (``with winnow.cluster():``), if any."""
        return _ACTIVE[-1] if _ACTIVE else None

    def activate(self):
        """Make this the runner every command in the block uses (instead of starting its own)."""

        @contextlib.contextmanager
        def block():
            _ACTIVE.append(self)
            try:
                yield self
            finally:
                _ACTIVE.remove(self)

        return block()

    def start(self) -> None:
        """Connect to / start the cluster. Done lazily by the first :meth:`map`, so that input and config checks
        that fail before any work is submitted do not pay for (or print) a cluster start."""
        if self._started:
            return
        self._started = True
        cfg = self.config
        if cfg.scheduler == "sync":
            self.log("runner: in-process (no Dask cluster)")
            return
        from dask.distributed import Client, LocalCluster

        if cfg.scheduler:
            try:
                self.client = Client(cfg.scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise UserError(f"cannot reach the Dask scheduler at {cfg.scheduler!r} ({describe(exc)}); give "
                                "an address like tcp://HOST:8786, or omit --scheduler for a local cluster") from None
            self.log(f"runner: connected to Dask scheduler {cfg.scheduler} ({self.n_workers} workers)")
        else:
            import dask

            n = self._local_workers()
            # Dask sets MALLOC_TRIM_THRESHOLD_ in workers, which turns off glibc's adaptive mmap threshold: every
            # image-sized array is then mmap'd and page-faulted afresh, measured here at 2x slower rendering.
            environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
            environ.pop("MALLOC_TRIM_THRESHOLD_", None)
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _quiet_startup():
                try:
                    if _user_script():
                        self._cluster = _script_cluster(n, cfg, environ)
                    else:
                        self._cluster = LocalCluster(
                            n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True,
                            memory_limit=cfg.memory_limit, dashboard_address=cfg.dashboard_address,
                            silence_logs=logging.ERROR,
                        )
                    self.client = Client(self._cluster)
                    self.client.wait_for_workers(n, timeout=STARTUP_SECONDS)
                except Exception as exc:  # noqa: BLE001 - a worker that dies while starting, a port, memory
                    raise RunFailed(f"the local Dask cluster of {n} worker processes could not start "
                                    f"({describe(exc)}); check free memory and ports, try fewer with --workers, "
                                    "or run in-process with --scheduler sync") from None
            self.log(f"runner: local Dask cluster, {n} worker processes x {cfg.threads_per_worker} thread(s)")
        self.client.register_worker_callbacks(setup=_quiet_worker_logs)  # also on workers that join later
        for name in ("distributed.client", "distributed.utils"):  # a lost scheduler: one line from map, no tracebacks
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.log(f"runner: Dask dashboard at {self.client.dashboard_link}")

    def prestart(self) -> None:
        """Start the cluster in a background thread now, so that it starts while the driver works; the next
        :meth:`map` waits for it (and raises what the start raised)."""

        if self._started or self._starting is not None:
            return

        def start() -> None:
            try:
                self.start()
            except BaseException as exc:  # noqa: BLE001 - handed to the next map()
                self._start_error = exc

        self._start_error = None
        self._starting = threading.Thread(target=start, daemon=True)
        self._starting.start()

    def _wait_started(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting, error = None, self._start_error
            if error is not None:
                self._started = False
                raise error
        self.start()

    def release(self) -> None:
        """No more work for now: close the cluster in a background thread (joined on exit), so that its shutdown
        overlaps the driver's remaining work. A later :meth:`map` starts it again."""

        client, cluster = self.client, self._cluster
        self.client = self._cluster = None
        self._started = False
        if client is not None or cluster is not None:
            if self._closing is not None:
                self._closing.join()
            self._closing = threading.Thread(target=self._close, args=(client, cluster), daemon=True)
            self._closing.start()

    @staticmethod
    def _close(client, cluster) -> None:
        if client is not None:
            client.close(timeout=10)
        if cluster is not None:
            cluster.close()

    def __exit__(self, *exc: Any) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        self._close(self.client, self._cluster)
        if self._closing is not None:
            self._closing.join()
        self.client = self._cluster = self._closing = None
        self._started = False

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], label: str,
            on_result: Callable[[Any, Any], None] | None = None, sizes: Sequence[int] | None = None,
            unit: str = "rows", threads: bool = False) -> list[Any]:
        """Run ``fn(item)`` for every item; return results in item order.

        Progress is reported as counts (at most one line a second, and the last one always); tasks that call
        :func:`task_progress` also get a line of rows done every ``config.progress_every`` seconds (``sizes``: the rows
        of each item, for the total). ``on_result(item, result)`` runs on the driver as each result arrives. If
        any task raises, the others still finish (their outputs are committed) and :class:`TaskFailed` names the
        failed items; a :class:`UserError` raised in a task is raised here as it is (one line, no resume).

        ``threads``: the tasks spend most of their time outside the GIL (Arrow decoding, numpy): when this runner
        would start a local cluster and none is running, they run on that many threads of this process instead,
        which saves the cluster's start and stop (seconds) for work that takes about as long.
        """
        items = list(items)
        rows = _RowProgress(label, sizes, self.log, self.config.progress_every, unit)
        if threads and self.in_driver():
            return self._map_threads(fn, items, label, on_result, rows)
        self._wait_started()
        results: list[Any] = [None] * len(items)
        failures: list[tuple[int, BaseException]] = []
        progress = _Progress(label, len(items), self.log)
        if not items:
            return results
        if self.client is None:
            return self._map_here(fn, items, on_result, progress, rows)

        from dask.distributed import as_completed

        futures = self.client.map(_Call(fn), items, pure=False, retries=self.config.retries,
                                  key=[f"{label}-{i}-{time.time_ns()}" for i in range(len(items))])
        index = {f.key: i for i, f in enumerate(futures)}

        def on_event(event) -> None:  # on the client's event loop thread
            msg = event[1]
            if isinstance(msg, dict) and msg.get("key") in index:
                rows.update(index[msg["key"]], msg["done"], msg["total"])

        self.client.subscribe_topic(_PROGRESS_TOPIC, on_event)
        try:
            for future in as_completed(futures):
                i = index[future.key]
                try:
                    results[i] = future.result()
                except Exception as exc:  # noqa: BLE001 - reported below with the item it belongs to
                    if self._lost(exc):
                        raise TaskFailed(f"{label}: lost the connection to the Dask scheduler "
                                         f"{self.config.scheduler or '(local cluster)'} with "
                                         f"{progress.total - progress.done} of {progress.total} tasks unfinished (the "
                                         "scheduler stopped, or the network dropped)") from None
                    failures.append((i, exc))
                    progress.tick(failed=True)
                    continue
                rows.finish(i)
                if isinstance(results[i], _UserFailure):
                    failures.append((i, UserError(results[i].message)))
                    progress.tick(failed=True)
                    continue
                if on_result:
                    on_result(items[i], results[i])
                progress.tick()
        finally:
            if self.client is not None and self.client.status == "running":
                self.client.unsubscribe_topic(_PROGRESS_TOPIC)
        if failures:
            failures.sort(key=lambda f: f[0])
            user = [exc for _, exc in failures if isinstance(exc, UserError)]
            if user:  # a mistake the user can fix, raised inside a worker: the same one line as on the driver
                raise UserError(str(user[0]))
            first, exc = failures[0]
            raise TaskFailed(f"{label}: {len(failures)} of {len(items)} tasks failed; first, "
                             f"{_name(items[first], first)}: {describe(exc)}")
        return results

    def _local_workers(self) -> int:
        """Worker processes of the embedded cluster (or threads standing in for them)."""
        return self.config.n_workers or max(2, os.cpu_count() or 2)

    @staticmethod
    def _map_here(fn, items, on_result, progress, rows) -> list[Any]:
        results: list[Any] = [None] * len(items)
        for i, item in enumerate(items):
            _local.sink = lambda done, total, i=i: rows.update(i, done, total)
            try:
                results[i] = fn(item)
            finally:
                _local.sink = None
            rows.finish(i)
            if on_result:
                on_result(item, results[i])
            progress.tick()
        return results

    def in_driver(self) -> bool:
        """Whether ``map(..., threads=True)`` would run here: a local cluster that has not started."""
        cfg = self.config
        return not cfg.scheduler and self.client is None and self._starting is None and not _user_script()

    def _map_threads(self, fn, items, label, on_result, rows) -> list[Any]:
        progress = _Progress(label, len(items), self.log)
        n = max(1, min(len(items), self._local_workers()))

        def call(i: int) -> Any:
            _local.sink = lambda done, total: rows.update(i, done, total)
            try:
                return fn(items[i])
            finally:
                _local.sink = None

        results: list[Any] = [None] * len(items)
        with concurrent_futures.ThreadPoolExecutor(n, thread_name_prefix="winnow-task") as pool:
            futures = {pool.submit(call, i): i for i in range(len(items))}
            try:
                for future in concurrent_futures.as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()  # a task's error is raised as it is, as in-process runs do
                    rows.finish(i)
                    if on_result:
                        on_result(items[i], results[i])
                    progress.tick()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return results

    def _lost(self, exc: BaseException) -> bool:
        """True when ``exc`` says the client lost its scheduler (rather than a task failing)."""
        return "scheduler-connection-lost" in str(exc) or (
            type(exc).__name__ in ("CancelledError", "FutureCancelledError") and self.client.status != "running")


class _RowProgress:
    """Rows done inside the running tasks (from :func:`task_progress`) plus those of finished tasks, printed
    at most every ``every`` seconds, with the rate since the first report: ``[ingest] 4,210/10,000 rows, 52
    rows/s``."""

    def __init__(self, label: str, sizes: Sequence[int] | None, log: Callable[[str], None], every: float,
                 unit: str = "rows"):
        self.label, self.log, self.every, self.unit = label, log, every, unit
        self.sizes = list(sizes) if sizes is not None else None
        self.running: dict[int, int] = {}
        self.totals: dict[int, int] = {}
        self.finished = 0
        self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, rows) of the first report
        self.lock = threading.Lock()

    def update(self, i: int, done: int, total: int) -> None:
        with self.lock:
            self.running[i], self.totals[i] = int(done), int(total)
            now = time.monotonic()
            rows = self.finished + sum(self.running.values())
            self.first = self.first or (now, rows)
            if now - self.last < self.every or not rows:
                return
            self.last = now
            total_rows = sum(self.sizes) if self.sizes is not None else sum(self.totals.values())
            rate = (rows - self.first[1]) / max(now - self.first[0], 1e-9)
        self.log(f"[{self.label}] {rows:,}/{total_rows:,} {self.unit}, {rate:,.{1 if rate < 10 else 0}f} "
                 f"{self.unit}/s")

    def finish(self, i: int) -> None:
        with self.lock:
            self.running.pop(i, None)
            self.finished += self.sizes[i] if self.sizes is not None else self.totals.get(i, 0)


class _Progress:
    def __init__(self, label: str, total: int, log: Callable[[str], None]):
        self.label, self.total, self.log = label, total, log
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def tick(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        if now - self.last < 1.0 and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done)
        extra = f", {self.failed} failed" if self.failed else ""
        self.log(f"[{self.label}] {self.done}/{self.total} ({self.done / self.total:.0%}){extra}, "
                 f"{elapsed:.1f}s elapsed, ~{eta:.0f}s left")
