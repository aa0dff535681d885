"""Stage manifests: provenance beside every stage output, and the skip/resume decision.

A stage writes ``_run.json`` into its output folder when it starts (stage, parameters, input fingerprints) and
``_manifest.json`` when it has finished (the same, plus code version, row counts and every output file with its
size). On a rerun:

- ``_manifest.json`` matches the stage, parameters and inputs: the stage is skipped;
- ``_run.json`` matches: the stage resumes; the stage itself skips the units (shards) that are complete;
- either exists but does not match: the run stops and asks for another output folder, or ``--overwrite``, which
  replaces only an output of the same stage and never a folder holding one of the command's inputs;
- except a ``_run.json`` of the same stage whose run committed nothing (no task marker, no output file: only
  scratch folders) and whose process is gone: nothing would be lost, so the new run just starts.

``_run.json`` also records the driver process (host, pid), so that a reader can tell a run still going from one
that stopped (:func:`driver_alive`).

Matching uses the stage name, the parameters and the inputs' content fingerprints, not the code version, which is
recorded for provenance only.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any

from winnow.pipeline import __version__
from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError

MANIFEST = "_manifest.json"
RUN = "_run.json"
LOCK = "_lock.json"  # held by the process writing the folder, from open until finish
SCRATCH = ("_tmp", "_inputs")  # folders of work in progress (ingest's split input, download scratch): no output


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def describe_inputs(paths: list[str]) -> list[dict]:
    return [{"path": str(p), "size": fsio.size(p), "fingerprint": fsio.fingerprint(p)} for p in paths]


@dataclass
class StageRun:
    """One stage writing into ``out_dir``; use :meth:`open` to decide skip / resume / fresh."""

    stage: str
    out_dir: str
    params: dict
    inputs: list[dict] = field(default_factory=list)

    def _signature(self) -> dict:
        return {
            "stage": self.stage,
            "params": self.params,
            "inputs": [{"fingerprint": i["fingerprint"]} for i in self.inputs],
        }

    @staticmethod
    def _signature_of(doc: dict) -> dict:
        return {
            "stage": doc.get("stage"),
            "params": doc.get("params"),
            "inputs": [{"fingerprint": i.get("fingerprint")} for i in doc.get("inputs", [])],
        }

    def _matches(self, name: str) -> bool | None:
        path = fsio.join(self.out_dir, name)
        if not fsio.exists(path):
            return None
        try:
            doc = fsio.read_json(path)
        except (ValueError, OSError):
            return False
        return self._signature_of(doc) == _jsonable(self._signature())

    def open(self, overwrite: bool = False, protect: list[str] | tuple = (), enclosing: list[str] | tuple = (),
             log=print, redo: bool = False) -> str:
        """Return "skip" (already done), "resume" (continue an interrupted run) or "fresh".

        ``--overwrite`` (``overwrite=True``) replaces only a Winnow output of this same stage that holds none of
        the paths in ``protect`` (the command's inputs) and lies inside none of the folders in ``enclosing``
        (input folders whose whole tree is the user's, e.g. a URL-list folder): never a file, a folder Winnow
        did not write, another stage's output, or a folder holding or inside an input. A run of this stage with
        other parameters that committed nothing and whose process is gone is replaced without ``--overwrite``
        (one line says so).
        """
        fs, path = fsio.get_fs(self.out_dir)
        if fs.exists(path) and not fs.isdir(path):
            raise UserError(f"{self.out_dir} is a file, not an output folder; give a folder path")
        done, started = self._matches(MANIFEST), self._matches(RUN)
        if done:
            return "skip"
        created = not fs.exists(path)
        fsio.makedirs(self.out_dir)
        lock(self.out_dir, self.stage)
        try:
            if started and done is None:
                previous = fsio.read_json(fsio.join(self.out_dir, RUN))
                fsio.write_json(fsio.join(self.out_dir, RUN), previous | {"driver": _driver()})  # this process now
                return "resume"
            self.check(overwrite, protect, enclosing, started=started, done=done, log=log, redo=redo)
        except BaseException:
            unlock(self.out_dir)
            if created:
                fsio.remove(self.out_dir)
            raise
        fsio.makedirs(self.out_dir)
        fsio.write_json(fsio.join(self.out_dir, RUN), self._doc(driver=_driver()))
        return "fresh"

    def check(self, overwrite: bool = False, protect: list[str] | tuple = (), enclosing: list[str] | tuple = (),
              started: bool | None = None, done: bool | None = None, log=print, redo: bool = False) -> None:
        """Raise the UserError :meth:`open` would raise for a folder holding another run (and, from :meth:`open`,
        clear a replaceable one). Called alone it compares the stage and parameters only and changes nothing, so
        a stage whose inputs are known late (``subset``: after scoring) refuses before doing any work."""
        alone = started is None and done is None
        if alone:
            mine = {k: v for k, v in _jsonable(self._signature()).items() if k != "inputs"}
            done, started = (None if (doc := _read(self.out_dir, name)) is None else
                             {k: v for k, v in self._signature_of(doc).items() if k != "inputs"} == mine
                             for name in (MANIFEST, RUN))
            if done or (started and done is None) or not fsio.exists(self.out_dir):
                return
        if not (done is False or started is False or (done is None and started is None and
                                                       set(fsio.listdir(self.out_dir)) - {LOCK})):
            return
        refusal = self._not_replaceable(protect, enclosing)
        if refusal:
            raise UserError(f"output folder {self.out_dir} {refusal}; choose another output folder")
        running = None if overwrite else driver_alive(self.out_dir)
        restart = not overwrite and done is None and started is False and not running and not self.committed()
        stale = redo and not overwrite and done is False and not running and self._only_inputs_differ()
        if not (overwrite or restart or stale):
            busy = f" (its run is still going: {running})" if running else ""
            raise UserError(f"output folder {self.out_dir} exists with a different run ({self.stage}: "
                            f"{self.differences()}){busy}; choose another output folder, or pass --overwrite to "
                            "replace it")
        if not alone:
            if stale:  # a derived output of the same stage and parameters: its inputs changed, so it is redone
                log(f"{self.stage}: {self.out_dir} was made from inputs that have changed since; redoing it")
            if restart:
                log(f"{self.stage}: {self.out_dir} holds an earlier {self.stage} run with other parameters that "
                    "finished nothing; starting this one in its place")
            for name in fsio.listdir(self.out_dir):  # all but the lock this run holds
                if name != LOCK:
                    fsio.remove(fsio.join(self.out_dir, name))

    def differences(self, shown: int = 3) -> str:
        """What the folder's recorded run has that this one has not, in words: ``timeout 5 (here 2), ...`` or
        ``other inputs``."""
        doc = _read(self.out_dir, MANIFEST) or _read(self.out_dir, RUN) or {}
        theirs, ours = doc.get("params") or {}, _jsonable(self.params)
        if not isinstance(theirs, dict) or not isinstance(ours, dict):
            return "other parameters or inputs"
        keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        said = [f"{k} {_short(theirs.get(k))} (here {_short(ours.get(k))})" for k in keys[:shown]]
        if len(keys) > shown:
            said.append(f"{len(keys) - shown} more")
        inputs = [i.get("fingerprint") for i in doc.get("inputs", [])] != [i["fingerprint"] for i in self.inputs]
        if inputs:
            said.append("other inputs")
        return "other " + ", ".join(said) if said else "other parameters or inputs"

    def _only_inputs_differ(self) -> bool:
        """The folder's finished run is this stage with these parameters; only its inputs' fingerprints differ."""
        doc = _read(self.out_dir, MANIFEST) or {}
        mine = {k: v for k, v in _jsonable(self._signature()).items() if k != "inputs"}
        theirs = {k: v for k, v in self._signature_of(doc).items() if k != "inputs"} if doc else None
        return theirs == mine

    def committed(self) -> bool:
        """True when the folder holds anything but run files and scratch: a task's marker or an output."""
        fs, root = fsio.get_fs(self.out_dir)
        for path in fs.find(root):
            rel = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path
            top = rel.split("/", 1)[0]
            if rel in (RUN, MANIFEST, LOCK) or top.startswith(SCRATCH) or fsio.TMP_MARK in rel:
                continue
            return True
        return False

    def _not_replaceable(self, protect, enclosing) -> str | None:
        """Why ``--overwrite`` may not delete the output folder, or None when it may."""
        out = _canonical(self.out_dir)
        for p in protect:
            inp = _canonical(p)
            if inp == out or inp.startswith(out.rstrip("/") + "/"):
                return f"holds this command's input {p} (--overwrite never deletes inputs)"
        for p in enclosing:
            if out.startswith(_canonical(p).rstrip("/") + "/"):
                return f"is inside this command's input folder {p} (--overwrite never deletes there)"
        stages = set()
        for name in (MANIFEST, RUN):
            if fsio.exists(fsio.join(self.out_dir, name)):
                try:
                    stages.add(fsio.read_json(fsio.join(self.out_dir, name)).get("stage"))
                except (ValueError, OSError, AttributeError):
                    stages.add(None)
        if not stages:
            return "holds files that Winnow did not write (--overwrite replaces only a Winnow output)"
        if stages != {self.stage}:
            other = ", ".join(sorted(str(s) for s in stages))
            return f"holds a Winnow {other} output, not a {self.stage} output (--overwrite replaces only its own stage)"
        return None

    def _doc(self, **extra: Any) -> dict:
        return _jsonable({
            "stage": self.stage,
            "params": self.params,
            "inputs": self.inputs,
            "code_version": code_version(),
            "started": _now(),
            **extra,
        })

    def finish(self, rows: dict[str, int], outputs: list[str] | None = None, **extra: Any) -> dict:
        """Write ``_manifest.json`` (outputs default to every file in the folder, with sizes)."""
        names = outputs if outputs is not None else [
            n for n in fsio.listdir(self.out_dir) if n not in (MANIFEST, RUN, LOCK) and fsio.TMP_MARK not in n
            and not n.startswith("_tmp")
        ]
        files = [{"path": n, "size": fsio.size(fsio.join(self.out_dir, n))} for n in names]
        started = {}
        if fsio.exists(fsio.join(self.out_dir, RUN)):
            started = {"started": fsio.read_json(fsio.join(self.out_dir, RUN)).get("started")}
        doc = self._doc(rows=rows, outputs=files, finished=_now(), **extra) | started
        fsio.write_json(fsio.join(self.out_dir, MANIFEST), doc)
        unlock(self.out_dir)
        return doc


def _driver() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (tells a live holder from a later process that reuses its pid)."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, OSError):
        return None


def lock(out_dir: str, stage: str) -> None:
    """Take ``out_dir`` for this process, or raise a UserError naming the live process (of this machine, or of
    another one sharing the folder) that holds it. A lock whose holder is gone, or is this process, is taken
    over. Local folders are taken atomically (O_EXCL); on object stores the check is best-effort."""
    path = fsio.join(out_dir, LOCK)
    mine = {"stage": stage, "driver": _driver()}
    for _ in range(3):
        holder = _read(out_dir, LOCK)
        if holder is not None:
            alive = _holder_alive(holder.get("driver"))
            if alive:
                gone = "" if alive.endswith(socket.gethostname()) else f" (if it is gone, delete {path})"
                raise UserError(f"output folder {out_dir} is being written by another run ({holder.get('stage')}, "
                                f"{alive}); wait for it to finish, or stop it and run again{gone}")
            fsio.remove(path)  # its holder is gone: take it over
        if not fsio.is_local(out_dir):
            fsio.write_json(path, mine)
        else:
            try:
                fd = os.open(fsio.get_fs(path)[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # another process took it between the check and now: look again
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(mine))
        _HELD.add(out_dir)
        return
    raise UserError(f"output folder {out_dir} is being taken by several runs at once; run one of them")


def unlock(out_dir: str) -> None:
    """Give ``out_dir`` back (only when this process holds it)."""
    _HELD.discard(out_dir)
    holder = _read(out_dir, LOCK)
    if holder is not None and (holder.get("driver") or {}).get("pid") == os.getpid() and \
            (holder.get("driver") or {}).get("host") == socket.gethostname():
        fsio.remove(fsio.join(out_dir, LOCK))


def release_all() -> None:
    """Give back every folder this process still holds (a command that failed part way: a later run, in this
    process or another, must not find it taken)."""
    for out_dir in list(_HELD):
        try:
            unlock(out_dir)
        except OSError:
            _HELD.discard(out_dir)


_HELD: set[str] = set()


def _holder_alive(driver) -> str | None:
    """"process PID on HOST" when ``driver`` names a live process other than this one, else None."""
    if not isinstance(driver, dict) or not isinstance(driver.get("pid"), int):
        return None
    pid, host = driver["pid"], driver.get("host")
    if host != socket.gethostname():
        return f"process {pid} on {host}"  # another machine's: not known here, so honoured
    if pid == os.getpid():
        return None
    start = _process_start(pid)
    if start is None or (driver.get("started") is not None and abs(start - driver["started"]) > 1):
        return None
    return f"process {pid} on {host}"


def driver_alive(out_dir: str) -> str | None:
    """"process PID on HOST" when the ``_run.json`` of ``out_dir`` names a driver process that is still running on
    this machine (not this process), else None (finished, stopped, or on another machine: not known here)."""
    doc = _read(out_dir, RUN)
    driver = doc.get("driver") if isinstance(doc, dict) else None
    if not isinstance(driver, dict) or driver.get("host") != socket.gethostname():
        return None
    pid = driver.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: alive
        pass
    return f"process {pid} on {driver['host']}"


def _read(out_dir: str, name: str) -> dict | None:
    """A run file of ``out_dir`` ({} when unreadable), or None when absent."""
    path = fsio.join(out_dir, name)
    if not fsio.exists(path):
        return None
    try:
        doc = fsio.read_json(path)
    except (ValueError, OSError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _canonical(path: str) -> str:
    """A path to compare with others: absolute with links resolved when local, the URL as written otherwise."""
    if fsio.is_local(path):
        return os.path.realpath(fsio.get_fs(path)[1])
    return str(path).rstrip("/")


def read_manifest(out_dir: str) -> dict | None:
    path = fsio.join(out_dir, MANIFEST)
    return fsio.read_json(path) if fsio.exists(path) else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """Normalise tuples to lists and floats like inf, so signatures compare equal after a JSON round trip."""

    return json.loads(json.dumps(obj, default=str))
