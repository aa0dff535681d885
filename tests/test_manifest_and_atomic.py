import os
import signal
import subprocess
import sys
import tempfile

import pytest

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.manifest import MANIFEST, RUN, StageRun, describe_inputs


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = str(tmp_path / "out.bin")
    with pytest.raises(RuntimeError):
        with fsio.atomic_open(target, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    fsio.write_bytes(target, b"whole")
    assert open(target, "rb").read() == b"whole" and os.listdir(tmp_path) == ["out.bin"]


def _run(tmp_path, params, content=b"a,b\n"):
    src = tmp_path / "input.csv"
    src.write_bytes(content)
    return StageRun("ingest", str(tmp_path / "out"), params=params, inputs=describe_inputs([str(src)]))


def test_fresh_then_resume_then_skip(tmp_path):
    run = _run(tmp_path, {"x": 1})
    assert run.open() == "fresh" and os.path.exists(tmp_path / "out" / RUN)
    assert _run(tmp_path, {"x": 1}).open() == "resume"  # interrupted: started, not finished
    (tmp_path / "out" / "00000000.tar").write_bytes(b"t" * 10)
    doc = run.finish(rows={"input": 3, "ok": 2, "failed": 1})
    assert doc["outputs"] == [{"path": "00000000.tar", "size": 10}]
    assert doc["inputs"][0]["fingerprint"].startswith("sha256:") and doc["code_version"]
    assert os.path.exists(tmp_path / "out" / MANIFEST)
    assert _run(tmp_path, {"x": 1}).open() == "skip"


def test_changed_parameters_or_inputs_refuse_without_overwrite(tmp_path):
    run = _run(tmp_path, {"x": 1})
    run.open()
    run.finish(rows={})
    with pytest.raises(UserError, match="different run.*--overwrite"):
        _run(tmp_path, {"x": 2}).open()
    with pytest.raises(UserError, match="different run"):
        _run(tmp_path, {"x": 1}, content=b"a,b\nc,d\n").open()
    assert _run(tmp_path, {"x": 2}).open(overwrite=True) == "fresh"
    assert not os.path.exists(tmp_path / "out" / "00000000.tar")


def test_foreign_folder_is_not_overwritten_silently(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        _run(tmp_path, {}).open()
    assert (tmp_path / "out" / "precious.txt").exists()


def _child(code: str) -> subprocess.Popen:

    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path):

    out = str(tmp_path / "out")
    holder = _child(f"from winnow.pipeline.data.manifest import StageRun\n"
                    f"StageRun('ingest', {out!r}, params={{'x': 1}}).open()\n"
                    f"print('held', flush=True)\nimport time\ntime.sleep(600)\n")
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"being written by another run \(ingest, process {holder.pid} on"):
            StageRun("ingest", out, params={"x": 1}).open()  # the same run: it would resume into a live one
        with pytest.raises(UserError, match="being written by another run"):
            StageRun("ingest", out, params={"x": 2}).open(overwrite=True)  # nor replaced under it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = StageRun("ingest", out, params={"x": 1})
    assert run.open() == "resume"  # the holder is gone: its lock is taken over
    run.finish(rows={})
    assert sorted(os.listdir(out)) == [MANIFEST, RUN]  # the lock is given back


def test_a_rerun_removes_what_killed_writers_left_and_keeps_what_live_ones_write(tmp_path):

    from winnow.pipeline.run.stage import Stage

    out = tmp_path / "shards"
    out.mkdir()
    (out / "_run.json").write_text('{"stage": "reshard", "params": {}, "inputs": []}')
    killed = _child(f"import os, signal\nfrom winnow.pipeline.core import fsio\n"
                    f"staging = fsio.scratch_dir('work')\nprint(staging, flush=True)\n"
                    f"with fsio.atomic_open({str(out / '00000002.tar')!r}, 'wb') as f:\n"
                    f"    f.write(b'x' * 1000); f.flush()\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    staging = killed.stdout.readline().strip()
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(out) if fsio.TMP_MARK in n]
    assert len(left) == 1 and left[0].startswith("00000002.tar.tmp-") and os.path.isdir(staging)
    with fsio.atomic_open(str(out / "00000003.tar"), "wb") as live:  # this live process's own write survives
        live.write(b"y")
        Stage("reshard", str(out), params={})
        assert [n for n in os.listdir(out) if fsio.TMP_MARK in n] == [os.path.basename(live.name)]
    assert not os.path.exists(staging) and os.path.dirname(staging) == tempfile.gettempdir()
    assert sorted(os.listdir(out)) == ["00000003.tar", "_lock.json", "_run.json"]
