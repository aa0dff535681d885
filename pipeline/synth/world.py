"""The synthetic web world: a candidate pool with planted defects, a clean set and a labeled evaluation set.

Everything is a deterministic function of ``SynthConfig`` (and so of its seed). ``build_world`` writes::

    world/
      urls.parquet        the pool's input, like DataComp's metadata: url, text, uid
      truth.parquet       uid -> planted defect, image class, caption class, sources (never read by filters)
      site/               what the loopback server serves: img/<index>.<ext> and routes.json (errors, delays)
      clean/              the clean high-quality set, in the pool layout (tar + parquet + _stats.json)
      eval/               labeled evaluation set: test/<i>.tar (<key>.jpg, .cls, .txt), classnames.txt,
                          zeroshot_classification_templates.txt, labels.parquet
      _manifest.json

Planted defects (one per pool sample at most; rates are fractions of the pool, documented in ``DefectRates``):
caption defects (mismatch, non_english, gibberish, short_caption), image defects (tiny_image, pixel_image,
extreme_aspect), duplicates (exact_duplicate, near_reencode, near_resize, near_crop), contamination (eval_copy),
and serving defects (http_404, http_500, slow, hang, corrupt, truncated, not_image, bomb).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core import fsio
from pipeline.data import shards
from pipeline.core.errors import UserError
from pipeline.data.uid import derive_uid
from pipeline.synth import captions as cap
from pipeline.data.images import encode_jpeg
from pipeline.run.stage import Stage
from pipeline.synth.render import CLASSES, COLORS, TEXTURES, bomb_png, decode, render

POOL, CLEAN, EVAL = 1, 2, 3  # seed streams


@dataclass
class DefectRates:
    """Fraction of the pool planted with each defect (the rest is clean). ``bomb`` and ``hang`` are counts."""

    mismatch: float = 0.12        # caption describes another class
    non_english: float = 0.04     # Spanish / French / German caption
    gibberish: float = 0.03       # random letter strings
    short_caption: float = 0.03   # one word (fails "more than 2 words and 5 characters")
    tiny_image: float = 0.03      # shorter side 16-64 px (fails "shorter side >= 200")
    pixel_image: float = 0.005    # 1-4 px tracking pixels (too_small at ingest when min_image_size > 4)
    extreme_aspect: float = 0.03  # aspect ratio 4-8 (fails "aspect ratio <= 3")
    exact_duplicate: float = 0.03  # same bytes as another pool sample (half also with the same caption)
    near_reencode: float = 0.015  # another pool sample re-encoded at JPEG quality 40-70
    near_resize: float = 0.015    # another pool sample resized to 50-80 %
    near_crop: float = 0.015      # another pool sample cropped to 80-92 % of each side
    eval_copy: float = 0.02       # an evaluation image (half exact bytes, half re-encoded and resized)
    http_404: float = 0.03
    http_500: float = 0.015
    slow: float = 0.01            # answered after SynthConfig.slow_seconds (beyond the ingest timeout)
    corrupt: float = 0.01         # JPEG marker segments overwritten after the signature
    truncated: float = 0.01       # cut at 30-70 % of its length
    not_image: float = 0.01       # an HTML page at an image URL
    bomb: int = 1                 # a 20000 x 20000 PNG of a few KB (decompression bomb)
    hang: int = 1                 # the server trickles one byte every 0.5 s (defeats socket timeouts, not the deadline)


#: The ledger state each defect must end in after ingest (others end ``ok``); see :func:`expected_state`.
EXPECTED_STATE = {
    "http_404": "http_error", "http_500": "http_error", "slow": "timeout", "hang": "timeout",
    "corrupt": "decode_error", "truncated": "decode_error", "not_image": "not_an_image",
    "bomb": "too_many_pixels", "pixel_image": "too_small",
}
DUPLICATES = ("exact_duplicate", "near_reencode", "near_resize", "near_crop")
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
    rates: DefectRates = field(default_factory=DefectRates)

    def __post_init__(self) -> None:
        if not 10 <= self.n_classes <= len(CLASSES):
            raise UserError(f"synth.n_classes must be between 10 and {len(CLASSES)}")
        if min(self.n_pool, self.n_clean, self.n_eval_per_class, self.chunk_size) < 1:
            raise UserError("synth: n_pool, n_clean, n_eval_per_class and chunk_size must be >= 1")
        if not self.base_url.startswith(("http://127.", "http://localhost")):
            raise UserError(f"synth.base_url {self.base_url!r} must be a loopback http URL (127.0.0.1)")
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


def _spec_for(cfg: SynthConfig, stream: int, index: int, kind: str = "normal") -> dict:
    rng = np.random.default_rng([cfg.seed, stream, index])
    cls = cfg.classes[int(rng.integers(cfg.n_classes))] if stream != EVAL else \
        cfg.classes[index % cfg.n_classes]
    return image_spec(rng, cls, [cfg.seed, stream, index, 1], kind, cfg)


def _caption_for(cfg: SynthConfig, stream: int, index: int, spec: dict) -> str:
    rng = np.random.default_rng([cfg.seed, stream, index, 2])
    return cap.caption(rng, spec["cls"], spec["color"], spec["texture"], spec["scale"])


def plan_pool(cfg: SynthConfig) -> pd.DataFrame:
    """One row per pool sample: url, text, uid, the defect and everything needed to render its bytes."""
    rng = np.random.default_rng([cfg.seed, POOL, 0])
    names = [f.name for f in fields(DefectRates) if f.name not in ("bomb", "hang")]
    probs = np.array([getattr(cfg.rates, n) for n in names])
    draw = rng.choice(len(names) + 1, size=cfg.n_pool, p=np.append(probs, 1 - probs.sum()))
    defects = np.array([*names, "none"], dtype=object)[draw]
    clean_idx = np.flatnonzero(defects == "none")
    counted = rng.choice(clean_idx, size=min(len(clean_idx) // 2, cfg.rates.bomb + cfg.rates.hang), replace=False)
    defects[counted[: cfg.rates.bomb]] = "bomb"
    defects[counted[cfg.rates.bomb:]] = "hang"
    sources = np.flatnonzero(defects == "none")
    n_eval = cfg.n_eval_per_class * cfg.n_classes
    rows = []
    for i, defect in enumerate(defects):
        r = np.random.default_rng([cfg.seed, POOL, i, 3])
        kind = {"tiny_image": "tiny", "pixel_image": "pixel", "extreme_aspect": "extreme"}.get(defect, "normal")
        spec = _spec_for(cfg, POOL, i, kind)
        row = {"index": i, "defect": defect, "spec": spec, "source": -1, "eval_index": -1, "lang": "en",
               "transform": float(r.uniform(0, 1))}
        text = _caption_for(cfg, POOL, i, spec)
        if defect in DUPLICATES and len(sources):
            src = int(r.choice(sources))
            row["source"], row["spec"] = src, _spec_for(cfg, POOL, src)
            same = defect == "exact_duplicate" and r.random() < 0.5
            text = _caption_for(cfg, POOL, src, row["spec"]) if same else \
                cap.caption(r, row["spec"]["cls"], row["spec"]["color"], row["spec"]["texture"], row["spec"]["scale"])
        elif defect == "eval_copy":
            row["eval_index"] = int(r.integers(n_eval))
            row["spec"] = _spec_for(cfg, EVAL, row["eval_index"])
            text = cap.caption(r, row["spec"]["cls"], row["spec"]["color"], row["spec"]["texture"], 0.3)
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
        row.setdefault("caption_cls", row["spec"]["cls"] if defect != "gibberish" else None)
        ext = "png" if defect == "bomb" else "jpg"
        row["path"] = f"/img/{i:07d}.{ext}"
        row["url"] = cfg.base_url.rstrip("/") + row["path"]
        row["text"] = text
        row["uid"] = derive_uid(row["url"], text)
        row["cls"] = row["spec"]["cls"]
        rows.append(row)
    df = pd.DataFrame(rows)
    uid_of = dict(zip(df["index"], df["uid"]))
    df["source_uid"] = [uid_of.get(s) if s >= 0 else None for s in df["source"]]
    df["expected_state"] = [EXPECTED_STATE.get(d, "ok") for d in df["defect"]]
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
    if defect in ("near_reencode", "near_resize", "near_crop") or (defect == "eval_copy" and t >= 0.5):
        img = decode(data)
        w, h = img.size
        if defect == "near_resize" or defect == "eval_copy":
            f = 0.5 + 0.3 * t if defect == "near_resize" else 0.9
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BICUBIC)
        if defect == "near_crop":
            f = 0.8 + 0.12 * t
            cw, ch = round(w * f), round(h * f)
            x0, y0 = round((w - cw) * t), round((h - ch) * (1 - t))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
        quality = int(40 + 30 * t) if defect == "near_reencode" else 75
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
    fsio.write_json(task.marker, stats)
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
    from pipeline.core.config import from_dict

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
                  "expected_state"]]
    shards.write_table(os.path.join(world, "truth.parquet"), truth)
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
    fsio.write_json(os.path.join(world, "site", "routes.json"), routes)
    ev = os.path.join(world, "eval")
    fsio.write_bytes(os.path.join(ev, "classnames.txt"), ("\n".join(cfg.classes) + "\n").encode())
    fsio.write_bytes(os.path.join(ev, "zeroshot_classification_templates.txt"), ("\n".join(TEMPLATES) + "\n").encode())
    fsio.write_bytes(os.path.join(ev, "test", "nshards.txt"), f"{eval_shards}\n".encode())
    labels = pd.DataFrame({"key": [f"{i:06d}" for i in range(n_eval)],
                           "cls": [cfg.classes[i % cfg.n_classes] for i in range(n_eval)],
                           "label": [i % cfg.n_classes for i in range(n_eval)]})
    shards.write_table(os.path.join(ev, "labels.parquet"), labels)


def expected_state(defect: str, min_image_size: int) -> str:
    """Ingest state a defect must end in, given the ingest config (tracking pixels pass when no minimum is set)."""
    if defect == "pixel_image" and min_image_size <= 4:
        return "ok"
    return EXPECTED_STATE.get(defect, "ok")


def read_truth(world: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(world, "truth.parquet"))

