"""The one image encoder and text encoder: pool images (``embed``), evaluation images (``evaluate``) and the
images dedup checks for contamination all take the same path, :func:`winnow.pipeline.data.images.open_rgb` then the
model's own preprocessing.

Images are decoded and preprocessed by a thread pool, one batch ahead of the model. An image that cannot be
decoded is reported by its row, never silently dropped. ``draft_side`` > 0 decodes JPEGs in PIL's draft mode to
at least that side (``embed`` passes twice the model's input side).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.images import DEFAULT_MAX_PIXELS, open_rgb

_MODELS: dict[tuple, tuple] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(model: str, pretrained: str, device: str, seed: int = 0):
    """``(model, preprocess, tokenizer)``, built once per process (each Dask worker keeps its own)."""
    from winnow.pipeline.models.registry import load

    key = (model, pretrained, device, seed)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load(model, pretrained, device=device, seed=seed)
        return _MODELS[key]


def autocast(device: str, precision: str):
    """fp16/bf16 autocast on CUDA; nothing on the CPU or for fp32."""
    import torch

    if device.startswith("cuda") and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def image_batches(items: Iterable[tuple[int, bytes]], preprocess, batch_size: int, failures: dict[int, str],
                  draft_side: int = 0, threads: int = 1, on_image=None) -> Iterator[tuple[list[int], object]]:
    """``(rows, tensor)`` batches of decoded, preprocessed images; undecodable rows go to ``failures``.
    ``on_image(row, rgb array)``: called with each decoded image in its decode thread (detectors run there, on
    the same pixels)."""
    import torch

    def decode(chunk):
        rows, tensors = [], []
        for row, data in chunk:
            try:
                image = open_rgb(data, draft_side, DEFAULT_MAX_PIXELS)
                if on_image is not None:
                    on_image(row, np.asarray(image))
                tensors.append(preprocess(image))
                rows.append(row)
            except Exception as exc:  # noqa: BLE001 - any undecodable image becomes a ledger entry
                failures[row] = f"decode_error: {type(exc).__name__}: {exc}"
        return rows, tensors

    def chunks():
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def join(futures):
        rows, tensors = [], []
        for f in futures:
            r, t = f.result()
            rows.extend(r)
            tensors.extend(t)
        return rows, (torch.stack(tensors) if tensors else None)

    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for chunk in chunks():  # each batch split across the threads; at most two batches in flight
            pending.append([pool.submit(decode, chunk[i::threads]) for i in range(threads) if chunk[i::threads]])
            if len(pending) > 1:
                yield join(pending.pop(0))
        for futures in pending:
            yield join(futures)


def _encoded(model, batches, device: str, precision: str) -> Iterator[tuple[list[int], np.ndarray]]:
    import torch

    with torch.inference_mode(), autocast(device, precision):
        for rows, x in batches:
            if x is not None:
                yield rows, model.encode_image(x.to(device, non_blocking=True), normalize=True).float().cpu().numpy()


def encode_images(model, preprocess, items: Iterable[tuple[int, bytes]], device: str, out: np.ndarray,
                  batch_size: int = 128, draft_side: int = 0, threads: int = 1, precision: str = "fp32",
                  on_batch=None, on_image=None) -> dict[int, str]:
    """L2-normalised embeddings of ``(row, encoded image)`` items into ``out[row]``; returns the rows that could
    not be decoded, with the reason. ``on_batch(n)``: called with the images done so far after each batch;
    ``on_image``: see :func:`image_batches`."""
    failures: dict[int, str] = {}
    batches = image_batches(items, preprocess, batch_size, failures, draft_side, threads, on_image)
    done = 0
    for rows, feats in _encoded(model, batches, device, precision):
        out[rows] = feats
        done += len(rows)
        if on_batch is not None:
            on_batch(done + len(failures))
    return failures


def embed_images(model, preprocess, images: list[bytes], device: str, batch_size: int = 128,
                 draft_side: int = 0) -> np.ndarray:
    """(n, d) L2-normalised embeddings of a list of encoded images, in order; an undecodable image is an error."""
    failures: dict[int, str] = {}
    batches = image_batches(enumerate(images), preprocess, batch_size, failures, draft_side)
    parts = [feats for _, feats in _encoded(model, batches, device, "fp32")]
    if failures:
        row, why = next(iter(failures.items()))
        raise UserError(f"image {row} cannot be decoded ({why}); {len(failures)} image(s) in all")
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def encode_texts(model, tokenizer, texts: list[str], device: str, batch_size: int = 256,
                 precision: str = "fp32") -> np.ndarray:
    """(n, d) L2-normalised text embeddings."""
    import torch

    out = []
    with torch.inference_mode(), autocast(device, precision):
        for s in range(0, len(texts), batch_size):
            out.append(model.encode_text(tokenizer(texts[s: s + batch_size]).to(device), normalize=True)
                       .float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
