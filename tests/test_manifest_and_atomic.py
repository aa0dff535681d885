import os

import pytest

from pipeline.core import fsio
from pipeline.core.errors import UserError
from pipeline.data.manifest import MANIFEST, RUN, StageRun, describe_inputs


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
