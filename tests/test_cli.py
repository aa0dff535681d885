"""User errors end with one clear line and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pandas as pd
import pytest


def winnow(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "winnow.workflows.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("winnow: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_commands():
    result = winnow("--help")
    assert result.returncode == 0
    for command in ("demo", "synth", "serve", "ingest", "register", "ledger"):
        assert command in result.stdout
    assert winnow("ingest", "--help").returncode == 0
    assert winnow("dfn", "train", "--help").returncode == 0
    assert winnow("dfn").returncode == 2  # the subcommand is required


def test_missing_input(tmp_path):
    assert_user_error(winnow("ingest", str(tmp_path / "nope.parquet"), str(tmp_path / "pool")), "input not found")


def test_unsupported_input_format(tmp_path):
    (tmp_path / "urls.txt").write_text("http://x/1.jpg\n")
    assert_user_error(winnow("ingest", str(tmp_path / "urls.txt"), str(tmp_path / "pool")), ".parquet")


def test_input_without_url_column(tmp_path):
    pd.DataFrame({"link": ["http://127.0.0.1:9/a.jpg"], "text": ["a"]}).to_csv(tmp_path / "u.csv", index=False)
    assert_user_error(winnow("ingest", str(tmp_path / "u.csv"), str(tmp_path / "pool"), "--workers", "1",
                             "--set", "ingest.timeout=1", "--set", "ingest.deadline=2",
                             "--set", "ingest.stall_seconds=5"),
                      "no column 'url'", "url_col")


@pytest.mark.parametrize("args, fragment", [
    (["--set", "ingest.timeout=fast"], "ingest.timeout: expected float"),
    (["--set", "ingest.bogus=1"], "unknown key 'bogus'"),
    (["--set", "cluster.n_workers=-1"], "n_workers"),
    (["--set", "ingest.stall_seconds=1"], "stall_seconds"),
])
def test_bad_config_values(tmp_path, args, fragment):
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"]}).to_parquet(tmp_path / "u.parquet")
    assert_user_error(winnow("ingest", str(tmp_path / "u.parquet"), str(tmp_path / "pool"), *args), fragment)


def test_bad_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("ingest:\n  timeout: [\n")
    assert_user_error(winnow("demo", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path)), "not valid YAML")
    assert_user_error(winnow("demo", "--config", str(tmp_path / "missing.yaml")), "config file not found")


def test_ledger_and_register_on_wrong_folders(tmp_path):
    assert_user_error(winnow("ledger", str(tmp_path)), "holds no shards")
    assert_user_error(winnow("register", str(tmp_path / "nope")), "not found")
    assert_user_error(winnow("serve", str(tmp_path)), "not a synthetic world")


def test_output_folder_with_other_files_is_not_clobbered(tmp_path):
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "text": ["a"]}).to_parquet(tmp_path / "u.parquet")
    out = tmp_path / "pool"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only a Winnow output, never the user's files
        assert_user_error(winnow("ingest", str(tmp_path / "u.parquet"), str(out), "--workers", "1", *extra),
                          "did not write", "choose another output folder")
        assert os.listdir(out) == ["thesis.pdf"]


def test_recipe_variables_are_checked_before_any_work(tmp_path):
    assert_user_error(winnow("subset", "clip_l14_30pct", "--pool", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--var", "threshold=0.3"), "no variable 'threshold'", "its variables: fraction, tag")
    assert_user_error(winnow("subset", "clip_l14_30pct", "--pool", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--var", "fraction=most"), "fraction must be a number")
    assert not (tmp_path / "o").exists()


def test_bad_cluster_flags_are_one_line(tmp_path):
    urls = tmp_path / "u.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/x.jpg"], "text": ["a"]}).to_parquet(urls)
    assert_user_error(winnow("ingest", str(urls), str(tmp_path / "p"), "--workers", "abc"), "--workers 'abc'")
    assert_user_error(winnow("ingest", str(urls), str(tmp_path / "p"), "--workers", "0"), "whole number")
    result = winnow("ingest", str(urls), str(tmp_path / "p2"), "--scheduler", "nonsense::")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("winnow: error:")]
    assert len(errors) == 1 and "cannot reach the Dask scheduler at 'nonsense::'" in errors[0]
    assert "tcp://HOST:8786" in errors[0]


def test_a_cluster_whose_workers_die_while_starting_is_one_line(tmp_path):
    """Every Dask worker process exits as it starts (a sitecustomize that kills spawned children): the
    LocalCluster cannot start, and that is one line, not a traceback per nanny."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, sys\nif '--multiprocessing-fork' in sys.argv:\n    os._exit(3)\n")
    urls = tmp_path / "u.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/x.jpg"], "text": ["a"]}).to_parquet(urls)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "ingest", str(urls), str(tmp_path / "p"),
                             "--workers", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "local Dask cluster of 2 worker processes could not start" in lines[0], lines


def test_serve_binds_loopback_only_whatever_the_world_says(tmp_path):
    assert_user_error(winnow("synth", str(tmp_path / "w"), "--set",
                             "synth.base_url=http://127.0.0.1@0.0.0.0:8123"), "must be a loopback http URL")
    from winnow.pipeline.core.errors import UserError
    from winnow.pipeline.synth.server import WebPoolServer

    site = tmp_path / "world" / "site"
    site.mkdir(parents=True)
    (site / "routes.json").write_text("{}")
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org"):
        with pytest.raises(UserError, match="loopback only"):
            WebPoolServer(str(tmp_path / "world"), host=host, port=0)
    with WebPoolServer(str(tmp_path / "world"), host="localhost", port=0) as server:
        assert server.server_address[0] == "127.0.0.1"
    # a hand-edited world manifest naming 0.0.0.0 is refused by `winnow serve` too
    (tmp_path / "world" / "_manifest.json").write_text('{"params": {"base_url": "http://127.0.0.1@0.0.0.0:8124"}}')
    assert_user_error(winnow("serve", str(tmp_path / "world")), "loopback only", "0.0.0.0")


def test_help_imports_nothing_heavy():
    """`winnow --help` answers at once: no data library is imported for it (pandas alone costs ~0.25 s)."""
    code = ("import sys, winnow.workflows.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('pandas', 'numpy', 'torch', 'dask', 'pyarrow', 'fsspec') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
