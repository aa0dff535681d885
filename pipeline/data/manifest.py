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
import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.core import fsio
from pipeline.core.errors import UserError

MANIFEST = "_manifest.json"
RUN = "_run.json"
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
             log=print) -> str:
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
        if started and done is None:
            previous = fsio.read_json(fsio.join(self.out_dir, RUN))
            fsio.write_json(fsio.join(self.out_dir, RUN), previous | {"driver": _driver()})  # this process now
            return "resume"
        self.check(overwrite, protect, enclosing, started=started, done=done, log=log)
        fsio.makedirs(self.out_dir)
        fsio.write_json(fsio.join(self.out_dir, RUN), self._doc(driver=_driver()))
        return "fresh"

    def check(self, overwrite: bool = False, protect: list[str] | tuple = (), enclosing: list[str] | tuple = (),
              started: bool | None = None, done: bool | None = None, log=print) -> None:
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
        if not (done is False or started is False or (done is None and started is None and fsio.listdir(self.out_dir))):
            return
        refusal = self._not_replaceable(protect, enclosing)
        if refusal:
            raise UserError(f"output folder {self.out_dir} {refusal}; choose another output folder")
        running = None if overwrite else driver_alive(self.out_dir)
        restart = not overwrite and done is None and started is False and not running and not self.committed()
        if not (overwrite or restart):
            busy = f" (its run is still going: {running})" if running else ""
            raise UserError(f"output folder {self.out_dir} exists with a different run ({self.stage}: other parameters "
                            f"or inputs){busy}; choose another output folder, or pass --overwrite to replace it")
        if not alone:
            if restart:
                log(f"{self.stage}: {self.out_dir} holds an earlier {self.stage} run with other parameters that "
                    "finished nothing; starting this one in its place")
            fsio.remove(self.out_dir)

    def committed(self) -> bool:
        """True when the folder holds anything but run files and scratch: a task's marker or an output."""
        fs, root = fsio.get_fs(self.out_dir)
        for path in fs.find(root):
            rel = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path
            top = rel.split("/", 1)[0]
            if rel in (RUN, MANIFEST) or top.startswith(SCRATCH) or fsio.TMP_MARK in rel:
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
            n for n in fsio.listdir(self.out_dir) if n not in (MANIFEST, RUN) and fsio.TMP_MARK not in n
            and not n.startswith("_tmp")
        ]
        files = [{"path": n, "size": fsio.size(fsio.join(self.out_dir, n))} for n in names]
        started = {}
        if fsio.exists(fsio.join(self.out_dir, RUN)):
            started = {"started": fsio.read_json(fsio.join(self.out_dir, RUN)).get("started")}
        doc = self._doc(rows=rows, outputs=files, finished=_now(), **extra) | started
        fsio.write_json(fsio.join(self.out_dir, MANIFEST), doc)
        return doc


def _driver() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


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
    import json

    return json.loads(json.dumps(obj, default=str))
