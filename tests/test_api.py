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
