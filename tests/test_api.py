"""The README's Python API example runs as written (``import winnow``), against a real loopback server and a
local Dask cluster."""

import dataclasses
import inspect
import pydoc
import re
import subprocess
import sys
import typing
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
    from winnow.pipeline.core.errors import UserError

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

    import winnow
    from winnow.workflows.cli import COMMANDS, build_parser, options
    from winnow.workflows.settings import RunConfig

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
        for arg, _ in command.args:  # "name*": any number, none by default
            default = None if arg.endswith("*") else inspect.Parameter.empty
            assert params[arg.rstrip(".*")].default is default, (name, arg)
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


def test_a_users_pipeline_py_and_filters_folder_do_not_shadow_winnow(tmp_path):
    """A notebook's folder holding its own pipeline.py, filters/ and workflows.py: import winnow and a subset
    still work, because everything Winnow installs lives under the one name winnow."""

    import numpy as np
    import pandas as pd

    (tmp_path / "pipeline.py").write_text("raise ImportError('the user pipeline.py was imported')\n")
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "__init__.py").write_text("raise ImportError('the user filters/ was imported')\n")
    (tmp_path / "workflows.py").write_text("raise ImportError('the user workflows.py was imported')\n")
    meta = tmp_path / "meta"
    meta.mkdir()
    pd.DataFrame({"uid": [f"{i:032x}" for i in range(10)], "text": ["a cat"] * 10,
                  "clip_b32_similarity_score": np.linspace(0.1, 0.4, 10)}).to_parquet(meta / f"{'a' * 32}.parquet")
    code = ("import winnow\nwith winnow.cluster(scheduler='sync'):\n"
            "    kept = winnow.subset('clip_b32_threshold', 'meta', 'out', cache='cache')\nprint('kept', len(kept))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept 5" in result.stdout  # 0.27, 0.3, 0.33, 0.37 and 0.4 reach the recipe's 0.25
