"""DiST (Wen et al. 2023): triplets of (original, two texture syntheses of it) and the odd-one-out test.

A synthesis keeps the source's local texture statistics and destroys its global structure: Gatys et al.
(2015) Gram-matrix texture synthesis, run from two different noise seeds per source. The paper matched VGG-19
Gram matrices; VGG weights cannot be downloaded here, so the default feature network is a fixed multi-scale
random-weight CNN (random shallow networks are good texture models: Ustyuzhaninov et al. 2016):

- ``texture_net``: 2-5 stages by image size (:func:`stages_for`: the deepest receptive field stays about a
  quarter of the image, else the synthesis keeps the global layout), each a 3x3 convolution with 64 channels,
  circular padding (no border effects: a synthesis has no preferred position) and ReLU, 2x2 average pooling
  between stages as in Gatys' average-pooled VGG; weights drawn once from ``net_seed`` (He initialisation),
  never trained. The Gram matrices of the input pixels (colour second moments) and of every stage are matched. Any
  local torchvision VGG-19 checkpoint can replace it (``vgg19=PATH``: the
  ``relu1_1 .. relu5_1`` outputs, the paper's layers).
- Loss: the sum over layers of ``||G(x) - G(x0)||^2 / ||G(x0)||^2`` with ``G = F F^T / M`` (M positions), plus
  a per-channel mean and standard deviation term. Start: the source with its Fourier phases randomised by the
  seed (its amplitude spectrum, no layout); L-BFGS on the pixels (``steps`` iterations, strong Wolfe line
  search; a penalty keeps pixels in [0, 1] where Gatys' code used L-BFGS-B bounds). The colours are then given the
  source's joint colour distribution (iterative
  distribution transfer) and exactly its per-channel histograms, so pixel statistics carry no cue. All images
  of a batch are optimised together (every image's loss is its own), on the GPU when present.

Quality gates, per synthesis, written to the manifest:

- ``gram``: the relative Gram distance above (after histogram matching and 8-bit quantisation) must be
  <= ``gram_max``; for scale, the manifest also records the distance of an unrelated source (another class).
- ``structure``: the similarity of the synthesis' coarse layout to the source's (Pearson correlation of 8x8
  grids of luminance and of edge magnitude, averaged) must lie within ``structure_margin`` of the mean
  similarity of the source to unrelated sources of other classes (also recorded), in either direction: the
  global structure is as gone as in an unrelated image. The band is symmetric on purpose: a one-sided gate
  keeps syntheses anti-correlated with their source, and that selection alone lets raw pixels find the
  original.
- ``distinct``: the two syntheses of a source must differ (pixel correlation <= ``pair_max``).

A source whose syntheses fail is redone with new seeds up to ``retries`` times, then dropped; the manifest
and ``gates.json`` count both.

The test (:mod:`winnow.pipeline.tasks.odd_one_out`): embed the three images, L2-normalise, ``odd = argmin_i sum_{j !=
i} cos(e_i,
e_j)``; a trial is right when the odd one is the original; chance is 1/3. Two reference "models" check the
set (:func:`baseline_scores`): ``pixels`` (the raw pixel vector) and ``texture`` (the Gram matrices of every
stage of a second random network, another seed and the full five stages whatever the image size, each
normalised and concatenated) must both score near chance.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import yaml

from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import path
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import shards
from winnow.pipeline.data.evalsets import MEMBERS, labeled_files, per_class, read_labeled, write_evalset_meta
from winnow.pipeline.data.images import square_image
from winnow.pipeline.tasks.odd_one_out import metrics as odd_one_out_metrics


@dataclass
class DistConfig:
    size: int = 128  # side of every stored image (source centre-cropped and resized; 224 for ImageNet-scale models)
    per_class: int = 0  # sources per class, the first in the set's order (0: all)
    seed: int = 0
    steps: int = 200  # L-BFGS iterations per synthesis
    batch: int = 32  # images synthesised together (2 CPU cores at 224 px: batch 1 measured faster)
    net_seed: int = 1234  # weights of the random texture network
    vgg19: str = path("")  # optional local torchvision VGG-19 state dict used instead of the random network
    gram_max: float = 0.05
    structure_margin: float = 0.3
    pair_max: float = 0.9
    retries: int = 2
    device: str = "auto"


# ------------------------------------------------------------------------------------------ texture networks
def stages_for(size: int) -> int:
    """Stages of the texture network for an image side: the deepest receptive field stays about a quarter of the
    image (deeper layers would match the global layout itself): 3 at 64 px, 4 at 128 and 224, 5 at 256."""
    return int(np.clip(np.floor(np.log2(size)) - 3, 2, 5))


def _tapped(layers, taps: set[int], device: str):
    """A frozen module running ``layers`` in order on ImageNet-normalised input; returns the normalised input and
    the outputs of the layers whose index is in ``taps`` (the maps whose Gram matrices are matched)."""
    import torch
    from torch import nn

    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(layers)
            self.requires_grad_(False)
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        def forward(self, x):
            h = (x - self.mean) / self.std
            maps = [h]
            for i, layer in enumerate(self.layers):
                h = layer(h)
                if i in taps:
                    maps.append(h)
            return maps

    return Tapped().to(device).eval()


def texture_net(seed: int, stages: int = 5, device: str = "cpu"):
    """The fixed random multi-scale CNN (see the module docstring); returns a module giving a list of maps."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    widths = (3, 64, 64, 64, 64, 64)[:stages + 1]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        conv = nn.Conv2d(a, b, 3, padding=1, padding_mode="circular")
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / (a * 9)) ** 0.5  # He init
        conv.bias.data.zero_()
        layers += ([nn.AvgPool2d(2)] if i else []) + [conv, nn.ReLU()]
    return _tapped(layers, {i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)}, device)


def vgg19_net(path: str, device: str = "cpu"):
    """A local torchvision VGG-19 checkpoint as the texture network (max pools -> average pools, as Gatys)."""
    import torch
    from torch import nn
    from torchvision.models import vgg19


    if not os.path.isfile(path):
        raise UserError(f"VGG-19 checkpoint not found: {path}")
    net = vgg19()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    layers = [nn.AvgPool2d(2) if isinstance(m, nn.MaxPool2d) else m for m in net.features[:30]]
    return _tapped(layers, {1, 6, 11, 20, 29}, device)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1


def grams(maps):
    """Per image and layer, G = F F^T / M: a list of (batch, C, C) tensors."""
    out = []
    for f in maps:
        b, c, h, w = f.shape
        f = f.reshape(b, c, h * w)
        out.append(f @ f.transpose(1, 2) / (h * w))
    return out


def gram_distance(ga, gb):
    """Per image: sum over layers of ||Ga - Gb||^2 / ||Gb||^2 (relative to the second argument)."""
    total = 0
    for a, b in zip(ga, gb):
        total = total + ((a - b) ** 2).sum(dim=(1, 2)) / (b ** 2).sum(dim=(1, 2)).clamp_min(1e-12)
    return total


# ---------------------------------------------------------------------------------------------- synthesis
def synthesize(net, sources: np.ndarray, seeds: list[int], steps: int, device: str = "cpu"):
    """Texture syntheses of a batch of uint8 (B, S, S, 3) sources, one seed each; returns uint8 (B, S, S, 3)."""
    import torch

    x0 = torch.from_numpy(sources).to(device).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        target = grams(net(x0))
    mean, std = x0.mean(dim=(2, 3), keepdim=True), x0.std(dim=(2, 3), keepdim=True)
    start = np.stack([phase_randomize(src, np.random.default_rng(int(s))) for src, s in zip(sources, seeds)])
    x = (torch.from_numpy(start).to(device).permute(0, 3, 1, 2).float() / 255).contiguous().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=steps, history_size=50, tolerance_grad=0, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = gram_distance(grams(net(x)), target)
        moments = ((x.mean(dim=(2, 3), keepdim=True) - mean) ** 2 + (x.std(dim=(2, 3), keepdim=True) - std) ** 2)
        total = loss.sum() + 10 * moments.sum() + 10 * ((x - x.clamp(0, 1)) ** 2).sum() / x[0].numel()
        total.backward()
        return total

    opt.step(closure)
    out = (x.detach().permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return np.stack([match_colours(o, s, np.random.default_rng(int(seed))) for o, s, seed in zip(out, sources, seeds)])


def phase_randomize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image's amplitude spectrum with random phases (one phase field for all channels, so colours stay
    correlated), histogram-matched to the image: a start with the source's second-order statistics and no layout."""
    f = np.fft.rfft2(img.astype(np.float64), axes=(0, 1))
    phase = np.angle(np.fft.rfft2(rng.standard_normal(img.shape[:2])))[..., None]
    phase[0, 0] = 0  # keep the means
    out = np.fft.irfft2(np.abs(f) * np.exp(1j * (np.angle(f[0:1, 0:1]) + phase)), s=img.shape[:2], axes=(0, 1))
    return match_histograms(out, img)


def match_colours(img: np.ndarray, ref: np.ndarray, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """``img`` given ``ref``'s joint colour distribution: iterative distribution transfer (Pitie et al. 2005:
    rank matching along random rotations of colour space), then exact per-channel rank matching."""
    x = img.reshape(-1, 3).astype(np.float64)
    y = ref.reshape(-1, 3).astype(np.float64)
    for _ in range(iterations):
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        px, py = x @ q, np.sort(y @ q, axis=0)
        for c in range(3):
            order = np.argsort(px[:, c], kind="stable")
            target = np.empty(len(order))
            target[order] = py[:, c]
            px[:, c] = target
        x = px @ q.T
    return match_histograms(x.reshape(img.shape), ref)


def match_histograms(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Each channel of ``img`` given exactly the values of ``ref``'s channel, by rank (same size images)."""
    out = np.empty(img.shape, ref.dtype)
    for c in range(img.shape[2]):
        order = np.argsort(img[..., c], axis=None, kind="stable")
        flat = np.empty(order.size, ref.dtype)
        flat[order] = np.sort(ref[..., c], axis=None)
        out[..., c] = flat.reshape(img.shape[:2])
    return out


# ---------------------------------------------------------------------------------------------- the gates
def layout(img: np.ndarray, cells: int = 8) -> np.ndarray:
    """Coarse layout: 8x8 grids of luminance and of edge magnitude, each standardised, concatenated."""
    y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(y)
    out = []
    for m in (y, np.hypot(gx, gy)):
        s = m.shape[0] // cells * cells
        g = m[:s, :s].reshape(cells, s // cells, cells, s // cells).mean(axis=(1, 3)).ravel()
        out.append((g - g.mean()) / (g.std() + 1e-6))
    return np.stack(out)


def structure_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over luminance and edges of the Pearson correlation of two coarse layouts (:func:`layout`)."""
    return float((layout(a) * layout(b)).mean(axis=1).mean())


BASELINES = ("pixels", "texture")


def baseline_embeddings(kind: str, triplets: np.ndarray, net_seed: int = 4321) -> np.ndarray:
    """Reference "models" for (n, 3, S, S, 3) uint8 triplets (:data:`BASELINES`); returns (n, 3, d)."""
    n = triplets.shape[0]
    flat = triplets.reshape(n * 3, *triplets.shape[2:])
    if kind == "pixels":
        emb = flat.reshape(n * 3, -1).astype(np.float32)
    elif kind == "texture":
        import torch

        net = texture_net(net_seed, 5)
        parts = []
        with torch.no_grad():
            for s in range(0, len(flat), 64):
                x = torch.from_numpy(flat[s:s + 64]).permute(0, 3, 1, 2).float() / 255
                gs = grams(net(x))
                parts.append(torch.cat([g.flatten(1) / g.flatten(1).norm(dim=1, keepdim=True) for g in gs],
                                       dim=1).numpy())
        emb = np.concatenate(parts)
    else:
        raise ValueError(f"unknown baseline {kind!r} (pixels, texture)")
    return emb.reshape(n, 3, -1)


def baseline_scores(triplets: np.ndarray) -> dict[str, dict]:
    """Reference models on the set; both must score near chance, else the syntheses leak a low-level or a
    texture cue that a model could use without seeing global structure."""
    return {kind: odd_one_out_metrics(baseline_embeddings(kind, triplets)) for kind in BASELINES}


# ---------------------------------------------------------------------------------------------- the eval set
def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**31 - 1))


def gate_rows(net, sources: np.ndarray, a: np.ndarray, b: np.ndarray, unrelated: list[np.ndarray],
              cfg: DistConfig, device: str) -> list[dict]:
    """The quality-gate measurements and verdicts of syntheses ``a``, ``b`` of ``sources``."""
    import torch

    def g(arr):
        with torch.no_grad():
            return grams(net(torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float() / 255))

    g0, ga, gb = g(sources), g(a), g(b)
    gram_a, gram_b = gram_distance(ga, g0).cpu().numpy(), gram_distance(gb, g0).cpu().numpy()
    gram_u = gram_distance(g(np.stack([others[0] for others in unrelated])), g0).cpu().numpy()
    rows = []
    for i, src in enumerate(sources):
        others = unrelated[i]
        struct_u = float(np.mean([structure_similarity(o, src) for o in others]))
        row = {"gram_a": float(gram_a[i]), "gram_b": float(gram_b[i]), "gram_unrelated": float(gram_u[i]),
               "structure_a": structure_similarity(a[i], src), "structure_b": structure_similarity(b[i], src),
               "structure_unrelated": struct_u, "pair_correlation": channel_correlation(a[i], b[i])}
        failed = []
        if max(row["gram_a"], row["gram_b"]) > cfg.gram_max:
            failed.append("gram")
        if max(abs(row["structure_a"]), abs(row["structure_b"])) > abs(struct_u) + cfg.structure_margin:
            failed.append("structure")
        if row["pair_correlation"] > cfg.pair_max:
            failed.append("distinct")
        row["failed"] = ",".join(failed)
        rows.append(row)
    return rows


def channel_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel correlation of two images, per colour channel (centred), averaged over channels."""
    vals = []
    for c in range(a.shape[2]):
        x, y = a[..., c].astype(np.float64).ravel(), b[..., c].astype(np.float64).ravel()
        vals.append(float(np.corrcoef(x, y)[0, 1]) if x.std() and y.std() else 1.0)
    return float(np.mean(vals))


def build_dist(source: str, out: str, cfg: DistConfig, overwrite: bool = False, log=print) -> dict:
    """Write the DiST triplets of a labeled source (eval set folder or class folders) under ``out`` (a stage:
    the same source and config is reused); returns the gates summary (``gates.json``).

    ``out/test/0.tar``: per kept source ``<key>.original.png``, ``<key>.synth_a.png``, ``<key>.synth_b.png``
    (all PNG at ``cfg.size``: the same lossless encoding for the three, so no codec cue) and ``<key>.cls``;
    ``classnames.txt``; ``manifest.parquet`` (per source: label, status kept/dropped, attempts, seeds, every
    gate measurement, the failed gates); ``gates.json`` (counts, config, the reference models' scores);
    ``tasks.yaml`` (one odd-one-out task).
    """
    from winnow.pipeline.run.stage import Stage

    stage = Stage("dist", out, asdict(cfg), inputs=labeled_files(source), overwrite=overwrite, protect=[source],
                  log=log)
    if not stage.done:
        summary = _build(source, out, cfg, log)
        stage.finish(rows={"sources": summary["sources"], "kept": summary["kept"]})
    return fsio.read_json(os.path.join(out, "gates.json"))


def _build(source: str, out: str, cfg: DistConfig, log) -> dict:

    from PIL import Image

    from winnow.pipeline.models.registry import default_device

    device = default_device() if cfg.device == "auto" else cfg.device
    data = read_labeled(source)
    labels_all = data["labels"]
    chosen = per_class(labels_all, cfg.per_class)
    labels = labels_all[chosen]
    sources = np.stack([square_image(data["images"][i], cfg.size) for i in chosen])
    n = len(sources)
    net = vgg19_net(cfg.vgg19, device) if cfg.vgg19 else texture_net(cfg.net_seed, stages_for(cfg.size), device)
    # unrelated references per source: up to 8 sources of other classes (fixed by the seed)
    unrelated = []
    for i in range(n):
        others = np.flatnonzero(labels != labels[i])
        pick = np.random.default_rng([cfg.seed, i]).choice(others, min(8, len(others)), replace=False)
        unrelated.append(sources[pick])
    synth_a, synth_b = np.zeros_like(sources), np.zeros_like(sources)
    rows: list[dict] = [{} for _ in range(n)]
    pending = list(range(n))
    start = time.monotonic()
    for attempt in range(cfg.retries + 1):
        if not pending:
            break
        log(f"dist: attempt {attempt + 1}: synthesising {2 * len(pending)} images ({cfg.size} px, {cfg.steps} "
            f"steps, {device})")
        still = []
        for s in range(0, len(pending), cfg.batch):
            idx = pending[s:s + cfg.batch]
            seeds = [(_seed(cfg.seed, i, attempt, 0), _seed(cfg.seed, i, attempt, 1)) for i in idx]
            a = synthesize(net, sources[idx], [x for x, _ in seeds], cfg.steps, device)
            b = synthesize(net, sources[idx], [y for _, y in seeds], cfg.steps, device)
            for j, (i, row) in enumerate(zip(idx, gate_rows(net, sources[idx], a, b, [unrelated[i] for i in idx],
                                                              cfg, device))):
                synth_a[i], synth_b[i] = a[j], b[j]
                rows[i] = {**row, "seed_a": seeds[j][0], "seed_b": seeds[j][1], "attempts": attempt + 1}
                if row["failed"]:
                    still.append(i)
            done = n - len(pending) + s + len(idx)
            log(f"dist: {done}/{n} sources, {time.monotonic() - start:.0f} s")
        pending = still
    kept = [i for i in range(n) if not rows[i]["failed"]]
    triplets = np.stack([sources[kept], synth_a[kept], synth_b[kept]], axis=1) if kept else np.zeros((0, 3))
    path = os.path.join(out, "test", "0.tar")

    def png(arr):

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    with shards.TarWriter(path) as tar:
        for t, i in enumerate(kept):
            members = {f"{member}.png": png(img) for member, img in zip(MEMBERS, triplets[t])}
            tar.sample(f"{i:06d}", members | {"cls": str(int(labels[i])).encode()})
    fsio.write_bytes(os.path.join(out, "test", "nshards.txt"), b"1\n")
    write_evalset_meta(out, data["classnames"], data["templates"])
    manifest = pd.DataFrame([{"key": f"{i:06d}", "source_index": int(chosen[i]), "label": int(labels[i]),
                              "status": "dropped" if rows[i]["failed"] else "kept", **rows[i]} for i in range(n)])
    shards.write_table(os.path.join(out, "manifest.parquet"), manifest)
    failures = {gate: int(manifest["failed"].str.contains(gate).sum()) for gate in ("gram", "structure", "distinct")}
    baselines = baseline_scores(triplets) if kept else {}
    summary = {"sources": n, "kept": len(kept), "redone": int((manifest["attempts"] > 1).sum()),
               "dropped": n - len(kept), "dropped_by_gate": failures, "seconds": round(time.monotonic() - start, 1),
               "device": device, "config": asdict(cfg), "baselines": baselines,
               "medians": {c: float(manifest.loc[manifest.status == "kept", c].median()) for c in
                           ("gram_a", "gram_unrelated", "structure_a", "structure_unrelated", "pair_correlation")}}
    fsio.write_json(os.path.join(out, "gates.json"), summary)
    task = {"name": "dist", "kind": "odd_one_out", "data": out, "main_metric": "acc", "random_score": 0.3333}
    fsio.write_bytes(os.path.join(out, "tasks.yaml"), yaml.safe_dump({"tasks": [task]}, sort_keys=False).encode())
    log(f"dist: {len(kept)}/{n} triplets kept ({summary['redone']} redone, {n - len(kept)} dropped: "
        f"{json.dumps(failures)}); reference models: " +
        ", ".join(f"{k} {v['acc']:.3f}" for k, v in baselines.items()) + " (chance 0.333)")
    return summary


