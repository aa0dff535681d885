"""MetaCLIP balancing (filters/metaclip.py): matching checked by hand and against the released rule (" entry " in
the spaced caption), the caps of the balancing, determinism across runs and part splits, and the shipped recipe
on DataComp-shaped metadata folders against the paper's algorithm computed directly."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import winnow.filters.metaclip as mc
from winnow.filters.english import languages
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.uid import UID_DTYPE
from winnow.pipeline.stages.subset import subset

QUIET = dict(log=lambda m: None)
MARKS = ",.;:?!`"


def _entries_file(tmp_path, names, name="entries.txt"):
    path = tmp_path / name
    path.write_text(json.dumps(names) if name.endswith(".json") else "\n".join(names) + "\n", encoding="utf-8")
    return str(path)


def _matches(captions, entries) -> list[set[str]]:
    rows, ids = mc.match(pa.array(captions, pa.large_string()), entries)
    names = entries.names.to_pylist()
    out = [set() for _ in captions]
    for r, i in zip(rows, ids):
        out[r].add(names[i])
    return out


def _spaced(text: str) -> str:
    """The released rule's caption: marks wrapped in spaces, tabs and newlines made spaces (lower-cased here)."""
    text = f" {text.lower()} "
    for mark in MARKS:
        text = text.replace(mark, f" {mark} ")
    for char in "\t\n\r":
        text = text.replace(char, " ")
    return text


# --- matching --------------------------------------------------------------------------------------------------

def test_matching_by_hand(tmp_path):
    names = ["cat", "dog", "hot dog", "New York", "new york city", "golden retriever", "St. Louis", "dog-friendly",
             "a"]
    entries = mc.load_entries(_entries_file(tmp_path, names))
    assert "st. louis" not in entries.names.to_pylist()  # a mark: never matches in the released rule either
    got = _matches(["A Hot Dog in New York City.", "concatenate the cats", "hot  dog!", "St. Louis", "dog-friendly",
                    None, "golden retriever, cat", "Golden\tRetriever\n", "", "dogs and catalogs"], entries)
    assert got == [{"a", "hot dog", "dog", "new york", "new york city"}, set(), {"hot dog", "dog"}, set(),
                   {"dog-friendly"}, set(), {"golden retriever", "cat"}, {"golden retriever"}, set(), set()]


def test_matching_equals_the_released_substring_rule_on_single_spaced_captions(tmp_path):
    words = ["a", "the", "dog", "hot", "cat", "new", "york", "city", "red", "car", "of", "photo", "golden",
             "retriever", "sale", "x"]
    names = ["dog", "hot dog", "cat", "new york", "new york city", "york city", "red car", "photo of a", "a",
             "golden retriever", "retriever", "city", "the cat", "of", "car", "sale", "x x", "dog dog dog"]
    entries = mc.load_entries(_entries_file(tmp_path, names))
    rng = np.random.default_rng(3)
    captions = []
    for _ in range(400):
        toks = [str(w) for w in rng.choice(words, rng.integers(1, 12))]
        captions.append(" ".join(t + (str(rng.choice(list(MARKS))) if rng.random() < 0.15 else "") for t in toks))
    expected = [{e for e in names if f" {e} " in _spaced(c)} for c in captions]
    assert _matches(captions, entries) == expected
    assert sum(map(len, expected)) > 1000


def test_entries_from_a_json_list_and_the_shipped_list(tmp_path):
    entries = mc.load_entries(_entries_file(tmp_path, ["New  York", "Paris", "x.y"], "metadata.json"))
    assert entries.names.to_pylist() == ["new york", "paris"] and entries.longest == 2
    shipped = mc.load_entries("")
    names = set(shipped.names.to_pylist())
    # WordNet lemmas, 0-99 (as MetaCLIP), ImageNet-1k and the synthetic world's class names
    assert {"dog", "golden retriever", "0", "99", "tench", "sand timer", "hot dog"} <= names
    assert len(names) > 140_000 and not any(m in n for n in names for m in MARKS)
    with pytest.raises(UserError, match="file not found"):
        mc.load_entries(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="JSON list of strings"):
        mc.load_entries(str(tmp_path / "bad.json"))


# --- balancing -------------------------------------------------------------------------------------------------

def _uids(n, seed=0):
    rng = np.random.default_rng(seed)
    uid = np.zeros(n, UID_DTYPE)
    uid["f0"], uid["f1"] = rng.integers(0, 2**63, n), rng.integers(0, 2**63, n)
    return uid


def test_scaled_t():
    assert mc.scaled_t(1_600_000_000) == 20_000  # the paper's pool and t
    assert mc.scaled_t(6_400_000) == 80  # half of DataComp small matching
    assert mc.scaled_t(3_000) == 20  # the floor


def test_each_entry_is_drawn_in_min_count_t_pairs_in_expectation():
    t, counts = 1000, np.array([20_000, 5_000, 1_000, 300])
    probs = mc.probabilities(counts, t)
    assert probs.tolist() == [0.05, 0.2, 1.0, 1.0]
    uid = _uids(int(counts.max()))
    keys = np.array([11, 22, 33, 44], np.uint64)
    for e, c in enumerate(counts):
        drawn = int((mc.draws(uid[:c], np.full(c, keys[e]), seed=5) < probs[e]).sum())
        sd = np.sqrt(c * probs[e] * (1 - probs[e]))
        assert abs(drawn - min(c, t)) <= 5 * sd  # exact when count <= t
    u = [mc.draws(uid, np.full(len(uid), k, np.uint64), seed=5) for k in keys[:2]]
    assert 0 <= min(u[0]) and max(u[0]) < 1 and abs(u[0].mean() - 0.5) < 0.01
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.05  # another entry: an independent draw
    assert not np.array_equal(u[0], mc.draws(uid, np.full(len(uid), keys[0]), seed=6))  # another seed


def test_balance_keeps_a_pair_when_any_entry_is_drawn():
    uid = _uids(4)
    rows, ids = np.array([0, 0, 1, 3]), np.array([0, 1, 1, 2])
    keys = np.array([1, 2, 3], np.uint64)
    assert mc.balance(4, rows, ids, uid, keys, np.ones(3), 0).tolist() == [True, True, False, True]  # row 2: none
    assert mc.balance(4, rows, ids, uid, keys, np.zeros(3), 0).tolist() == [False] * 4
    u = mc.draws(uid[rows], keys[ids], 0)
    probs = np.array([u[0] + 1e-9, u[1] - 1e-9, 1.0])  # row 0 drawn by entry 0 only
    assert mc.balance(4, rows, ids, uid, keys, probs, 0).tolist() == [True, u[2] < probs[1], False, True]


def test_the_score_orders_pairs_by_the_t_at_which_balancing_keeps_them():
    """score >= 1 is the balancing at the filter's t, and score x t' / t >= 1 the balancing at any other t'
    (the draws fixed): top_fraction over the score is MetaCLIP at the t that keeps that share."""
    rng = np.random.default_rng(2)
    n, entries = 3000, 40
    uid = _uids(n)
    rows = np.sort(rng.integers(0, n - 100, 5000))  # the last 100 rows match nothing
    ids = rng.integers(0, entries, len(rows))
    counts = np.bincount(ids, minlength=entries) * rng.integers(1, 4, entries)
    keys = np.arange(1, entries + 1, dtype=np.uint64)
    t0 = 100.0
    thresholds = mc.entry_thresholds(n, rows, ids, uid, keys, counts, 7)
    score = mc.rank_scores(mc.balance(n, rows, ids, uid, keys, mc.probabilities(counts, t0), 7), thresholds, t0)
    assert np.isnan(score[n - 100:]).all() and np.isfinite(score[: n - 100][np.isin(np.arange(n - 100), rows)]).all()
    for t in (3.0, 30.0, 100.0, 250.0, 10**6):
        balanced = mc.balance(n, rows, ids, uid, keys, mc.probabilities(counts, t), 7)
        with np.errstate(invalid="ignore"):
            by_score = score * (t / t0) >= 1
        assert (balanced != by_score).sum() == 0 if t == t0 else (balanced != by_score).sum() <= 1  # rounding only
        assert 0 < balanced.sum() <= n - 100


# --- the filter and the recipe on DataComp-shaped metadata folders ---------------------------------------------

CLASSES = ["dog", "cat", "hot dog", "golden retriever", "red car", "bicycle", "teapot", "lighthouse", "violin",
           "cactus"]
TEMPLATES = ["a photo of a {}", "my {} in the garden", "{} for sale, great condition", "close-up of the {}!",
             "the {} at night"]
OTHER = ["une photo d'un chien dans le jardin", "ein Hund im Garten mit Ball", "qxzv wprtk zzkj", "un chat noir"]


def _frame(n=480, seed=0):
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, len(CLASSES) + 1)
    cls = rng.choice(len(CLASSES), n, p=weights / weights.sum())
    text = [OTHER[i % len(OTHER)] if i % 12 == 5 else TEMPLATES[rng.integers(len(TEMPLATES))].format(CLASSES[c])
            for i, c in enumerate(cls)]
    uid = [f"{a:016x}{b:016x}" for a, b in zip(rng.integers(0, 2**63, n), rng.integers(0, 2**63, n))]
    return pd.DataFrame({"uid": uid, "url": [f"http://example.com/{u}.jpg" for u in uid], "text": text})


def _write(folder, frame, splits):
    os.makedirs(folder, exist_ok=True)
    for j, (a, b) in enumerate(zip([0, *splits], [*splits, len(frame)])):
        frame.iloc[a:b].to_parquet(os.path.join(folder, f"{j:032x}.parquet"))
    return str(folder)


def _shipped_oracle():
    """The shipped entries by first word, read from the file as the released rule would use them."""
    by_first: dict[str, list[str]] = {}
    with open(mc.SHIPPED, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                entry = line.split("\t", 1)[0]
                if not any(m in entry for m in MARKS):
                    by_first.setdefault(entry.split(" ")[0], []).append(entry)
    return by_first


def _expected(frame, t, seed):
    """Algorithm 1 directly: the released matching, counts over the English rows, p = min(1, t / count), a row
    kept when one of its entries' draws (the filter's hash of uid, entry and seed) is below p."""
    by_first = _shipped_oracle()
    english = np.array(languages(frame["text"].tolist())) == "en"
    matched = []
    for text in frame["text"]:
        spaced = _spaced(text)
        matched.append({e for w in set(spaced.split()) for e in by_first.get(w, []) if f" {e} " in spaced})
    counts: dict[str, int] = {}
    for ok, found in zip(english, matched):
        for e in found if ok else ():
            counts[e] = counts.get(e, 0) + 1
    t = t or max(20, round(20_000 * sum(bool(m) for m, ok in zip(matched, english) if ok) / 1.6e9))
    entries = mc.load_entries("")
    key = dict(zip(entries.names.to_pylist(), entries.keys))
    uid = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in frame["uid"]], UID_DTYPE)
    keep = np.zeros(len(frame), bool)
    for i, (ok, found) in enumerate(zip(english, matched)):
        for e in sorted(found) if ok else ():
            if mc.draws(uid[i: i + 1], np.array([key[e]], np.uint64), seed)[0] < min(1.0, t / counts[e]):
                keep[i] = True
    kept = uid[keep]
    kept.sort()
    return kept, english, matched, counts


def _run(folder, out, cache, **variables):
    doc = subset("metaclip_balanced", folder, str(out), None, variables={k: str(v) for k, v in variables.items()},
                 cache=str(cache), **QUIET)
    return np.load(os.path.join(out, "uids.npy"), allow_pickle=False), doc


def test_recipe_equals_the_papers_algorithm_on_a_metadata_folder(tmp_path):
    frame = _frame()
    folder = _write(tmp_path / "meta", frame, [160, 320])
    expected, english, matched, counts = _expected(frame, 0, 0)
    got, doc = _run(folder, tmp_path / "out", tmp_path / "cache")  # t: 0, scaled to the pool: the floor, 20
    assert got.dtype == UID_DTYPE and np.array_equal(got, expected)
    assert doc["rows"] == len(frame) and 0 < len(expected) < int(english.sum())
    assert max(counts.values()) > 20 * 5  # "a" and the head classes are capped ...
    assert len(expected) > 20  # ... and the tail keeps its pairs
    # with t above every count, balancing keeps every English caption that matches an entry
    everything, _, _, _ = _expected(frame, 10**9, 0)
    keep_all = np.sort(np.array([(int(u[:16], 16), int(u[16:], 16)) for u, ok, m in
                                 zip(frame["uid"], english, matched) if ok and m], UID_DTYPE))
    assert np.array_equal(everything, keep_all) and len(keep_all) < len(frame)  # French, German, gibberish out
    got, _ = _run(folder, tmp_path / "all", tmp_path / "cache", t=10**9)
    assert np.array_equal(got, keep_all)


def test_the_subset_depends_on_the_seed_only_not_on_parts_or_runs(tmp_path):
    frame = _frame(seed=1)
    a, _ = _run(_write(tmp_path / "three", frame, [100, 300]), tmp_path / "a", tmp_path / "c1", t=5, seed=3)
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    b, _ = _run(_write(tmp_path / "two", shuffled, [17]), tmp_path / "b", tmp_path / "c2", t=5, seed=3)
    again, _ = _run(_write(tmp_path / "again", frame, [100, 300]), tmp_path / "c", tmp_path / "c3", t=5, seed=3)
    assert np.array_equal(a, b) and np.array_equal(a, again) and len(a) > 0
    assert np.array_equal(a, _expected(frame, 5, 3)[0])
    other, _ = _run(_write(tmp_path / "other", frame, [100, 300]), tmp_path / "d", tmp_path / "c4", t=5, seed=4)
    assert not np.array_equal(a, other)


def test_bad_parameters_are_one_line_errors(tmp_path):
    folder = _write(tmp_path / "meta", _frame(48), [24])
    with pytest.raises(UserError, match="metaclip.entries .*file not found"):
        _run(folder, tmp_path / "out", tmp_path / "cache", entries=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="metaclip: t is a number of pairs"):
        _run(folder, tmp_path / "out2", tmp_path / "cache", t=-1)


def test_only_candidates_are_counted(tmp_path):
    # 40 "a photo of a dog" rows, 30 of them failed downloads: the 10 candidates count 10 <= t, so all are kept
    frame = _frame(40)
    frame["text"] = "a photo of a dog"
    frame["state"] = ["ok"] * 10 + ["http_error"] * 30
    got, doc = _run(_write(tmp_path / "pool", frame, [20]), tmp_path / "out", tmp_path / "cache", t=10)
    ok = np.sort(np.array([(int(u[:16], 16), int(u[16:], 16)) for u in frame["uid"][:10]], UID_DTYPE))
    assert doc["kept"] == 10 and np.array_equal(got, ok)
