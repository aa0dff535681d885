"""open_clip models: Winnow's tiny configs, and loading by name + pretrained tag or local checkpoint.

``register()`` adds ``pipeline/model_configs/*.json`` to open_clip's registry. ``winnow-tiny-clip`` is a CLIP
with a small ResNet image tower (open_clip's ModifiedResNet, width 16, one block per stage, 32 px input,
attention pooling) and a 2-layer text transformer of width 64 (context 24): measured on the demo's world, a
ViT trained from scratch on a CPU budget stays at chance (its contrastive loss sits at ln(batch) for
hundreds of steps) while this ResNet CLIP reaches well above chance within a minute. ``winnow-tiny-vitamin``
has the same text tower and a ViTamin image tower (MbConv stages then a 2-layer GeGLU transformer, 64 px,
built through timm's ViTamin code). Real models
need nothing from here: ``ViT-B-32`` + ``openai``, ``ViTamin-S`` + ``datacomp1b``, ``ViT-B-16-quickgelu`` +
``dfn2b`` resolve through open_clip as usual.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.models import copydetect

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_VITAMIN = "winnow_vitamin_tiny"


@functools.lru_cache(maxsize=1)
def register() -> None:
    """Register Winnow's tiny configs with open_clip and the tiny ViTamin tower with timm (idempotent)."""
    import open_clip
    from timm.models import register_model
    from timm.models._registry import is_model
    from timm.models.vitamin import GeGluMlp, VitCfg, VitConvCfg, _create_vitamin

    if not is_model(TINY_VITAMIN):
        # timm's ViTamin builder is private API (timm pins it); the shape follows ViTamin-S scaled down.
        def winnow_vitamin_tiny(pretrained: bool = False, **kwargs):
            embed_cfg = VitCfg(embed_dim=(32, 64, 192), depths=(1, 1, 1), stem_width=32,
                               conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
            args = dict(img_size=64, embed_dim=192, depth=2, num_heads=3, mlp_layer=GeGluMlp, mlp_ratio=2.0,
                        class_token=False, global_pool="avg", embed_cfg=embed_cfg)
            # no published weights: timm's default pretrained config, given by name (else timm warns each build)
            kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"architecture": TINY_VITAMIN}
            return _create_vitamin(TINY_VITAMIN, pretrained=pretrained, **dict(args, **kwargs))

        winnow_vitamin_tiny.__name__ = TINY_VITAMIN
        register_model(winnow_vitamin_tiny)
    open_clip.add_model_config(CONFIG_DIR)


def load(model: str, pretrained: str = "", device: str = "cpu", seed: int = 0):
    """Return ``(model, preprocess, tokenizer)`` in eval mode.

    ``pretrained`` is an open_clip tag (``openai``, ``datacomp1b``, ``dfn2b``...), a checkpoint path
    (``.../checkpoints/epoch_5.pt`` from open_clip_train, or a raw state dict), or empty for a seeded random init.
    Checkpoints are read with ``torch.load(weights_only=True)``.
    """
    import open_clip
    import torch

    if model == copydetect.MODEL_NAME:  # the copy-detection descriptor: images only
        return copydetect.load(pretrained, device), copydetect.preprocess, None
    if "://" in pretrained:  # a checkpoint on an object store: read through a local copy

        if not fsio.exists(pretrained):
            raise UserError(f"checkpoint not found: {pretrained}")
        pretrained = fsio.local_copy(pretrained)
    model = resolve_model(model, pretrained)
    is_file = check(model, pretrained)
    if pretrained and not is_file:
        weights_reachable(model, pretrained)
    torch.manual_seed(seed)
    try:
        with _quiet_random_init(is_file):  # the checkpoint read below replaces the random weights
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if (is_file or not pretrained) else pretrained, device=device)
    except RuntimeError as exc:  # a known tag whose weights cannot be fetched (no network)
        if not str(exc).startswith("Failed to download weights"):
            raise
        raise UserError(f"cannot download the {pretrained} weights of {model} ({' '.join(str(exc).split())[:200]}); "
                        "check the network or the Hugging Face cache") from None
    if is_file:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:  # missing, unexpected or misshapen weights
            why = " ".join(str(exc).split())[:160]
            recorded = trained_as(pretrained)
            fix = (f"its run trained it as {recorded}: pass --model {recorded}" if recorded and recorded != model
                   else "pass the --model it was trained as")
            raise UserError(f"{pretrained} is not a {model} checkpoint ({why} ...); {fix}") from None
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


OFFLINE_CHOICES = ("offline, give a checkpoint file (--pretrained PATH), '' for a seeded random init, or Winnow's "
                   "tiny model trained here (--model winnow-tiny-clip with a `winnow train` checkpoint)")


def trained_as(checkpoint: str) -> str | None:
    """The open_clip model a ``winnow train`` checkpoint (``<run>/checkpoints/epoch_N.pt``) was trained as, read
    from its run's manifest; None for other files."""

    path = checkpoint if "://" in checkpoint else os.path.abspath(checkpoint)
    run = path.rstrip("/").rsplit("/", 2)[0]
    for name in ("_manifest.json", "_run.json"):
        try:
            doc = fsio.read_json(fsio.join(run, name))
        except (OSError, ValueError):
            continue
        model = (doc.get("params") or {}).get("model") if isinstance(doc, dict) else None
        if isinstance(model, str) and model:
            return model
    return None


DEFAULT_MODEL = "winnow-tiny-clip"


def resolve_model(model: str, pretrained: str) -> str:
    """``model``, or when it is empty the model the checkpoint's run recorded, else Winnow's tiny CLIP (a
    checkpoint of another model then fails to load with a line asking for its --model)."""
    if model:
        return model
    recorded = trained_as(pretrained) if pretrained and ("://" in pretrained or os.path.isfile(pretrained)) \
        else None
    return recorded or DEFAULT_MODEL


def weights_reachable(model: str, tag: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when the weights of a pretrained tag are neither in the local caches nor
    reachable (open_clip and huggingface_hub would retry for a minute or more before saying so)."""

    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, name = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [name] if name else ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            os.environ["HF_HUB_OFFLINE"] = "1"  # cached: no network round trips
            return
        host = "huggingface.co"
    elif cfg.get("url"):
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(urlsplit(cfg["url"]).path))
        if os.path.isfile(cached):
            return
        host = urlsplit(cfg["url"]).hostname or ""
    else:
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" and hub:
        reachable = False
    else:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reachable = True
        except OSError:
            reachable = False
    if not reachable:
        raise UserError(f"the {tag} weights of {model} are not in the local cache and {host} cannot be reached; "
                        f"{OFFLINE_CHOICES}")


def check(model: str, pretrained: str) -> bool:
    """Refuse an unknown model name, or a ``pretrained`` that is neither one of the model's tags nor a file
    (one line naming the fix); return True when ``pretrained`` is a local checkpoint file."""

    import open_clip

    register()
    names = open_clip.list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else "e.g. ViT-B-32, ViTamin-S, winnow-tiny-clip; "
        raise UserError(f"unknown open_clip model {model!r}; {hint}open_clip.list_models() lists all")
    if not pretrained or os.path.isfile(pretrained) or open_clip.get_pretrained_cfg(model, pretrained):
        return bool(pretrained) and os.path.isfile(pretrained)
    if os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")):
        raise UserError(f"checkpoint not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(model)
    known = (f"its tags: {', '.join(tags[:8])}{' ...' if len(tags) > 8 else ''}" if tags
             else "it has no pretrained tags")
    raise UserError(f"--pretrained {pretrained}: no such tag for {model} and no such checkpoint file; {known} "
                    "(or give a checkpoint path, or '' for a random init)")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init(checkpoint_follows: bool):
    """Silence open_clip's "Model initialized randomly" warning (and only it) while a model whose checkpoint is
    loaded right after is built; every other record passes."""
    drop = _DropRandomInitWarning() if checkpoint_follows else None
    if drop:
        logging.getLogger().addFilter(drop)  # open_clip logs through the root logger
    try:
        yield
    finally:
        if drop:
            logging.getLogger().removeFilter(drop)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
