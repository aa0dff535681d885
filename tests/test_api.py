"""The README's Python API example runs as written (``import winnow``), against a real loopback server and a
local Dask cluster."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.e2e
def test_readme_example_runs_as_a_script(tmp_path):
    """Saved as a file and run with python, as a user does (no ``if __name__ == "__main__":`` guard): the local
    cluster's workers must not run the script again."""
    import subprocess
    import sys

    import numpy as np

    (tmp_path / "example.py").write_text(readme_example())
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "bootstrapping phase" not in result.stderr and "Nanny failed" not in result.stderr
    out = result.stdout
    kept = np.load(tmp_path / "runs/api/basic/uids.npy", allow_pickle=False)
    assert f"basic keeps {len(kept)} of" in out
    assert 0 < len(kept) < 300
    assert re.search(r"\['[0-9a-f]{32}'", out)


def test_unknown_setting_names_the_allowed_ones(tmp_path):
    import winnow
    from pipeline.core.errors import UserError

    with pytest.raises(UserError, match="unknown key 'timout'.*timeout"):
        winnow.ingest(str(tmp_path / "urls.parquet"), str(tmp_path / "pool"), timout=3)


def test_winnow_is_the_api_package():
    import winnow

    for name in ("synth", "serve", "ingest", "ledger", "embed", "dedup", "subset", "scores", "reshard", "train",
                 "evaluate", "demo", "cluster"):
        assert callable(getattr(winnow, name)), name


def test_cli_and_api_agree_for_every_command():
    """Both are made from one table: every command has a function; every flag is a keyword with the same default,
    every key of the command's config sections is a keyword (what --set reaches), and help() shows them."""
    import dataclasses
    import inspect
    import pydoc
    import typing

    import winnow
    from workflows.cli import COMMANDS, build_parser, options
    from workflows.settings import RunConfig

    assert sorted(winnow.__all__) == sorted([c.name.replace("-", "_") for c in COMMANDS] +
                                            ["cluster", "scores", "uids_hex"])
    hints = typing.get_type_hints(RunConfig)
    parser = build_parser()
    for command in COMMANDS:
        name = command.name.replace("-", "_")
        if name == "serve":  # a context manager in Python; the command serves in the foreground
            assert list(inspect.signature(winnow.serve).parameters) == ["world", "port"]
            continue
        params = inspect.signature(getattr(winnow, name)).parameters
        assert "**" not in str(inspect.signature(getattr(winnow, name)))
        for arg, _ in command.args:
            assert params[arg.rstrip(".")].default is inspect.Parameter.empty, (name, arg)
        for flag in command.flags:
            assert flag.name in options(parser, command.name)
            if not flag.key:
                expected = False if flag.switch else None if flag.pairs else () if flag.many else flag.default
                if flag.required:
                    expected = inspect.Parameter.empty
                assert params[flag.keyword].default == expected, (name, flag.name)
                continue
            section, field = flag.key.split(".")
            if "{kind}" in command.sections:
                assert params[field].default is None  # each kind's own default
                continue
            cls = hints[section]
            default = next(f for f in dataclasses.fields(cls) if f.name == field)
            value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
            assert params[field].default == value, (name, flag.name)
        for section in command.sections:
            if section != "{kind}":
                assert {f.name for f in dataclasses.fields(hints[section]) if f.init} <= set(params), (name, section)
        if command.stage:
            assert {"overwrite", "scheduler", "workers"} <= set(params)
    assert inspect.signature(winnow.subset).parameters["allow_empty"].default is False
    text = pydoc.render_doc(winnow.ingest)
    assert "timeout: float = 10.0" in text and "allow_hosts" in text
