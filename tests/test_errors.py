"""Errors that help: each mistake ends in one line naming a fix that runs, a run that committed nothing never
blocks the corrected command, outputs are never silently replaced, empty subsets say why, a pool still being
ingested is refused, and a long ingest shard shows its rows as they download."""

import glob
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from helpers import make_pool

from winnow.pipeline.core.config import substitute
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest
from winnow.workflows import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UIDS = [f"{i:032x}" for i in range(1, 7)]


def winnow(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "winnow.workflows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_line(result, code: int, *fragments) -> str:
    """The one ``winnow: error:`` line of a command that exited with ``code`` (no traceback), holding each
    fragment."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("winnow: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


PARSER = cli.build_parser()


def not_runnable(text: str, command: str | None = None) -> list[str]:
    """The hints of ``text`` that would not run: each backticked `winnow CMD ...` names a command and flags it
    takes, and every other --flag is one that ``winnow command`` takes."""
    bad = []
    hints = re.findall(r"`winnow ([^`]+)`", text)
    for hint in hints:
        name, *rest = hint.split()
        if name not in cli.BY_NAME:
            bad.append(f"`winnow {hint}`: no command {name}")
            continue
        bad += [f"`winnow {hint}`: {name} takes no {t}" for t in rest
                if t.startswith("--") and t.split("=")[0] not in cli.options(PARSER, name)]
    if command:
        rest = re.sub(r"`winnow [^`]+`", "", text)
        bad += [f"{command} takes no {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)
                if flag not in cli.options(PARSER, command)]
    return bad


# ----------------------------------------------------------------------------- 1. user errors inside workers
@pytest.mark.e2e
def test_a_user_error_raised_in_a_dask_task_comes_back_as_that_error():
    script = """
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.run.runner import ClusterConfig, Runner, TaskFailed
from winnow.pipeline.stages.embed import EmbedTask, embed_shard

with Runner(ClusterConfig(n_workers=1, retries=1), log=lambda m: None) as runner:
    try:
        runner.map(embed_shard, [EmbedTask("pool", "out", 0, {"tag": "has-dash"})], label="embed")
    except UserError as exc:
        print("UserError:", exc)
    except TaskFailed as exc:
        print("TaskFailed:", exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "UserError: embed.tag 'has-dash'" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Compute Failed" not in result.stderr, result.stderr


@pytest.mark.e2e
def test_a_wrong_pretrained_tag_is_one_line_and_the_corrected_command_runs(tmp_path):
    pool = make_pool(tmp_path / "pool", UIDS)
    line = one_line(winnow("embed", pool, "--model", "winnow-tiny-clip", "--tag", "t", "--scheduler", "sync"), 2,
                    "winnow-tiny-clip", "--pretrained")
    assert "rerun" not in line and not not_runnable(line, "embed")
    result = winnow("embed", pool, "--model", "winnow-tiny-clip", "--pretrained", "", "--tag", "t",
                    "--scheduler", "sync")
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(pool, "embeddings", "t", "_manifest.json"))


# ------------------------------------------------------------------ 2. a run that committed nothing gives way
def _left_by(out: str, params: dict, pid: int, stage: str = "embed") -> None:
    """``out`` as a run of ``stage`` with ``params``, driven by process ``pid``, left it."""
    manifest.StageRun(stage, out, params).open(log=lambda m: None)
    path = os.path.join(out, manifest.RUN)
    doc = json.load(open(path))
    doc["driver"]["pid"] = pid
    json.dump(doc, open(path, "w"))


@pytest.fixture()
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_stopped_run_that_committed_nothing_gives_way_with_one_line(tmp_path, dead_pid):
    out = str(tmp_path / "out")
    _left_by(out, {"model": "wrong"}, dead_pid)
    os.makedirs(os.path.join(out, "_tmp", "00000000-x"))  # scratch only
    said = []
    assert manifest.StageRun("embed", out, {"model": "right"}).open(log=said.append) == "fresh"
    assert len(said) == 1 and "finished nothing" in said[0]
    assert json.load(open(os.path.join(out, manifest.RUN)))["params"] == {"model": "right"}
    assert not os.path.exists(os.path.join(out, "_tmp"))


def test_a_run_that_committed_a_task_or_is_still_going_still_refuses(tmp_path, dead_pid, live_pid):
    out = str(tmp_path / "out")
    _left_by(out, {"model": "wrong"}, dead_pid)
    open(os.path.join(out, "00000000_stats.json"), "w").write("{}")  # a committed task
    with pytest.raises(UserError, match="different run.*--overwrite"):
        manifest.StageRun("embed", out, {"model": "right"}).open()
    assert os.path.exists(os.path.join(out, "00000000_stats.json"))
    busy = str(tmp_path / "busy")
    _left_by(busy, {"model": "wrong"}, live_pid)
    with pytest.raises(UserError, match=f"still going: process {live_pid}"):
        manifest.StageRun("embed", busy, {"model": "right"}).open()


@pytest.mark.e2e
def test_an_ingest_killed_before_any_shard_does_not_block_the_corrected_command(tiny_world, tmp_path):
    from winnow.pipeline.synth.hostile import HostileServer
    from winnow.pipeline.synth.server import WebPoolServer
    from winnow.pipeline.synth.world import read_truth

    truth = read_truth(tiny_world["path"])
    rows = pd.read_parquet(os.path.join(tiny_world["path"], "urls.parquet"))
    rows = rows[~truth["defect"].isin(["hang", "slow"]).to_numpy()].iloc[:10].reset_index(drop=True)
    pool = str(tmp_path / "pool")
    common = ["--allow-hosts", "127.0.0.1", "--timeout", "5", "--set", "ingest.deadline=10", "--workers", "1"]
    with WebPoolServer(tiny_world["path"], port=tiny_world["port"]), HostileServer() as hold:
        rows.loc[0, "url"] = f"{hold.url}/hold"
        rows.to_parquet(tmp_path / "urls.parquet")
        urls = str(tmp_path / "urls.parquet")
        proc = subprocess.Popen([sys.executable, "-m", "winnow.workflows.cli", "ingest", urls, pool,
                                 "--shard-size", "10", *common], start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            assert hold.held.wait(180), "the held row was never requested"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        hold.release.set()
        assert not glob.glob(os.path.join(pool, "*_stats.json"))
        result = winnow("ingest", urls, pool, "--shard-size", "5", *common)
    assert result.returncode == 0, result.stderr
    assert "finished nothing; starting this one in its place" in result.stdout
    assert sorted(glob.glob(os.path.join(pool, "*_stats.json"))) == [os.path.join(pool, f"0000000{i}_stats.json")
                                                                    for i in (0, 1)]


# ------------------------------------------------------------------------- 3. outputs are never replaced
@pytest.fixture()
def pool(tmp_path):
    return make_pool(tmp_path / "pool", UIDS)


def test_another_recipe_in_a_subset_folder_is_refused_before_scoring(pool, tmp_path):
    from winnow.pipeline.select.score import cache_root

    out = str(tmp_path / "sub")
    assert winnow("subset", "no_filter", "--pool", pool, "--out", out, "--scheduler", "sync").returncode == 0
    before = open(os.path.join(out, "uids.npy"), "rb").read()
    line = one_line(winnow("subset", "filter_caption_chars", "--pool", pool, "--out", out, "--scheduler", "sync"),
                    2, "different run", "--overwrite")
    assert not not_runnable(line, "subset")
    assert open(os.path.join(out, "uids.npy"), "rb").read() == before
    assert not glob.glob(os.path.join(cache_root(pool), "caption_chars_score-*")), "it scored before refusing"
    again = winnow("subset", "no_filter", "--pool", pool, "--out", out, "--scheduler", "sync")
    assert again.returncode == 0 and "up to date" in again.stdout
    assert winnow("subset", "filter_caption_chars", "--pool", pool, "--out", out, "--scheduler", "sync",
                  "--overwrite").returncode == 0
    assert json.load(open(os.path.join(out, "subset.json")))["recipe"] == "filter_caption_chars"


# ---------------------------------------------------------------------------- 4. empty and tiny subsets
@pytest.fixture()
def captions_pool(tmp_path):
    """150 rows: 149 captions of 5 characters, one of 19."""
    uids = [f"{i:032x}" for i in range(1, 151)]
    path = make_pool(tmp_path / "pool", uids, ["a cat"] * 149 + ["a long caption here"])
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump({"filters": [{"key": "caption_chars"}],
                                      "select": [{"threshold": {"column": "caption_chars_score",
                                                                "min": "${min_chars:-6}"}}]}))
    return path, str(recipe)


def test_an_empty_subset_says_why_and_writes_nothing(captions_pool, tmp_path):
    path, recipe = captions_pool
    out = tmp_path / "empty"
    line = one_line(winnow("subset", recipe, "--pool", path, "--out", str(out), "--var", "min_chars=1000",
                           "--scheduler", "sync"), 1,
                    "kept 0 of 150", "caption_chars_score >= 1000 keeps 0 of 150", "ranges 5..19", "min_chars",
                    "nothing written")
    assert not not_runnable(line, "subset")
    assert not out.exists()


def test_a_subset_under_one_percent_is_a_warning_with_the_ranges(captions_pool, tmp_path):
    path, recipe = captions_pool
    result = winnow("subset", recipe, "--pool", path, "--out", str(tmp_path / "tiny"), "--scheduler", "sync")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "kept 1 of 150" in warning[0] and "ranges 5..19" in warning[0], result.stdout
    assert os.path.exists(tmp_path / "tiny" / "uids.npy")


# ------------------------------------------------------------------------------- 5. unfinished ingests
def _ingest_left(path: str, pid: int) -> str:
    """A pool whose ingest, driven by ``pid``, committed one of three shards."""
    _left_by(path, {}, pid, stage="ingest")
    make_pool(path, UIDS)
    os.makedirs(os.path.join(path, "_inputs"))
    json.dump({"rows": 18, "shards": 3, "shard_size": 6}, open(os.path.join(path, "_inputs", "_split.json"), "w"))
    return path


def test_a_pool_whose_ingest_is_running_or_stopped_is_refused(tmp_path, live_pid, dead_pid):
    running = _ingest_left(str(tmp_path / "running"), live_pid)
    line = one_line(winnow("embed", running, "--tag", "t", "--scheduler", "sync"), 2,
                    "ingest unfinished: 1 of 3 shards done", f"still running: process {live_pid}",
                    "wait until it has finished", "--allow-partial")
    assert not not_runnable(line, "embed")
    stopped = _ingest_left(str(tmp_path / "stopped"), dead_pid)
    line = one_line(winnow("subset", "no_filter", "--pool", stopped, "--out", str(tmp_path / "s"), "--scheduler",
                           "sync"), 2, "ingest unfinished: 1 of 3 shards done", "rerun the same `winnow ingest`",
                    "--allow-partial")
    assert "still running" not in line and not not_runnable(line, "subset")


# -------------------------------------------------------------------------------------- 6. hints and typos
def test_every_hint_in_the_code_and_docs_names_a_command_and_flags_that_exist():
    files = [f for pattern in ("pipeline/**/*.py", "workflows/**/*.py", "filters/**/*.py", "manifests/**/*.yaml",
                               "manifests/**/*.md", "*.md", "pipeline/*.md")
             for f in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    bad = []
    for path in sorted(set(files)):
        text = open(path).read()
        text = re.sub(r"`winnow (\.\.\.|COMMAND|\{[^`]*)`", "", text)  # placeholders and f-string templates
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):  # commands in the READMEs' examples
            text += "".join(f" `{line.split('#')[0].strip()}` " for line in block.replace("\\\n", " ").splitlines()
                            if line.startswith("winnow ") and not line.startswith("winnow --"))
        bad += [f"{os.path.relpath(path, ROOT)}: {problem}" for problem in not_runnable(text)]
    assert not bad, "\n".join(bad)


@pytest.mark.e2e
def test_a_busy_port_names_flags_serve_takes(tiny_world):

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line(winnow("serve", tiny_world["path"], "--port", str(port)), 2, f"127.0.0.1:{port}",
                        f"`winnow serve {tiny_world['path']} --port PORT`")
    assert not not_runnable(line)


@pytest.mark.parametrize("argv, fragment", [
    (["embd", "x"], "did you mean `winnow embed`?"),
    (["embed", "x", "--modle", "m"], "winnow embed takes no flag --modle; did you mean --model?"),
    (["ingest", "a", "b", "--thread-cout", "3"], "did you mean --thread-count?"),
    (["--verison"], "did you mean --version?"),
    (["ingest", "a", "b", "--set", "ingest.timout=3"], "unknown key 'timout' in ingest; did you mean ingest.timeout?"),
    (["ingest", "a", "b", "--set", "timeout=3"], "did you mean ingest.timeout?"),
    (["demo", "--set", "demo.dist.stesp=3"], "did you mean demo.dist.steps?"),
])
def test_a_mistyped_command_flag_or_key_gets_the_nearest(argv, fragment, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("winnow: error:") and fragment in err[0], err


# ----------------------------------------------------------------------------------------- 7. ingest flags
def test_ingest_flags_set_their_img2dataset_settings(capsys):
    args, extra = PARSER.parse_known_args([
        "ingest", "u.csv", "pool", "--thread-count", "3", "--timeout", "4", "--retries", "0", "--shard-size", "7",
        "--url-col", "link", "--caption-col", "alt", "--min-image-size", "5", "--allow-hosts", "127.0.0.1",
        "--allow-hosts", "10.0.0.0/8", "--image-size", "64", "--resize-mode", "center_crop"])
    assert not extra
    got = cli.load_config(cli.BY_NAME["ingest"], args).ingest
    assert (got.thread_count, got.timeout, got.retries, got.shard_size, got.url_col, got.caption_col,
            got.min_image_size, got.allow_hosts, got.image_size, got.resize_mode) == \
        (3, 4.0, 0, 7, "link", "alt", 5, ["127.0.0.1", "10.0.0.0/8"], 64, "center_crop")
    assert cli.main(["ingest", "u.csv", "pool", "--timeout", "30"]) == 2  # above the default deadline (20 s)
    assert "--set ingest.deadline=60" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 8. the recipe grammar
def test_the_recipe_example_in_the_formats_readme_is_a_valid_recipe():
    from winnow.pipeline.stages.subset import RULES, load_recipe

    text = open(os.path.join(ROOT, "manifests", "README.md")).read()
    section = text.split("## Subset recipe", 1)[1].split("\n## ", 1)[0]
    for rule in RULES:
        assert f"`{rule}" in section, f"rule {rule} is not documented"
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    recipe = load_recipe(yaml.safe_load(substitute(example, {"pool": "P"}, "README")))
    assert [next(iter(r)) for r in recipe.select] == ["intersect", "threshold", "exclude_duplicates"]


# ------------------------------------------------------------------------- 9. progress inside ingest shards
@pytest.mark.e2e
def test_a_long_shard_prints_rows_done_while_it_downloads(tmp_path):
    """12 rows, one download at a time, each answered after 0.5 s: the shard takes at least 6 s, so lines of
    rows done (every second, as --set cluster.progress_every=1 asks) appear while it runs; meanwhile a consumer
    of the pool is told the ingest is still running."""
    from PIL import Image

    from winnow.pipeline.synth.server import WebPoolServer

    site = tmp_path / "world" / "site"
    site.mkdir(parents=True)
    for i in range(12):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (6 * i, 0, 0)).save(buf, "JPEG")
        (site / f"{i}.jpg").write_bytes(buf.getvalue())
    (site / "routes.json").write_text(json.dumps({f"/{i}.jpg": {"delay": 0.5} for i in range(12)}))
    pool = str(tmp_path / "pool")
    with WebPoolServer(str(tmp_path / "world"), port=0) as server:
        pd.DataFrame({"url": [f"{server.url}/{i}.jpg" for i in range(12)],
                      "text": [f"red square {i}" for i in range(12)]}).to_parquet(tmp_path / "urls.parquet")
        log = open(tmp_path / "ingest.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "winnow.workflows.cli", "ingest", str(tmp_path / "urls.parquet"),
                                 pool, "--shard-size", "12", "--thread-count", "1", "--allow-hosts", "127.0.0.1",
                                 "--workers", "1", "--set", "cluster.progress_every=1"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            while not os.path.exists(os.path.join(pool, manifest.RUN)) and proc.poll() is None:
                time.sleep(0.1)
            one_line(winnow("embed", pool, "--tag", "t", "--scheduler", "sync"), 2, "still running",
                     "--allow-partial")
            assert proc.wait(timeout=300) == 0, open(tmp_path / "ingest.log").read()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = open(tmp_path / "ingest.log").read()
    done = [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
            re.findall(r"\[ingest\] ([\d,]+)/([\d,]+) rows, [\d.,]+ rows/s", text)]
    assert any(0 < n < total == 12 for n, total in done), text


# ------------------------------------------------------------------------------------------------ models offline
def test_a_pretrained_tag_offline_fails_at_once_naming_the_offline_choices(tmp_path):
    pool = make_pool(tmp_path / "pool", UIDS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "c"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "embed", pool, "--model", "ViT-B-32",
                             "--pretrained", "datacomp_xl_s13b_b90k", "--scheduler", "sync"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    line = one_line(result, 2, "not in the local cache", "cannot be reached", "winnow-tiny-clip")
    assert not not_runnable(line, "embed")
    assert time.monotonic() - start < 60  # no minute of download retries (the probe's own timeout is 3 s)
    assert "huggingface_hub" not in result.stderr


def test_a_checkpoint_is_loaded_as_the_model_its_run_recorded(tmp_path):
    import torch

    from winnow.pipeline.models.registry import load

    run = tmp_path / "runs" / "basic-seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "_manifest.json").write_text(json.dumps({"stage": "train", "params": {"model": "winnow-tiny-clip"}}))
    net, _, _ = load("winnow-tiny-clip", "", seed=3)
    ckpt = str(run / "checkpoints" / "epoch_1.pt")
    torch.save({"state_dict": net.state_dict()}, ckpt)
    again, _, _ = load("", ckpt)  # no model named: its run's
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    with pytest.raises(UserError, match="its run trained it as winnow-tiny-clip: pass --model winnow-tiny-clip"):
        load("winnow-tiny-vitamin", ckpt)
    vitamin, _, _ = load("winnow-tiny-vitamin", "", seed=3)
    torch.save(vitamin.state_dict(), str(tmp_path / "elsewhere.pt"))  # no run beside it: the default model is tried
    with pytest.raises(UserError, match="is not a winnow-tiny-clip checkpoint .*pass the --model it was trained as"):
        load("", str(tmp_path / "elsewhere.pt"))


@pytest.mark.e2e
def test_an_ingest_refused_by_the_url_policy_names_allow_hosts_and_the_rerun_names_what_differs(tmp_path):
    from winnow.pipeline.synth.hostile import HostileServer

    with HostileServer() as server:
        urls = tmp_path / "urls.parquet"
        pd.DataFrame({"url": [f"{server.url}/ok.jpg?{i}" for i in range(4)], "text": ["a"] * 4}).to_parquet(urls)
        pool = str(tmp_path / "pool")
        first = winnow("ingest", str(urls), pool, "--scheduler", "sync")
        line = one_line(first, 1, "the URL policy refused 127.0.0.1", "--allow-hosts 127.0.0.1")
        assert not not_runnable(line, "ingest")
        again = winnow("ingest", str(urls), pool, "--scheduler", "sync", "--allow-hosts", "127.0.0.1")
        one_line(again, 2, 'allow_hosts [] (here ["127.0.0.1"])', "--overwrite")
        fixed = winnow("ingest", str(urls), pool, "--scheduler", "sync", "--allow-hosts", "127.0.0.1", "--overwrite")
        assert fixed.returncode == 0, fixed.stderr


def test_near_misses_get_a_did_you_mean():
    import winnow
    from winnow.pipeline.stages.subset import load_recipe
    from winnow.pipeline.tasks import load_tasklist

    with pytest.raises(UserError, match="recipe 'clip_l14_30pc' not found; did you mean clip_l14_30pct\\?"):
        load_recipe("clip_l14_30pc")
    with pytest.raises(UserError, match="task list 'dem' not found; did you mean demo\\?"):
        load_tasklist("dem")
    with pytest.raises(UserError, match="unknown key 'thread_cont'; did you mean thread_count\\?"):
        winnow.ingest("urls.parquet", "pool", thread_cont=3)
    with pytest.raises(UserError, match="recipe 'zzzz' not found; give a YAML path or one of: basic"):
        load_recipe("zzzz")
