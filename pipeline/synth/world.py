"""The synthetic web world: a candidate pool with planted defects, a clean set and a labeled evaluation set.

Everything is a deterministic function of ``SynthConfig`` (and so of its seed). ``build_world`` writes::

    world/
      urls.parquet        the pool's input, like DataComp's metadata: url, text, uid
      truth.parquet       uid -> planted defect, image class, caption class, sources, boilerplate cluster
                          (never read by filters)
      classes.parquet     the pool's class frequencies: class, label, rank, share, pool, group (head/middle/tail)
      site/               what the loopback server serves: img/<index>.<ext> and routes.json (errors, delays)
      clean/              the clean high-quality set, in the pool layout (tar + parquet + _stats.json)
      eval/               labeled evaluation set: test/<i>.tar (<key>.jpg, .cls, .txt), classnames.txt,
                          zeroshot_classification_templates.txt, labels.parquet
      _manifest.json

Planted defects (one per pool sample at most; rates are fractions of the pool, documented in ``DefectRates``):
caption defects (mismatch, non_english, gibberish, short_caption, uninformative), image defects (tiny_image,
pixel_image, extreme_aspect), duplicates (exact_duplicate, near_reencode, near_resize, near_crop), redundancy
(boilerplate: dense clusters of near-identical stock-like samples), contamination (eval_copy), and serving defects
(http_404, http_500, slow, hang, corrupt, truncated, not_image, bomb).

The pool's classes are long-tailed (:func:`class_table`): the share of the class of frequency rank r (1 = most
frequent) is proportional to r ** -class_zipf, the counts are exact (largest remainder, at least one sample per
class), and the rank order is a seeded permutation, so no shape is always the tail. A planted defect keeps its
row's class (copies copy a source of the same class, eval copies an evaluation image of it), so every class's
count is its quota. The clean set and the evaluation set stay balanced.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import asdict, dataclass, field, fields
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from PIL import Image

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import shards
from winnow.pipeline.data.images import encode_jpeg
from winnow.pipeline.data.uid import derive_uid
from winnow.pipeline.run.stage import Stage
from winnow.pipeline.synth import captions as cap
from winnow.pipeline.synth.render import CLASSES, COLORS, TEXTURES, bomb_png, decode, render

POOL, CLEAN, EVAL, RANKS, BOILERPLATE, SAFETY = 1, 2, 3, 4, 5, 6  # seed streams


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class DefectRates:
    """Fraction of the pool planted with each defect (the rest is clean). ``bomb`` and ``hang`` are counts."""

    mismatch: float = 0.12        # caption describes another class
    non_english: float = 0.04     # Spanish / French / German caption
    gibberish: float = 0.03       # random letter strings
    short_caption: float = 0.03   # one word (fails "more than 2 words and 5 characters")
    uninformative: float = 0.04   # true of any image, naming nothing in it: "click here to enlarge", a file name
    tiny_image: float = 0.03      # shorter side 16-64 px (fails "shorter side >= 200")
    pixel_image: float = 0.005    # 1-4 px tracking pixels (too_small at ingest when min_image_size > 4)
    extreme_aspect: float = 0.03  # aspect ratio 4-8 (fails "aspect ratio <= 3")
    exact_duplicate: float = 0.03  # same bytes as another pool sample (half also with the same caption)
    near_reencode: float = 0.015  # another pool sample re-encoded at JPEG quality 40-70
    near_resize: float = 0.015    # another pool sample resized to 50-80 %
    near_crop: float = 0.015      # another pool sample cropped to 80-92 % of each side
    eval_copy: float = 0.02       # an evaluation image (half exact bytes, half re-encoded and resized)
    boilerplate: float = 0.04     # clusters of SynthConfig.boilerplate_size near-identical stock-like samples
    http_404: float = 0.03
    http_500: float = 0.015
    slow: float = 0.01            # answered after SynthConfig.slow_seconds (beyond the ingest timeout)
    corrupt: float = 0.01         # JPEG marker segments overwritten after the signature
    truncated: float = 0.01       # cut at 30-70 % of its length
    not_image: float = 0.01       # an HTML page at an image URL
    bomb: int = 1                 # a 20000 x 20000 PNG of a few KB (decompression bomb)
    hang: int = 1                 # the server trickles one byte every 0.5 s (defeats socket timeouts, not the deadline)


@dataclass
class SafetyPlants:
    """Rows planted for ingest's opt-out and safety checks: counts (0: none), planted on clean rows after every
    other defect. Three more sites listen on other loopback addresses at the base URL's port (:data:`SITES`)."""

    robots_path: int = 0       # under /private/, which the main site's robots.txt disallows for every crawler
    robots_token: int = 0      # under /no-winnow/, which it disallows for the token "winnow" only
    robots_5xx: int = 0        # on a site whose robots.txt answers 503 (RFC 9309: disallow everything)
    robots_4xx: int = 0        # on a site whose robots.txt answers 404 (allow everything): these end ok
    tdmrep_file: int = 0       # on a site whose /.well-known/tdmrep.json reserves TDM rights for /img/
    tdm_header: int = 0        # answered with a "tdm-reservation: 1" header
    blocklisted: int = 0       # images on the world's blocklist.txt (their sha256 and PDQ hashes) ...
    blocklisted_copy: int = 0  # ... and copies of them, re-encoded (quality 60) or resized (90%, quality 75): other
    #                            bytes, PDQ hashes within 31 bits (flat synthetic shapes resized further drift more)
    personal_caption: int = 0  # captions carrying an e-mail address, a phone, IP or card number (all fictitious)


#: The extra sites of :class:`SafetyPlants`: loopback address -> what their site files answer.
SITES = {"127.0.0.3": {"/robots.txt": {"status": 503}}, "127.0.0.4": {"/robots.txt": {"status": 404}},
         "127.0.0.5": {"/.well-known/tdmrep.json": {"json": [
             {"location": "/img/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/tdm-policy.json"},
             {"location": "/*", "tdm-reservation": 0}]}}}
SITE_OF = {"robots_5xx": "127.0.0.3", "robots_4xx": "127.0.0.4", "tdmrep_file": "127.0.0.5"}
ROBOTS_TXT = ("User-agent: *\nDisallow: /private/\n\n"
              "User-agent: winnow\nDisallow: /private/\nDisallow: /no-winnow/\n")
PERSONAL = [" | contact jane.doe@example.com for prints", " - call +1 555 010 4477", " uploaded from 203.0.113.42",
            " paid with 4111 1111 1111 1111", " (c) john at j.smith@example.org, tel 020 7946 0958"]

#: The ledger state each defect must end in after ingest (others end ``ok``); see :func:`expected_state`.
EXPECTED_STATE = {
    "http_404": "http_error", "http_500": "http_error", "slow": "timeout", "hang": "timeout",
    "corrupt": "decode_error", "truncated": "decode_error", "not_image": "not_an_image",
    "bomb": "too_many_pixels", "pixel_image": "too_small",
}
#: The same for the :class:`SafetyPlants` (planted only when asked for).
SAFETY_STATE = {"robots_path": "opted_out", "robots_token": "opted_out", "robots_5xx": "opted_out",
                "tdmrep_file": "opted_out", "tdm_header": "opted_out", "blocklisted": "blocked",
                "blocklisted_copy": "blocked"}
DUPLICATES = ("exact_duplicate", "near_reencode", "near_resize", "near_crop")
COUNTED = ("bomb", "hang", "boilerplate")  # planted on clean rows after the draw of the other defects
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "an icon of a {c}.", "a {c} shape.",
             "a picture of the {c}.", "a sticker of a {c}.", "a pattern with a {c}.", "a rendering of a {c}."]


@dataclass
class SynthConfig:
    """The synthetic world.

    Args:
        seed: everything is a function of it.
        n_pool / n_clean: samples in the candidate pool and in the clean high-quality set.
        n_eval_per_class: labeled evaluation images per class.
        n_classes: object classes (10 to 12).
        base_url: where the loopback server will listen; it is written into the URL list.
        size_min / size_max: longest side of normal images (px); with aspect ratios up to 1.45 the shorter
            side stays >= 200 px (DataComp's basic filter) when size_min >= 290.
        slow_seconds: the server's delay for ``slow`` URLs; hang_seconds: how long it trickles a ``hang``.
        chunk_size: images rendered per task.
        class_zipf: the pool's long tail: the class of frequency rank r gets a share proportional to
            r ** -class_zipf (0: uniform; 1: the 12 classes range from 32% to 2.7% of the pool).
        boilerplate_size: members of each boilerplate cluster (``DefectRates.boilerplate`` sets how many rows).
    """

    seed: int = 0
    n_pool: int = 3000
    n_clean: int = 1200
    n_eval_per_class: int = 40
    n_classes: int = 12
    base_url: str = "http://127.0.0.1:8741"
    size_min: int = 290
    size_max: int = 400
    slow_seconds: float = 12.0
    hang_seconds: float = 120.0
    chunk_size: int = 250
    class_zipf: float = 1.0
    boilerplate_size: int = 20
    rates: DefectRates = field(default_factory=DefectRates)
    safety: SafetyPlants = field(default_factory=SafetyPlants)

    def __post_init__(self) -> None:
        if not 10 <= self.n_classes <= len(CLASSES):
            raise UserError(f"synth.n_classes must be between 10 and {len(CLASSES)}")
        if min(self.n_pool, self.n_clean, self.n_eval_per_class, self.chunk_size) < 1:
            raise UserError("synth: n_pool, n_clean, n_eval_per_class and chunk_size must be >= 1")
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or "@" in parts.netloc or not _is_loopback(parts.hostname or ""):
            raise UserError(f"synth.base_url {self.base_url[:80]!r} must be a loopback http URL "
                            "(http://127.0.0.1:PORT)")
        if self.class_zipf < 0 or self.boilerplate_size < 2:
            raise UserError("synth.class_zipf must be >= 0 (0: uniform classes) and synth.boilerplate_size >= 2")
        rates = [getattr(self.rates, f.name) for f in fields(DefectRates) if f.type in (float, "float")]
        if sum(rates) >= 0.95:
            raise UserError(f"synth.rates add up to {sum(rates):.2f}; keep them below 0.95 to leave clean samples")

    @property
    def classes(self) -> list[str]:
        return CLASSES[: self.n_classes]


# -------------------------------------------------------------------------------------------------- planning
def image_spec(rng: np.random.Generator, cls: str, seed: list[int], kind: str = "normal",
               cfg: SynthConfig | None = None) -> dict:
    lo, hi = (cfg.size_min, cfg.size_max) if cfg else (300, 600)
    if kind == "tiny":
        lo, hi = 16, 64
    longest = int(rng.integers(lo, hi + 1))
    aspect = float(rng.uniform(0.7, 1.45))
    if kind == "extreme":
        aspect = float(rng.uniform(4, 8)) ** (1 if rng.random() < 0.5 else -1)
    w, h = (longest, max(1, round(longest / aspect))) if aspect >= 1 else (max(1, round(longest * aspect)), longest)
    if kind == "pixel":
        w, h = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    scale = float(rng.uniform(0.32, 0.45)) if kind != "extreme" else 0.45
    margin = min(scale * 1.05, 0.5)
    texture = str(rng.choice(TEXTURES))
    return {
        "cls": cls, "seed": [int(s) for s in seed], "w": w, "h": h,
        "color": str(rng.choice(sorted(COLORS))), "shade": float(rng.uniform(0.45, 0.75)),
        # half the shapes are a flat colour, the rest carry a texture drawn independently of the class
        "texture": "plain" if rng.random() < 0.5 else texture, "period": float(rng.uniform(5, 14)),
        "angle": float(rng.uniform(0, np.pi)), "bg": [int(c) for c in rng.integers(60, 200, 3)],
        "bg_texture": "plain", "bg_period": float(rng.uniform(8, 30)),
        "bg_angle": float(rng.uniform(0, np.pi)), "clutter": int(rng.integers(0, 5)),
        # the shape lies inside the central square, which a centre crop (open_clip's preprocessing) keeps
        "scale": scale, "cx": 0.5 + (float(rng.uniform(margin, 1 - margin)) - 0.5) * min(w, h) / w,
        "cy": 0.5 + (float(rng.uniform(margin, 1 - margin)) - 0.5) * min(w, h) / h,
        "rot": float(rng.uniform(-20, 20)), "noise": float(rng.uniform(2, 8)),
        "quality": int(rng.integers(85, 96)),
    }


def _spec_for(cfg: SynthConfig, stream: int, index: int, kind: str = "normal", cls: str | None = None) -> dict:
    """The image of sample ``index`` of a stream; a pool row passes its planned class (:func:`pool_classes`),
    the class drawn here is then unused (drawn all the same, so the other draws do not move)."""
    rng = np.random.default_rng([cfg.seed, stream, index])
    drawn = cfg.classes[int(rng.integers(cfg.n_classes))] if stream != EVAL else \
        cfg.classes[index % cfg.n_classes]
    return image_spec(rng, cls or drawn, [cfg.seed, stream, index, 1], kind, cfg)


def _caption_for(cfg: SynthConfig, stream: int, index: int, spec: dict) -> str:
    rng = np.random.default_rng([cfg.seed, stream, index, 2])
    return cap.caption(rng, spec["cls"], spec["color"], spec["texture"], spec["scale"])


def class_table(cfg: SynthConfig) -> pd.DataFrame:
    """The pool's classes, most frequent first: class, label (its line in classnames.txt), rank (1 = most
    frequent), share (planned: proportional to rank ** -class_zipf), pool (samples: the shares of n_pool rounded
    by largest remainder, at least one per class when n_pool >= n_classes) and group: ``head`` is the most
    frequent third of the classes, ``tail`` the least frequent third, ``middle`` the rest."""
    n = cfg.n_classes
    order = np.random.default_rng([cfg.seed, RANKS]).permutation(n)
    share = np.arange(1, n + 1, dtype=float) ** -cfg.class_zipf
    share /= share.sum()
    exact = share * cfg.n_pool
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: cfg.n_pool - counts.sum()]] += 1
    while cfg.n_pool >= n and counts.min() == 0:  # every class in the pool: the tail borrows from the head
        counts[n - 1 - np.argmax(counts[::-1])] -= 1  # the last of the largest: the order stays non-increasing
        counts[np.argmin(counts)] += 1
    rank = np.arange(n)
    group = np.where(rank < n // 3, "head", np.where(rank >= n - n // 3, "tail", "middle"))
    return pd.DataFrame({"class": [cfg.classes[i] for i in order], "label": order, "rank": rank + 1,
                         "share": share, "pool": counts, "group": group})


def pool_classes(cfg: SynthConfig) -> np.ndarray:
    """Each pool row's class: every class exactly its :func:`class_table` count, in a seeded order."""
    table = class_table(cfg)
    return np.random.default_rng([cfg.seed, RANKS, 1]).permutation(np.repeat(table["class"].to_numpy(),
                                                                             table["pool"].to_numpy()))


def _plant_boilerplate(cfg: SynthConfig, defects: np.ndarray, classes: np.ndarray) -> dict[int, int]:
    """Turn clean rows into boilerplate clusters (``defects`` is changed in place); returns row -> cluster.

    ``rates.boilerplate * n_pool`` rows in clusters of about ``boilerplate_size``; a cluster's class is drawn by
    the pool's class shares (stock images crowd the popular concepts) among the classes with enough clean rows."""
    total = round(cfg.rates.boilerplate * cfg.n_pool)
    if total < 2:
        return {}
    rng = np.random.default_rng([cfg.seed, BOILERPLATE])
    share = class_table(cfg).set_index("class")["share"]
    sizes = [len(a) for a in np.array_split(np.arange(total), max(1, round(total / cfg.boilerplate_size)))]
    clusters: dict[int, int] = {}
    for k, size in enumerate(sizes):
        free = {c: np.flatnonzero((defects == "none") & (classes == c)) for c in cfg.classes}
        fits = [c for c in cfg.classes if len(free[c]) >= size]
        if not fits:
            break
        p = np.array([share[c] for c in fits])
        members = rng.choice(free[fits[int(rng.choice(len(fits), p=p / p.sum()))]], size=size, replace=False)
        defects[members] = "boilerplate"
        clusters.update({int(i): k for i in members})
    return clusters


def _cluster_base(cfg: SynthConfig, k: int, cls: str) -> tuple[dict, str]:
    """Boilerplate cluster ``k``'s image (no clutter: a clean stock layout) and caption."""
    rng = np.random.default_rng([cfg.seed, BOILERPLATE, k + 1])
    spec = {**image_spec(rng, cls, [cfg.seed, BOILERPLATE, k + 1, 1], "normal", cfg), "clutter": 0}
    return spec, cap.caption(rng, cls, spec["color"], spec["texture"], spec["scale"])


def _jitter(base: dict, r: np.random.Generator) -> dict:
    """A boilerplate member: its cluster's image (same seed: the same texture grain and noise) moved by up to 1%
    of its width and height, turned by up to 2 degrees, scaled by up to 2%, its background shade nudged by up to
    4 levels, saved at its own JPEG quality."""
    return {**base, "cx": base["cx"] + float(r.uniform(-0.01, 0.01)),
            "cy": base["cy"] + float(r.uniform(-0.01, 0.01)), "rot": base["rot"] + float(r.uniform(-2, 2)),
            "scale": base["scale"] * float(r.uniform(0.98, 1.02)),
            "bg": [int(np.clip(c + r.integers(-4, 5), 0, 255)) for c in base["bg"]],
            "quality": int(r.integers(85, 96))}


def _plant_safety(cfg: SynthConfig, defects: np.ndarray) -> None:
    """Turn clean rows into :class:`SafetyPlants` rows (``defects`` is changed in place)."""
    plants = [(f.name, getattr(cfg.safety, f.name)) for f in fields(SafetyPlants)]
    if not any(n for _, n in plants):
        return
    rng = np.random.default_rng([cfg.seed, SAFETY])
    free = rng.permutation(np.flatnonzero(defects == "none"))
    at = 0
    for name, n in plants:
        defects[free[at: at + n]] = name
        at += n


def _site_url(base_url: str, host: str | None) -> str:
    """``base_url`` (without a trailing /), or the same port on another loopback address."""
    parts = urlsplit(base_url.rstrip("/"))
    return f"http://{host}:{parts.port or 80}" if host else base_url.rstrip("/")


def plan_pool(cfg: SynthConfig) -> pd.DataFrame:
    """One row per pool sample: url, text, uid, the defect and everything needed to render its bytes."""
    rng = np.random.default_rng([cfg.seed, POOL, 0])
    names = [f.name for f in fields(DefectRates) if f.name not in COUNTED]
    probs = np.array([getattr(cfg.rates, n) for n in names])
    draw = rng.choice(len(names) + 1, size=cfg.n_pool, p=np.append(probs, 1 - probs.sum()))
    defects = np.array([*names, "none"], dtype=object)[draw]
    clean_idx = np.flatnonzero(defects == "none")
    counted = rng.choice(clean_idx, size=min(len(clean_idx) // 2, cfg.rates.bomb + cfg.rates.hang), replace=False)
    defects[counted[: cfg.rates.bomb]] = "bomb"
    defects[counted[cfg.rates.bomb:]] = "hang"
    classes = pool_classes(cfg)
    clusters = _plant_boilerplate(cfg, defects, classes)
    _plant_safety(cfg, defects)
    bases = {k: _cluster_base(cfg, k, classes[i]) for k, i in {k: i for i, k in clusters.items()}.items()}
    sources = np.flatnonzero(defects == "none")
    same_class = {c: sources[classes[sources] == c] for c in cfg.classes}
    rows = []
    for i, defect in enumerate(defects):
        r = np.random.default_rng([cfg.seed, POOL, i, 3])
        kind = {"tiny_image": "tiny", "pixel_image": "pixel", "extreme_aspect": "extreme"}.get(defect, "normal")
        spec = _spec_for(cfg, POOL, i, kind, cls=classes[i])
        row = {"index": i, "defect": defect, "spec": spec, "source": -1, "eval_index": -1, "cluster": -1,
               "lang": "en", "transform": float(r.uniform(0, 1))}
        text = _caption_for(cfg, POOL, i, spec)
        if defect in DUPLICATES and len(sources):  # a source of the same class when there is one
            src = int(r.choice(same_class[classes[i]] if len(same_class[classes[i]]) else sources))
            row["source"], row["spec"] = src, _spec_for(cfg, POOL, src, cls=classes[src])
            same = defect == "exact_duplicate" and r.random() < 0.5
            text = _caption_for(cfg, POOL, src, row["spec"]) if same else \
                cap.caption(r, row["spec"]["cls"], row["spec"]["color"], row["spec"]["texture"], row["spec"]["scale"])
        elif defect == "eval_copy":  # an evaluation image of the row's class (eval image j is of class j % n)
            label = cfg.classes.index(classes[i])
            row["eval_index"] = label + cfg.n_classes * int(r.integers(cfg.n_eval_per_class))
            row["spec"] = _spec_for(cfg, EVAL, row["eval_index"])
            text = cap.caption(r, row["spec"]["cls"], row["spec"]["color"], row["spec"]["texture"], 0.3)
        elif defect == "boilerplate":
            row["cluster"] = clusters[i]
            base, template = bases[clusters[i]]
            row["spec"], text = _jitter(base, r), cap.boilerplate(r, template)
        elif defect == "mismatch":
            other = str(r.choice([c for c in cfg.classes if c != spec["cls"]]))
            text = cap.caption(r, other, str(r.choice(sorted(COLORS))), str(r.choice(TEXTURES)), 0.3)
            row["caption_cls"] = other
        elif defect == "non_english":
            text, row["lang"] = cap.foreign(r, spec["cls"], spec["color"])
        elif defect == "gibberish":
            text, row["lang"] = cap.gibberish(r), "none"
        elif defect == "short_caption":
            text = cap.short(r, spec["cls"], spec["color"])
        elif defect == "uninformative":
            text = cap.uninformative(r)
        elif defect == "blocklisted_copy":  # the k-th copy copies listed image k (mod their number)
            listed = np.flatnonzero(defects == "blocklisted")
            k = int((defects[:i] == "blocklisted_copy").sum())
            src = int(listed[k % len(listed)]) if len(listed) else i
            row["source"], row["spec"] = src, _spec_for(cfg, POOL, src, cls=classes[src])
            row["transform"] = float(k % 2)  # even copies re-encoded, odd ones resized
        elif defect == "personal_caption":
            text += PERSONAL[int(r.integers(len(PERSONAL)))]
        row.setdefault("caption_cls", row["spec"]["cls"] if defect not in ("gibberish", "uninformative") else None)
        ext = "png" if defect == "bomb" else "jpg"
        folder = {"robots_path": "private", "robots_token": "no-winnow"}.get(defect, "img")
        row["path"] = f"/{folder}/{i:07d}.{ext}"
        row["url"] = _site_url(cfg.base_url, SITE_OF.get(defect)) + row["path"]
        row["text"] = text
        row["uid"] = derive_uid(row["url"], text)
        row["cls"] = row["spec"]["cls"]
        rows.append(row)
    df = pd.DataFrame(rows)
    uid_of = dict(zip(df["index"], df["uid"]))
    df["source_uid"] = [uid_of.get(s) if s >= 0 else None for s in df["source"]]
    df["expected_state"] = [EXPECTED_STATE.get(d) or SAFETY_STATE.get(d, "ok") for d in df["defect"]]
    return df


# ------------------------------------------------------------------------------------------------- rendering
def _jpeg(spec: dict) -> bytes:
    return encode_jpeg(render(spec), spec["quality"])


def pool_payload(row: dict) -> bytes | None:
    """The bytes the server returns for a pool sample (None: nothing is served, i.e. 404/500)."""
    defect, spec, t = row["defect"], row["spec"], row["transform"]
    if defect in ("http_404", "http_500"):
        return None
    if defect == "bomb":
        return bomb_png()
    if defect == "not_image":
        return (b"<!DOCTYPE html><html><head><title>Image not found</title></head>"
                b"<body><p>This image has moved. Please enable JavaScript.</p></body></html>")
    data = _jpeg(spec)
    copied = ("near_reencode", "near_resize", "near_crop", "blocklisted_copy")
    if defect in copied or (defect == "eval_copy" and t >= 0.5):
        img = decode(data)
        w, h = img.size
        if defect in ("near_resize", "eval_copy") or (defect == "blocklisted_copy" and t >= 0.5):
            f = 0.5 + 0.3 * t if defect == "near_resize" else 0.9
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BICUBIC)
        if defect == "near_crop":
            f = 0.8 + 0.12 * t
            cw, ch = round(w * f), round(h * f)
            x0, y0 = round((w - cw) * t), round((h - ch) * (1 - t))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
        quality = int(40 + 30 * t) if defect == "near_reencode" else 60 if defect == "blocklisted_copy" else 75
        data = encode_jpeg(img, quality)
    if defect == "corrupt":
        noise = np.random.default_rng(spec["seed"]).integers(0, 256, 200, dtype=np.uint8).tobytes()
        data = data[:4] + noise + data[204:]  # the signature survives; the marker segments do not
    elif defect == "truncated":
        data = data[: int(len(data) * (0.3 + 0.4 * t))]
    return data


@dataclass(frozen=True)
class RenderTask:
    world: str
    part: str  # "pool", "clean" or "eval"
    chunk: int
    rows: list  # plan rows (pool) or indices (clean, eval)
    config: dict

    @property
    def marker(self) -> str:
        return os.path.join(self.world, "_chunks", f"{self.part}-{self.chunk:05d}.json")


def render_chunk(task: RenderTask) -> dict:
    """Render one chunk of a set, write it (site files for the pool, a shard for the clean set, an eval tar),
    then its marker."""
    stats = {"rows": _render(task)}
    return stats


def _render(task: RenderTask) -> int:
    cfg = config_from_dict(task.config)
    if task.part == "pool":
        for row in task.rows:
            data = pool_payload(row)
            if data is not None:
                fsio.write_bytes(os.path.join(task.world, "site", row["path"].lstrip("/")), data, fsync=False)
        return len(task.rows)
    if task.part == "clean":
        records, images = [], {}
        for i in task.rows:
            spec = _spec_for(cfg, CLEAN, i)
            text = _caption_for(cfg, CLEAN, i, spec)
            key = f"{task.chunk:08d}{i % 10_000:04d}"
            images[key] = _jpeg(spec)
            records.append({"uid": derive_uid(f"clean/{i}", text), "key": key, "caption": text, "url": None,
                            "status": "success", "error_message": None, "width": spec["w"], "height": spec["h"],
                            "original_width": spec["w"], "original_height": spec["h"], "cls": spec["cls"],
                            "state": "ok"})
        shards.write_shard(os.path.join(task.world, "clean"), task.chunk, records, images)
        return len(task.rows)
    with shards.TarWriter(os.path.join(task.world, "eval", "test", f"{task.chunk}.tar")) as tar:
        for i in task.rows:
            spec = _spec_for(cfg, EVAL, i)
            tar.sample(f"{i:06d}", {"jpg": _jpeg(spec), "cls": str(cfg.classes.index(spec["cls"])).encode(),
                                    "txt": _caption_for(cfg, EVAL, i, spec).encode()})
    return len(task.rows)


def config_from_dict(d: dict) -> SynthConfig:
    from winnow.pipeline.core.config import from_dict

    return from_dict(SynthConfig, d, "synth")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def build_world(cfg: SynthConfig, world: str, runner, overwrite: bool = False, log=print) -> dict:
    """Write the whole synthetic world into ``world`` (skipped when an identical one is already there)."""
    if not fsio.is_local(world):
        raise UserError(f"synth writes a local folder (the server serves it); got {world}")
    stage = Stage("synth", world, asdict(cfg), runner=runner, overwrite=overwrite, log=log)
    if stage.done:
        return stage.manifest
    plan = plan_pool(cfg)
    n_eval = cfg.n_eval_per_class * cfg.n_classes
    params = asdict(cfg)
    plan_rows = plan.drop(columns=["source_uid"]).to_dict("records")
    tasks = [RenderTask(world, "pool", c, rows, params) for c, rows in enumerate(_chunks(plan_rows, cfg.chunk_size))]
    tasks += [RenderTask(world, "clean", c, rows, params)
              for c, rows in enumerate(_chunks(list(range(cfg.n_clean)), min(cfg.chunk_size, 10_000)))]
    tasks += [RenderTask(world, "eval", c, rows, params)
              for c, rows in enumerate(_chunks(list(range(n_eval)), cfg.chunk_size))]
    log(f"synth: rendering {cfg.n_pool:,} pool + {cfg.n_clean:,} clean + {n_eval:,} eval images "
        f"in {len(tasks)} chunks")
    stage.map(render_chunk, tasks, label="synth", unit="chunks")
    _write_tables(cfg, world, plan, n_eval, len([t for t in tasks if t.part == "eval"]))
    counts = plan["defect"].value_counts().to_dict()
    return stage.finish(rows={"pool": cfg.n_pool, "clean": cfg.n_clean, "eval": n_eval},
                        defects=dict(sorted(counts.items())))


def _write_tables(cfg: SynthConfig, world: str, plan: pd.DataFrame, n_eval: int, eval_shards: int) -> None:
    shards.write_table(os.path.join(world, "urls.parquet"), plan[["url", "text", "uid"]])
    truth = plan[["uid", "index", "url", "defect", "cls", "caption_cls", "lang", "source_uid", "eval_index",
                  "cluster", "expected_state"]]
    shards.write_table(os.path.join(world, "truth.parquet"), truth)
    shards.write_table(os.path.join(world, "classes.parquet"), class_table(cfg))
    routes = {}
    for row in plan.itertuples():
        if row.defect == "http_500":
            routes[row.path] = {"status": 500}
        elif row.defect == "slow":
            routes[row.path] = {"delay": cfg.slow_seconds}
        elif row.defect == "hang":
            routes[row.path] = {"trickle": cfg.hang_seconds}
        elif row.defect == "not_image":
            routes[row.path] = {"content_type": "text/html"}
        elif row.defect == "tdm_header":
            routes[row.path] = {"headers": {"tdm-reservation": "1",
                                            "tdm-policy": "https://example.org/tdm-policy.json"}}
    fsio.write_json(os.path.join(world, "site", "routes.json"), routes)
    _write_safety(cfg, world, plan)
    ev = os.path.join(world, "eval")
    fsio.write_bytes(os.path.join(ev, "classnames.txt"), ("\n".join(cfg.classes) + "\n").encode())
    fsio.write_bytes(os.path.join(ev, "zeroshot_classification_templates.txt"), ("\n".join(TEMPLATES) + "\n").encode())
    fsio.write_bytes(os.path.join(ev, "test", "nshards.txt"), f"{eval_shards}\n".encode())
    labels = pd.DataFrame({"key": [f"{i:06d}" for i in range(n_eval)],
                           "cls": [cfg.classes[i % cfg.n_classes] for i in range(n_eval)],
                           "label": [i % cfg.n_classes for i in range(n_eval)]})
    shards.write_table(os.path.join(ev, "labels.parquet"), labels)


def _write_safety(cfg: SynthConfig, world: str, plan: pd.DataFrame) -> None:
    """The sites' files: the main site's robots.txt, the other sites' answers (``site/hosts.json``) and the
    world's ``blocklist.txt`` (sha256 and PDQ of each blocklisted image as served)."""
    from winnow.pipeline.web.blocklist import image_for_pdq, pdq_of

    if not any(getattr(cfg.safety, f.name) for f in fields(SafetyPlants)):
        return
    fsio.write_bytes(os.path.join(world, "site", "robots.txt"), ROBOTS_TXT.encode())
    fsio.write_json(os.path.join(world, "site", "hosts.json"), SITES)
    lines = ["# the synthetic world's blocklist: the sha256 and PDQ hash of each planted blocklisted image"]
    for row in plan[plan["defect"] == "blocklisted"].to_dict("records"):
        data = pool_payload(row)
        lines += [f"sha256:{hashlib.sha256(data).hexdigest()}", f"pdq:{pdq_of(image_for_pdq(data))}"]
    fsio.write_bytes(os.path.join(world, "blocklist.txt"), ("\n".join(lines) + "\n").encode())


def expected_state(defect: str, min_image_size: int, ingest=None) -> str:
    """Ingest state a defect must end in, given the ingest config (tracking pixels pass when no minimum is set;
    the opt-out and blocklist plants pass when ``ingest``, an IngestConfig, does not check them)."""
    if defect == "pixel_image" and min_image_size <= 4:
        return "ok"
    if ingest is not None:
        off = {"robots_path": not ingest.robots_txt, "robots_5xx": not ingest.robots_txt,
               "robots_token": not ingest.robots_txt or ingest.user_agent_token.lower() != "winnow",
               "tdmrep_file": not ingest.tdmrep, "tdm_header": not ingest.tdmrep,
               "blocklisted": not ingest.blocklists, "blocklisted_copy": not ingest.blocklists}
        if off.get(defect):
            return "ok"
    return EXPECTED_STATE.get(defect) or SAFETY_STATE.get(defect, "ok")


def read_truth(world: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(world, "truth.parquet"))


def read_classes(world: str) -> pd.DataFrame | None:
    """The world's class frequencies (:func:`class_table`), or None when ``world`` has none (not a world, or one
    written before they were recorded)."""
    path = os.path.join(world, "classes.parquet")
    return pd.read_parquet(path) if os.path.isfile(path) else None

