"""MetaCLIP curation (Xu et al. 2023, "Demystifying CLIP Data", arXiv 2309.16671): column ``metaclip_score``, at
least 1.0 exactly for the pairs the balancing at ``t`` keeps; a recipe keeps ``score >= 1`` (``metaclip_balanced``).
The score is t / t_pair, t_pair the smallest t at which the balancing keeps the pair (the draws fixed), so the
score orders the pairs by how early balancing admits them: ``top_fraction`` over it is the balancing at the t that
keeps that share of the pool (``demo_metaclip30``: MetaCLIP at the size of the other 30% subsets). Pairs matching
no entry (or not English) score NaN: no t keeps them.

The method (the paper's Algorithm 1, its released ``substr_matching.py`` and ``balancing.py``):

1. sub-string matching: entry e matches a caption when " e " occurs in it once spaces are put around each of
   ``, . ; : ? ! ``` and tabs and newlines are made spaces; a caption's matches are a set of entries;
2. count(e) = the captions of the pool matching e;
3. balancing: each pair draws each of its entries independently with probability p(e) = min(1, t / count(e)) and
   is kept when any entry is drawn; a pair matching no entry is dropped. Entry e is thus drawn in min(count(e),
   t) pairs in expectation: an entry with at most t pairs keeps them all, a more frequent one about t.

Matching here is a lookup of word n-grams, not a scan of the caption for each entry (150,000 entries x 12.8M
captions): the caption is lower-cased (Arrow's ``utf8_lower``), each of the seven marks becomes a token of its
own, the rest is split on whitespace, and every run of consecutive tokens, joined by one space, that is an entry
is a match (a run is extended one token at a time while it is the first words of some entry, so the lookups are
about one per token). That is sub-string matching on word boundaries: "cat" matches "a cat, asleep" but not
"concatenate" or "cats", as in the released rule and unlike raw ``entry in caption`` matching, which would credit
the head entries with every longer word containing them. Where it differs from the released code:

- case: both sides are lower-cased. MetaCLIP's metadata kept Wikipedia titles' capitals and its matching is
  case-sensitive; the shipped entries are lower-case, so "Dog" at the start of a caption matches "dog";
- whitespace: any run of Unicode whitespace separates two words (the released code needs exactly one space:
  "hot  dog" does not match "hot dog" there);
- an entry holding one of the seven marks can never match in the released rule and is dropped here.

Entries: ``filters/data/metaclip_entries.tsv`` (WordNet 3.0 lemmas, 0-99, ImageNet-1k class names, the synthetic
world's classes; its generator ``filters/data/make_metaclip_entries.py`` gives the provenance). The paper's list
also had Wikipedia unigrams, bigrams and titles (500,000 entries); ``entries: PATH`` takes another list: a JSON
list of strings (the released ``metadata.json``) or a text file of one entry per line (a TSV's first column).

Not published, chosen here:

- ``english`` (default true): only captions that fastText's lid.176 calls English are counted and can be kept
  (the released ``cc_matching.py`` runs language id before matching);
- the pool counted is the candidates (ledger state ok; every row of a DataComp metadata file);
- ``t: 0`` (default) scales the paper's t = 20,000, set for a pool of 1.6B matched pairs curated to 400M, to the
  pool at the same t / pool: t = max(20, round(20,000 x matched candidates / 1.6B)) (DataComp small: t = 80 if
  half its 12.8M captions are English and match); the floor keeps a tiny pool from capping entries below 20
  pairs. Any other ``t`` is used as given;
- the draws are deterministic: u = a splitmix64 hash of (uid, entry, seed) mapped to [0, 1), entry drawn when u <
  p(e). The entry's part of the hash is a hash of its text, so the result depends neither on the parts' order,
  the worker count, nor on the other entries in the list.

``prepare`` (on the driver) reads the caption and state columns part by part and adds each part's matches into
one count per entry (int64: 1.2 MB for the shipped list); ``entry_counts.npy`` in the score cache folder is that
count (the paper's released distribution over its metadata). ``score`` matches its part in batches of 65,536
captions and draws.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError

from .base import Filter
from .caption_words import captions
from .english import EnglishFilter

SHIPPED = os.path.join(os.path.dirname(__file__), "data", "metaclip_entries.tsv")
MARKS = ",.;:?!`"  # the released spacing() wraps these in spaces
PAPER_T, PAPER_POOL, T_MIN = 20_000, 1_600_000_000, 20
BATCH = 65_536  # captions matched at once


@dataclass(frozen=True)
class Entries:
    """The metadata: ``names`` (lower case, one space between words), a 64-bit hash of each, the proper word
    prefixes of the multi-word ones, and the words of the longest."""

    names: pa.Array
    keys: np.ndarray
    prefixes: pa.Array
    longest: int


def tokens(text: pa.Array) -> pa.ListArray:
    """Each text's tokens: lower-cased, the seven marks split off, whitespace-separated."""
    text = pc.utf8_lower(pc.fill_null(pa.array(text, pa.large_string()), ""))
    text = pc.replace_substring_regex(text, "[,.;:?!`]", r" \0 ")
    return pc.utf8_split_whitespace(pc.utf8_trim_whitespace(text))


def _read_names(path: str) -> list[str]:
    if not path:
        with open(SHIPPED, encoding="utf-8") as f:
            return [line.split("\t", 1)[0] for line in f if not line.startswith("#")]
    if not fsio.exists(path):
        raise UserError(f"metaclip.entries {path!r}: file not found; give a JSON list of strings or a text file of "
                        "one entry per line, or leave it empty for the shipped list")
    with fsio.open_read(path) as f:
        raw = f.read().decode("utf-8", "replace")
    if path.endswith(".json"):
        names = json.loads(raw)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"metaclip.entries {path!r}: expected a JSON list of strings")
        return names
    return [line.split("\t", 1)[0] for line in raw.splitlines() if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=4)
def load_entries(path: str = "") -> Entries:
    """The entries of ``path`` (empty: the shipped list), normalised as captions are; those holding a mark dropped."""
    words = tokens(pa.array(_read_names(path), pa.large_string())).to_pylist()
    names = sorted({" ".join(w) for w in words if w and not any(c in MARKS for t in w for c in t)})
    if not names:
        raise UserError(f"metaclip.entries {path!r}: no entry left (an entry with , . ; : ? ! ` never matches)")
    keys = np.array([int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") for n in names],
                    np.uint64)
    split = [n.split(" ") for n in names]
    prefixes = sorted({" ".join(w[:k]) for w in split for k in range(1, len(w))})
    return Entries(pa.array(names, pa.large_string()), keys, pa.array(prefixes, pa.large_string()),
                   max(len(w) for w in split))


def match(text: pa.Array, entries: Entries) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, entry index) with the entry in that row's text, each pair once, sorted by row then entry."""
    text = pa.array(text, pa.large_string())
    found = []
    for start in range(0, len(text), BATCH):
        toks = tokens(text.slice(start, BATCH))
        flat = pc.list_flatten(toks)
        row = pc.list_parent_indices(toks).to_numpy().astype(np.int64) + start
        pos, gram = np.arange(len(flat)), flat  # runs of n tokens starting at pos
        for n in range(1, entries.longest + 1):
            idx = pc.fill_null(pc.index_in(gram, value_set=entries.names), -1).to_numpy()
            hit = idx >= 0
            found.append(row[pos[hit]] * len(entries.names) + idx[hit])
            more = pc.is_in(gram, value_set=entries.prefixes).to_numpy(zero_copy_only=False) & (pos + n < len(flat))
            more[more] = row[pos[more] + n] == row[pos[more]]  # the next token is the same caption's
            if n == entries.longest or not more.any():
                break
            pos = pos[more]
            gram = pc.binary_join_element_wise(gram.filter(pa.array(more)), flat.take(pa.array(pos + n)),
                                              pa.scalar(" ", pa.large_string()))
    pairs = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs  # each pair once
    return pairs // len(entries.names), pairs % len(entries.names)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draws(uid: np.ndarray, keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per (uid ``u8,u8``, entry key, seed), the same on every machine."""
    h = _mix(np.asarray(uid["f0"], np.uint64) ^ _mix(np.full(len(uid), seed % 2**64, np.uint64)))
    h = _mix(_mix(h ^ np.asarray(uid["f1"], np.uint64)) ^ np.asarray(keys, np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p(e) = min(1, t / count(e)) (1 for an entry no caption matched)."""
    return np.minimum(1.0, t / np.maximum(np.asarray(counts, np.float64), 1.0))


def balance(n: int, rows: np.ndarray, ids: np.ndarray, uid: np.ndarray, keys: np.ndarray, probs: np.ndarray,
            seed: int) -> np.ndarray:
    """Which of ``n`` rows are kept: a row is kept when one of its (row, entry) pairs is drawn."""
    keep = np.zeros(n, bool)
    if len(rows):
        keep[rows[draws(uid[rows], keys[ids], seed) < probs[ids]]] = True
    return keep


def entry_thresholds(n: int, rows: np.ndarray, ids: np.ndarray, uid: np.ndarray, keys: np.ndarray,
                     counts: np.ndarray, seed: int) -> np.ndarray:
    """Per row, the smallest t at which balancing keeps it: entry e is drawn when u < min(1, t / count(e)), that
    is when t > u x count(e), so the row enters at the least u x count(e) over its entries (inf: no entry)."""
    out = np.full(n, np.inf)
    if len(rows):
        np.minimum.at(out, rows, draws(uid[rows], keys[ids], seed) * np.maximum(counts[ids], 1))
    return out


def rank_scores(keep: np.ndarray, thresholds: np.ndarray, t: float) -> np.ndarray:
    """t / t_row, made to agree exactly with ``keep`` (the draws against p(e)) at the rounding boundary: >= 1 for
    a kept row, < 1 for another; NaN for a row no t keeps."""
    with np.errstate(divide="ignore"):
        ratio = t / np.maximum(thresholds, 2.0**-60)
    ratio = np.where(keep, np.maximum(ratio, 1.0), np.minimum(ratio, np.nextafter(1.0, 0.0)))
    return np.where(np.isinf(thresholds), np.nan, ratio)


def scaled_t(matched: int) -> int:
    """The paper's t = 20,000 for 1.6B matched pairs, at the same t / pool for ``matched`` pairs, at least 20."""
    return max(T_MIN, round(PAPER_T * matched / PAPER_POOL))


@functools.lru_cache(maxsize=4)
def _counts(path: str) -> np.ndarray:
    return fsio.load_npy(path, f"metaclip entry counts {path}")


@dataclass
class MetaclipFilter(Filter):
    key = "metaclip"
    requires = ("caption", "uid")  # draws are a hash of the uid
    t: int = 0  # 0: 20,000 scaled to the pool (see above)
    seed: int = 0
    entries: str = ""  # empty: the shipped list
    english: bool = True  # only English captions (fastText lid.176) count and are kept
    fasttext_model: str = ""  # the language id model (empty: the shipped lid.176.ftz)
    counts_path: str = ""  # set by prepare
    t_used: int = 0  # set by prepare

    def __post_init__(self):
        if self.t < 0:
            raise UserError(f"metaclip: t is a number of pairs (0: scaled to the pool), not {self.t!r}")

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k not in ("counts_path", "t_used")}

    def _english(self, table: pd.DataFrame) -> np.ndarray:

        if not self.english:
            return np.ones(len(table), bool)
        return EnglishFilter(fasttext_model=self.fasttext_model).score(table, {}).to_numpy() == 1

    def prepare(self, context: Any) -> None:
        from winnow.pipeline.data.ledger import OK

        table = load_entries(self.entries)
        counts = np.zeros(len(table.names), np.int64)
        candidates = matched = 0
        for _, part in context.each_table(("caption",)):
            ok = np.asarray(part["state"].to_numpy() == OK, bool) & self._english(part)
            rows, ids = match(captions(part), table)
            use = ok[rows]
            counts += np.bincount(ids[use], minlength=len(counts))
            matched += int(np.count_nonzero(np.diff(rows[use]))) + 1 if use.any() else 0  # rows are sorted
            candidates += int(ok.sum())
        t = self.t or scaled_t(matched)
        self.counts_path, self.t_used = context.save("entry_counts.npy", counts), int(t)
        context.log(f"metaclip: {matched:,} of {candidates:,} {'English ' if self.english else ''}candidate captions "
                    f"match one of {len(counts):,} entries; t = {t:,}: {int((counts > t).sum()):,} entries above t, "
                    f"{int(np.minimum(counts, t).sum()):,} entry draws expected")

    def score(self, part, embeddings):
        from winnow.pipeline.data.uid import uids_to_array

        if not self.counts_path:
            raise ValueError("metaclip: prepare() has not run")
        table = load_entries(self.entries)
        counts = _counts(self.counts_path)
        if len(counts) != len(table.names):
            raise ValueError("metaclip: the entry counts do not belong to this entry list; run prepare() again")
        rows, ids = match(captions(part), table)
        uid = uids_to_array(part["uid"].array, sort=False) if len(rows) else np.zeros(0, "u8,u8")
        keep = balance(len(part), rows, ids, uid, table.keys, probabilities(counts, self.t_used), self.seed)
        thresholds = entry_thresholds(len(part), rows, ids, uid, table.keys, counts, self.seed)
        if len(rows):
            thresholds[~self._english(part)] = np.inf
        return pd.Series(rank_scores(keep & np.isfinite(thresholds), thresholds, self.t_used), index=part.index)
