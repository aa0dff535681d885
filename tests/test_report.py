"""The statistics behind the training table, ``winnow compare`` and the HTML report (opened in a real browser)."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from winnow.pipeline.core import fsio
from winnow.pipeline.tasks import Task, samples_path
from winnow.pipeline.tasks.stats import compare, estimate, holm

# ------------------------------------------------------------------------------------------------ statistics


def test_interval_covers_a_known_mean_at_its_level():
    rng = np.random.default_rng(0)
    covered = [(e.low <= 0.3 <= e.high) for e in (estimate([rng.random((1, 200)) < 0.3], n_boot=1000, seed=i)
                                                   for i in range(300))]
    assert 0.92 <= np.mean(covered) <= 0.99


def test_interval_counts_seed_variation():
    """Seeds shift the whole model (the between-seed spread dominates): the interval over images and seeds covers
    the mean over seeds and images; one over the images alone would not."""
    rng = np.random.default_rng(1)
    both, images_only = [], []
    for i in range(200):
        p = rng.uniform(0.2, 0.6, 300)  # mean 0.4
        x = rng.random((3, 300)) < np.clip(p + rng.normal(0, 0.05, 3)[:, None], 0, 1)
        e, e1 = estimate([x], n_boot=1000, seed=i), estimate([x.mean(0, keepdims=True)], n_boot=1000, seed=i)
        both.append(e.low <= 0.4 <= e.high)
        images_only.append(e1.low <= 0.4 <= e1.high)
        assert e.seeds == 3 and e.spread == pytest.approx(np.ptp(x.mean(1)))
    assert np.mean(both) >= 0.92 and np.mean(images_only) < 0.85


def test_paired_test_finds_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(2)
    a = rng.random((1, 500)) < 0.5
    b = a.copy()
    b[0, np.flatnonzero(~a[0])[:40]] = True  # B is right on 40 more images (+0.08)
    d = compare([b], [a], seed=0)
    assert d.significant and d.p < 0.001 and d.diff == pytest.approx(0.08) and d.low > 0
    false = []
    for i in range(200):  # same per-image difficulty, independent outcomes: no difference
        p = rng.uniform(0.1, 0.9, 400)
        false.append(compare([rng.random((1, 400)) < p], [rng.random((1, 400)) < p], n_boot=1000, seed=i).significant)
    assert np.mean(false) <= 0.09
    assert compare([a], [a.copy()]).p == 1.0


def test_seed_noise_larger_than_a_difference_makes_it_not_significant():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.2, 0.8, 2000)
    a = rng.random((3, 2000)) < np.clip(p + 0.03 + np.array([-0.08, 0.0, 0.08])[:, None], 0, 1)
    b = rng.random((3, 2000)) < np.clip(p + np.array([0.08, -0.08, 0.0])[:, None], 0, 1)
    assert compare([a.mean(0, keepdims=True)], [b.mean(0, keepdims=True)]).significant  # images only: "yes"
    assert not compare([a], [b]).significant  # with the seeds' spread: no


def test_tasks_share_the_image_draw_and_need_the_same_images():
    a = np.array([[1.0, 0.0, 1.0, 1.0]])
    assert estimate([a, 1 - a]).low == estimate([a, 1 - a]).high == 0.5  # the same draw for both tasks
    with pytest.raises(ValueError):
        compare([a], [np.ones((1, 5))])


def test_deterministic_for_a_seed():
    x = np.random.default_rng(4).random((2, 50))
    assert estimate([x], seed=7) == estimate([x], seed=7)


# ------------------------------------------------------------------------------------- a run folder on disk

TASKS = [Task("shapes", "zeroshot_classification", "eval", "acc1", 0.0833),
         Task("shapes-retrieval", "retrieval", "eval", "mean_recall@1", 0.01),
         Task("dist", "odd_one_out", "dist", "acc", 1 / 3)] + [
    Task(f"patchmix-mix-g7-r{x}", "zeroshot_classification", f"pm{x}", "acc1", 0.0833, "mix-g7", x)
    for x in (0.0, 0.25, 0.5)]


def write_eval(out, tasks, outcomes: dict, samples=True):
    """An evaluation folder as `winnow evaluate` writes it: manifest, summary, results lines, samples."""
    mains = {t.name: float(np.mean(outcomes[t.name])) for t in tasks}
    for t in tasks:
        if samples:
            os.makedirs(os.path.dirname(samples_path(out, t.name)), exist_ok=True)
            np.save(samples_path(out, t.name), np.asarray(outcomes[t.name], np.float32))
    curve = [t for t in tasks if t.curve]
    summary = {"average": float(np.mean([mains[t.name] for t in tasks if not t.diagnostic])), "tasks": mains}
    if curve:
        ys = [mains[t.name] for t in curve]
        summary["curves"] = {"mix-g7": {"x": [t.x for t in curve], "y": ys, "auc": float(np.mean(ys))}}
    fsio.write_json(os.path.join(out, "summary.json"), summary)
    fsio.write_bytes(os.path.join(out, "eval_results.jsonl"), "".join(
        json.dumps({"key": n, "dataset": n, "metrics": {"main_metric": m}}) + "\n" for n, m in mains.items()).encode())
    fsio.write_json(os.path.join(out, "_manifest.json"), {"stage": "evaluate", "params": {
        "model": "m", "pretrained": "x.pt", "tasks": [asdict(t) for t in tasks]}})


def write_training(logs, name, size, rate, rng, samples=True):
    run = os.path.join(logs, name)
    fsio.write_json(os.path.join(run, "_manifest.json"), {"stage": "train", "rows": {"samples": size}})
    fsio.write_bytes(os.path.join(run, "out.log"), "".join(  # open_clip_train's step lines, a falling loss
        f"2026-01-01,00:00:00 | INFO | Train Epoch: 0 [ {n:>4}/1280 ({n / 12.8:.0f}%)] Data (t): 0.01 Batch (t): "
        f"0.2, 590.0/s, 590.0/s/gpu LR: 0.000500 Logit Scale: 14.2 Contrastive_loss: {4 - n / 640:.4f} "
        f"(4.0) Loss: {4 - n / 640:.4f} (4.0)\n" for n in range(128, 1281, 128)).encode())
    outcomes = {t.name: rng.random(60 if t.kind == "odd_one_out" else 150) < (
        rate * (1 - t.x) if t.curve else 0.5 if t.kind == "odd_one_out" else rate) for t in TASKS}
    write_eval(os.path.join(run, "eval"), TASKS, outcomes, samples)
    return run


def make_pool(pool, rows_per_shard=24, shards=2):
    """A pool of small images with varied captions and sizes, a few failed rows."""
    from PIL import Image

    from winnow.pipeline.data.shards import write_shard

    words = ["a red circle on grass", "dog", "the blue square", "photo", "a green triangle near water", "x y"]
    uids = []
    for s in range(shards):
        rows, images = [], {}
        for i in range(rows_per_shard):
            key, n = f"{s:04d}{i:04d}", s * rows_per_shard + i
            uid = f"{n + 1:032x}"
            state = "ok" if i % 8 else "http_error"
            rows.append({"uid": uid, "key": key, "caption": words[n % len(words)], "url": f"http://h/{n}.jpg",
                         "status": "success" if state == "ok" else "failed_to_download", "error_message": None,
                         "width": 32, "height": 32, "original_width": 40 + 20 * (n % 7), "original_height": 40,
                         "state": state})
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), ((37 * n) % 256, (91 * n) % 256, 160)).save(buf, "JPEG")
            images[key] = buf.getvalue()
            uids.append((uid, state))
        write_shard(str(pool), s, rows, images)
    fsio.write_json(os.path.join(pool, "_manifest.json"), {"stage": "ingest", "rows": {"input": len(uids) + 2}})
    return uids


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A demo-shaped folder: pool, two one-filter subsets made by `subset`, a dedup table, a world's truth,
    trained runs of three subsets (3, 3 and 1 seeds) and the demo's summary with timings."""
    from winnow.pipeline.stages.subset import subset

    root = tmp_path_factory.mktemp("demo")
    pool = root / "pool"
    uids = make_pool(pool)
    for ref in ("filter_caption_words", "filter_aspect_ratio"):
        subset(ref, str(pool), str(root / "subsets" / "filters" / ref.removeprefix("filter_")), None,
               cache=str(root / "cache"), log=lambda m: None)
    ok = [u for u, s in uids if s == "ok"]
    pd.DataFrame({"uid": ok[:3] + ok[5:7], "kind": ["exact_image"] * 3 + ["near"] * 2,
                  "group": [ok[0]] * 3 + [ok[5]] * 2, "kept": [True, False, False, True, False],
                  "similarity": [1.0, 1.0, 1.0, 0.97, 0.97]}).to_parquet(
        os.makedirs(pool / "dedup" / "copy") or pool / "dedup" / "copy" / "duplicates.parquet")
    os.makedirs(root / "world")
    pd.DataFrame({"uid": [u for u, _ in uids], "defect": ["short_caption" if i % 6 in (1, 3, 5) else "none"
                                                          for i in range(len(uids))]}).to_parquet(
        root / "world" / "truth.parquet")
    rng = np.random.default_rng(0)
    logs = root / "train"
    for name, size, rate, seeds in (("no_filter", 42, 0.30, 3), ("caption_words", 28, 0.45, 3),
                                    ("aspect_ratio", 35, 0.32, 1)):
        for k in range(seeds):
            write_training(logs, f"{name}-seed{k}", size, rate, rng)
    fsio.write_json(root / "report" / "summary.json", {
        "runs": {"no_filter": [{"seed": k} for k in range(3)], "caption_words": [{"seed": k} for k in range(3)],
                 "aspect_ratio": [{"seed": 0}]},
        "timings": {"synth": {"s": 0.4, "reused": True}, "ingest": {"s": 12.5, "reused": False}}})
    return root


def test_compare_groups_seeds_and_tests_against_the_first(demo_folder):
    result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "compare", str(demo_folder / "train" /
                             "no_filter-seed0"), *[str(demo_folder / "train" / f"caption_words-seed{k}")
                                                   for k in range(3)]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["no_filter"].split()[1] == "1" and lines["caption_words"].split()[1] == "3"
    # 0.45 vs 0.30 on 150 images, but the baseline has one seed: its seed variance is unknown, so no verdict
    assert re.search(r"\+0\.[12]\d\d .*one seed: no seed variance$", lines["caption_words"])
    assert "significant" not in lines["caption_words"]
    assert re.search(r"\]\u2020", lines["no_filter"]) and "n/a" not in result.stdout  # its interval is marked
    assert "one seed: no seed variance: a side has a single seed" in result.stdout


def test_three_seeds_each_give_a_holm_adjusted_verdict(demo_folder):
    from winnow.workflows.compare import compare_runs

    text = compare_runs([str(demo_folder / "train" / f"{n}-seed{k}") for n in ("no_filter", "caption_words")
                         for k in range(3)])
    line = next(ln for ln in text.splitlines() if ln.startswith("caption_words"))
    assert line.endswith(" significant") and "\u2020" not in text and "nan" not in text


def test_holm_adjusts_a_family_of_p_values():

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.9, 0.8]) == [1.0, 1.0] and holm([0.2, 0.01]) == [0.2, 0.02]


def test_runs_evaluated_on_other_eval_data_are_never_paired(tmp_path):
    """Two models evaluated on two eval sets of the same size (another world): compare and report refuse in one
    line naming both runs, instead of pairing images that are not the same."""
    rng = np.random.default_rng(9)
    a = write_training(tmp_path / "x", "a-seed0", 10, 0.4, rng)
    b = write_training(tmp_path / "y", "b-seed0", 10, 0.4, rng)
    for run, fp in ((a, "sha256:aaaa"), (b, "sha256:bbbb")):
        summary = json.load(open(os.path.join(run, "eval", "summary.json")))
        summary["details"] = {t.name: {"fingerprint": fp} for t in TASKS}
        fsio.write_json(os.path.join(run, "eval", "summary.json"), summary)
    for command in (["compare", a, b], ["report", a, b, "--out", str(tmp_path / "r.html")]):
        result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", *command],
                                capture_output=True, text=True, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "a-seed0 and b-seed0 were evaluated on different eval data" in lines[0]
        assert "nan" not in result.stdout and "Warning" not in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_runs_without_samples_show_intervals_unavailable(tmp_path):
    from winnow.workflows.compare import compare_runs

    rng = np.random.default_rng(5)
    runs = [write_training(tmp_path, f"old-seed{k}", 10, 0.3, rng, samples=False) for k in range(2)]
    text = compare_runs(runs)
    assert "old" in text and "n/a" in text and "evaluate` again" in text


def test_compare_names_what_it_needs():
    result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "compare", "/nonexistent/run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("winnow: error: ") and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------- the HTML report

SECTIONS = ("summary", "ledger", "filters", "recipes", "dedup", "training", "loss", "size", "robustness", "timings")


def browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_has_its_sections_from_files(demo_folder, tmp_path):
    from winnow.workflows.report import html_report

    out = html_report([str(demo_folder)], str(tmp_path / "r.html"), log=lambda m: None)
    page = open(out).read()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert page.count('<figure class="kept">') >= 2 * 2 and page.count('<figure class="dropped">') >= 2
    assert "data:image/jpeg;base64," in page and "<script" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    assert "reused" in page and "12.5" in page
    assert "caption_words vs no_filter" in page and "chance 0.083" in page  # headline pairs, curves' chance line
    assert "short_caption" in page  # planted-defect recall per recipe


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_a_browser_without_console_errors(demo_folder, tmp_path):
    from winnow.workflows.report import html_report

    out = html_report([str(demo_folder)], str(tmp_path / "report.html"), log=lambda m: None)
    shot = tmp_path / "report.png"
    run = subprocess.run([browser(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                          "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,4000",
                          f"--screenshot={shot}", "--dump-dom", f"file://{out}"],
                         capture_output=True, text=True, timeout=120)
    if os.environ.get("WINNOW_REPORT_SHOT"):
        shutil.copy(shot, os.environ["WINNOW_REPORT_SHOT"])
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert shot.exists() and shot.stat().st_size > 10_000
    run = subprocess.run([browser(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                          "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{out}"],
                         capture_output=True, text=True, timeout=120)
    dom = run.stdout
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in dom
    assert dom.count("<svg") >= 4 and "<table>" in dom


def test_report_command_on_training_runs_only(demo_folder, tmp_path):
    runs = [str(demo_folder / "train" / n) for n in ("no_filter-seed0", "no_filter-seed1", "aspect_ratio-seed0")]
    out = tmp_path / "only_runs.html"
    result = subprocess.run([sys.executable, "-m", "winnow.workflows.cli", "report", *runs, "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert '<section id="training">' in page and '<section id="ledger">' not in page  # no pool: no pool sections
    assert "aspect_ratio vs no_filter" in page


def test_counts_with_gaps_show_as_whole_numbers():
    """A count column read back from JSON (numbers and nulls) shows 412, not 412.000; shares keep 3 decimals."""

    from winnow.workflows import html

    page = html.table(pd.DataFrame([{"kind": "a", "dropped": None, "precision": None},
                                    {"kind": "b", "dropped": 412.0, "precision": 0.84}]))
    assert ">412<" in page and ">0.840<" in page and "412.000" not in page


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_report_opens_with_its_answer_in_the_first_screen(demo_folder, tmp_path):
    """In a real browser at a laptop's window size, the summary box (its background colour) is on the first screen,
    and its words name the best subset and the verdict."""
    from PIL import Image

    from winnow.workflows.report import html_report

    out = html_report([str(demo_folder)], str(tmp_path / "report.html"), log=lambda m: None)
    page = open(out).read()
    assert page.index('id="summary"') < page.index('id="training"') < page.index('id="ledger"')
    answer = re.search(r'<p class="answer">(.*?)</p>', page).group(1)
    assert "caption_words" in answer and "p (Holm)" in answer and "significant" in answer
    shot = tmp_path / "first_screen.png"
    subprocess.run([browser(), "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'p'}",
                    "--window-size=1280,800", "--hide-scrollbars", f"--screenshot={shot}", f"file://{out}"],
                   capture_output=True, text=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    box = (np.abs(pixels.astype(int) - [0xEE, 0xF5, 0xFC]).sum(axis=1) <= 3).sum()
    assert box > 20_000, box  # the answer's box, some 900 x 60 px, is drawn within the first 800 px
