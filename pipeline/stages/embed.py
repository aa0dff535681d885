"""Embeddings: pixels are read once; every later stage uses the stored vectors.

``embed`` runs ``embed_shard`` once per pool shard. For shard ``{id}`` it writes, in the output folder
(default ``<pool>/embeddings/<tag>/``):

- ``{id}.npz``: ``<tag>_img`` and ``<tag>_txt``, float16, L2-normalised, **row-aligned with the shard's parquet**
  (DataComp's layout: row i belongs to parquet row i). Rows without an image (failed downloads, undecodable
  files) have NaN image vectors; rows without a caption have NaN text vectors.
- ``{id}.parquet``: the stage's ledger: uid, key, ``state`` (``ok``, ``not_downloaded``, ``decode_error``)
  and ``error_message``.
- with ``detect`` (:mod:`winnow.pipeline.models.detect`, run on the same decoded pixels): ``<tag>_face_count``
  and the ledger's ``face_bboxes`` (normalised ``[x0, y0, x1, y1]`` boxes, DataComp's format) for ``faces``;
  ``<tag>_nsfw`` (NudeNet's highest exposed-class confidence, 0-1) for ``nsfw``; NaN where there is no image.
- ``{id}_stats.json`` last, as the commit marker.

The model is built once per worker process and kept; images are decoded and preprocessed by a thread pool while
the model runs on the previous batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import path
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest, shards
from winnow.pipeline.data.images import input_side
from winnow.pipeline.data.ledger import OK
from winnow.pipeline.data.pool import require_finished
from winnow.pipeline.models.copydetect import MODEL_NAME
from winnow.pipeline.models.detect import detector
from winnow.pipeline.models.encode import cached_model, encode_images, encode_texts
from winnow.pipeline.models.registry import check, default_device, resolve_model, weights_reachable
from winnow.pipeline.run.runner import task_progress
from winnow.pipeline.run.stage import Stage, sum_counts


@dataclass
class EmbedConfig:
    """Which model embeds the pool, and how.

    Args:
        model: open_clip architecture (``ViT-B-32``, ``ViT-L-14``, ``ViTamin-S``, ``winnow-tiny-clip``...).
        pretrained: open_clip tag (``openai``, ``datacomp1b``, ``dfn2b``), a checkpoint path, or empty for a
            seeded random init (tests only).
        tag: short name; arrays are stored as ``<tag>_img`` / ``<tag>_txt`` (DataComp uses b32 and l14).
        batch_size: images per forward pass.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        precision: ``fp32``, or ``fp16``/``bf16`` autocast on CUDA.
        decode_threads: threads decoding and preprocessing images ahead of the model.
        detect: detectors run on each decoded image: ``faces``, ``nsfw`` (see above); empty for none.
        face_model: ``haar`` (OpenCV's cascade, fast) or ``nudenet`` (NudeNet's face classes).
    """

    model: str = "ViT-B-32"
    pretrained: str = path("openai")
    tag: str = "b32"
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    decode_threads: int = 4
    seed: int = 0
    detect: list[str] = field(default_factory=list)
    face_model: Literal["haar", "nudenet"] = "haar"

    def __post_init__(self) -> None:
        if not self.tag.replace("_", "").isalnum():
            raise UserError(f"embed.tag {self.tag!r}: use letters, digits and _ only (it prefixes npz keys)")
        if self.batch_size < 1 or self.decode_threads < 1:
            raise UserError("embed: batch_size and decode_threads must be >= 1")
        unknown = set(self.detect) - {"faces", "nsfw"}
        if unknown:
            raise UserError(f"embed.detect: unknown detector {sorted(unknown)[0]!r}; choose faces, nsfw")


@dataclass(frozen=True)
class EmbedTask:
    pool: str
    out: str
    shard_id: int
    config: dict

    @property
    def marker(self) -> str:
        return fsio.join(self.out, f"{shards.shard_name(self.shard_id)}_stats.json")


def _device(cfg: EmbedConfig) -> str:

    return default_device() if cfg.device == "auto" else cfg.device


def embed_shard(task: EmbedTask) -> dict:
    cfg = EmbedConfig(**task.config)
    name = shards.shard_name(task.shard_id)
    start = time.time()
    device = _device(cfg)
    model, preprocess, tokenizer = cached_model(cfg.model, cfg.pretrained, device, cfg.seed)
    table = shards.read_table(task.pool, task.shard_id, columns=["uid", "key", "caption", "state"])
    row_of = {k: i for i, k in enumerate(table["key"].astype(str))}
    import torch

    if tokenizer is None:  # an image-only model (the copy-detection descriptor)
        dim = int(model.output_dim)
    else:
        with torch.inference_mode():
            dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[1])
    img = np.full((len(table), dim), np.nan, np.float32)
    txt = np.full((len(table), dim), np.nan, np.float32)
    samples = ((row_of[s["__key__"]], shards.image_bytes(s) or b"")
               for s in shards.iter_tar(shards.paths(task.pool, task.shard_id)["tar"]) if s["__key__"] in row_of)
    ok_count = int((table["state"] == OK).sum())
    found: dict[int, dict] = {}
    spot = detector(cfg.detect, cfg.face_model)
    failures = encode_images(model, preprocess, samples, device, img, cfg.batch_size, 2 * input_side(model),
                             cfg.decode_threads, cfg.precision, on_batch=lambda n: task_progress(n, ok_count),
                             on_image=(lambda row, rgb: found.__setitem__(row, spot(rgb))) if spot else None)
    if tokenizer is not None:
        rows = [i for i, t in enumerate(table["caption"]) if isinstance(t, str)]
        if rows:
            txt[rows] = encode_texts(model, tokenizer, [table["caption"].iloc[i] for i in rows], device,
                                     cfg.batch_size, cfg.precision)

    ok_rows = (table["state"] == OK).to_numpy()
    state = np.where(ok_rows, OK, "not_downloaded").astype(object)
    errors = np.full(len(table), None, dtype=object)
    missing = ok_rows & ~np.isfinite(img[:, 0])
    for row in np.flatnonzero(missing):
        failures.setdefault(int(row), "decode_error: sample missing from the tar")
    for row, message in failures.items():
        state[row], errors[row] = "decode_error", message
    ledger = pd.DataFrame({"uid": table["uid"], "key": table["key"], "state": state, "error_message": errors})
    arrays = {f"{cfg.tag}_img": img.astype(np.float16)}
    if tokenizer is not None:
        arrays[f"{cfg.tag}_txt"] = txt.astype(np.float16)
    if "faces" in cfg.detect:
        boxes = [found[i]["face_bboxes"] if i in found and state[i] == OK else None for i in range(len(table))]
        ledger["face_bboxes"] = [None if b is None else [[float(v) for v in box] for box in b] for b in boxes]
        arrays[f"{cfg.tag}_face_count"] = np.array([np.nan if b is None else len(b) for b in boxes], np.float32)
    if "nsfw" in cfg.detect:
        arrays[f"{cfg.tag}_nsfw"] = np.array([found[i]["nsfw"] if i in found and state[i] == OK else np.nan
                                              for i in range(len(table))], np.float32)
    with fsio.atomic_open(fsio.join(task.out, f"{name}.npz"), "wb") as f:
        np.savez(f, **arrays)
    shards.write_table(fsio.join(task.out, f"{name}.parquet"), ledger)
    stats = {"count": len(table), "embedded_images": int((state == OK).sum()), "decode_errors": len(failures),
             "texts": int(np.isfinite(txt[:, 0]).sum()), "duration": time.time() - start, "dim": int(dim)}
    if "faces" in cfg.detect:
        counts = arrays[f"{cfg.tag}_face_count"]
        stats |= {"images_with_faces": int(np.nansum(counts > 0)), "faces": int(np.nansum(counts))}
    if "nsfw" in cfg.detect:
        stats["nsfw_over_half"] = int(np.nansum(arrays[f"{cfg.tag}_nsfw"] > 0.5))
    return stats


def default_out(pool: str, tag: str) -> str:
    return fsio.join(pool, "embeddings", tag)


def embed(pool: str, cfg: EmbedConfig, runner, out: str | None = None, overwrite: bool = False,
          allow_partial: bool = False, log=print) -> dict:
    """Embed every ok sample of ``pool`` with ``cfg.model``; return the stage manifest."""
    require_finished(pool, allow_partial, "embed", log)
    ids = shards.list_shards(pool)
    if not ids:
        raise UserError(f"{pool} holds no shards; pass a pool folder (the output of `winnow ingest`)")
    if cfg.pretrained and os.sep in cfg.pretrained and not os.path.isfile(cfg.pretrained):
        raise UserError(f"checkpoint not found: {cfg.pretrained}")
    if cfg.model == MODEL_NAME and not (cfg.pretrained and fsio.exists(cfg.pretrained)):
        raise UserError(f"{MODEL_NAME} needs its checkpoint: --pretrained PATH/descriptor.pt (train one with "
                        "`winnow copy-descriptor POOL --out DIR`)")
    if cfg.model != MODEL_NAME and "://" not in cfg.pretrained:  # a wrong model or tag: one line, before any worker
        cfg = replace(cfg, model=resolve_model(cfg.model, cfg.pretrained))
        if not check(cfg.model, cfg.pretrained) and cfg.pretrained:
            weights_reachable(cfg.model, cfg.pretrained)
    out = out or default_out(pool, cfg.tag)
    inputs = [fsio.join(pool, manifest.MANIFEST)] if fsio.exists(fsio.join(pool, manifest.MANIFEST)) else \
        [shards.paths(pool, i)["parquet"] for i in ids]
    if cfg.pretrained and os.path.isfile(cfg.pretrained):
        inputs.append(cfg.pretrained)
    stage = Stage("embed", out, asdict(cfg), inputs=inputs, runner=runner, overwrite=overwrite, protect=[pool],
                  log=log)
    if stage.done:
        return stage.manifest
    log(f"embed: {cfg.model} ({cfg.pretrained or 'random init'}) as '{cfg.tag}' over {len(ids)} shards -> {out}")
    sizes = [shards.read_stats(pool, i).get("successes", 0) for i in ids]  # images per shard, for the progress lines
    stats = stage.map(embed_shard, [EmbedTask(pool, out, i, asdict(cfg)) for i in ids], label="embed", unit="shards",
                      sizes=sizes)
    return stage.finish(rows=sum_counts(stats, skip=("duration", "dim")), tag=cfg.tag, pool=str(pool))
