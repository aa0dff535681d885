"""1.0 when a sample's image falls in a cluster that the target set occupies (DataComp's image-based baseline).

Centroids: DataComp's released ones by path (``centroids: PATH``, ``.npy``, or the ``.pt`` they ship, read with
``torch.load(weights_only=True)``), or ``prepare`` runs k-means (L2, ``niter`` 20, seed 0; faiss searches) over a
seeded float16 sample of at most ``sample_rows`` of the pool's stored image embeddings, read part by part into one
array and clustered a block at a time (memory bounded whatever the pool's size: 1.28M x 768-d float16 is 2.0 GB). With
``caption_filter`` (default) the sample holds only rows that pass DataComp's caption filter (fastText English, more
than one fastText token, more than 5 characters), the rows the baseline keeps from. Every target embedding
(ImageNet-1k train images for DataComp: ``target`` is an ``.npy`` array, a ``.pt`` with ``image_features`` as
DataComp's, or a folder of ``.npz`` embeddings) is assigned to its nearest centroid by inner product; the clusters hit
form the kept set, and each sample scores 1.0 when its nearest centroid is one of them. DataComp used 100,000
centroids for 12.8M samples (128 per cluster); ``n_clusters: 0`` keeps that ratio for any pool size. Rows without an
image embedding score NaN.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.models import kmeans

from .base import EmbeddingFilter
from .caption_chars import CaptionCharsFilter
from .caption_words import CaptionWordsFilter
from .english import EnglishFilter

SAMPLES_PER_CLUSTER = 128  # DataComp small: 12.8M samples / 100,000 centroids


@functools.lru_cache(maxsize=4)
def _centroids(path: str) -> np.ndarray:
    return fsio.load_npy(path, f"image_cluster centroids {path}")


def nearest(x: np.ndarray, centroids: np.ndarray, cells: int = 2**25) -> np.ndarray:
    """Index of the centroid with the largest inner product, for each row of ``x`` (in batches of at most
    ``cells`` similarities: 128 MB, whatever the number of centroids)."""
    batch = max(1, cells // max(1, len(centroids)))
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), batch):
        out[s: s + batch] = np.argmax(x[s: s + batch] @ centroids.T, axis=1)
    return out


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and torch tensors and nothing else: any other global a file names
    is refused, as torch's ``weights_only`` loader refuses it, but every pickle protocol is read (that loader reads
    protocol 2 only, and DataComp's ``image_based_clustering.py`` saves ``pickle_protocol=4``)."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")):
            return np._core.multiarray._reconstruct
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(np.dtypes, name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda flat, offset, size, stride, *_: flat.as_strided(size, stride, offset).clone()
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)  # only its dtype is read (persistent_load)
        if (module, name) == ("collections", "OrderedDict"):

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain array or tensor; refused")

    def persistent_load(self, pid):
        import torch

        _, storage_type, key, _location, _numel = pid
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reading a legacy storage class's dtype
            dtype = storage_type if isinstance(storage_type, torch.dtype) else storage_type.dtype
        return torch.frombuffer(bytearray(self.archive.read(f"{self.prefix}data/{key}")), dtype=dtype)


def load_arrays(path: str):
    """The arrays or tensors of a torch ``.pt`` zip file, read with :class:`_ArraysOnly` (no other object)."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        obj = _ArraysOnly(io.BytesIO(archive.read(name)), archive, name[: -len("data.pkl")]).load()
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects")
    return obj


def load_matrix(path: str, what: str, mmap: bool = False) -> np.ndarray:
    """A float32 matrix from ``.npy`` (never unpickled) or a torch ``.pt``/``.pth`` file (``weights_only``: plain
    arrays and tensors only; a dict is read at ``image_features``, DataComp's key). ``mmap``: an ``.npy`` is
    returned memory-mapped, in its own dtype."""
    if path.endswith((".pt", ".pth")):
        import torch

        if not fsio.exists(path):
            raise UserError(f"{what}: file not found")
        reconstruct = np._core.multiarray._reconstruct
        allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                   type(np.dtype(np.float32)), type(np.dtype(np.float16))]
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's note on protocol 4, answered below
                obj = torch.load(fsio.local_copy(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything beyond arrays and tensors is refused
            try:  # DataComp saves its centroids with pickle protocol 4, which torch's safe loader cannot read
                obj = load_arrays(fsio.local_copy(path))
            except (pickle.UnpicklingError, KeyError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as why:
                first = str(why).splitlines()[0][:120] if str(why) else str(exc).splitlines()[0][:120]
                raise UserError(f"{what}: not a plain array or tensor file ({first})") from None
        if isinstance(obj, dict):
            obj = obj.get("image_features")
        if isinstance(obj, torch.Tensor):
            obj = obj.float().numpy()
        if not isinstance(obj, np.ndarray) or obj.ndim != 2:
            raise UserError(f"{what}: expected a 2-d array (or a dict with image_features)")
        return obj.astype(np.float32)
    arr = fsio.load_npy(path, what, mmap=mmap)
    if arr.ndim != 2:
        raise UserError(f"{what}: expected a 2-d array, got shape {arr.shape}")
    return arr if mmap else arr.astype(np.float32)


def target_files(path: str, tag: str) -> list[str]:
    """The files of a target: one ``.npy``/``.pt`` file, or a folder's ``.npy``/``.pt`` files and ``.npz`` files
    with ``<tag>_img`` (DataComp ships ImageNet-1k's as five ``in1k_clip_vit_l14_<i>.pt``), in name order."""
    matrices = (".npy", ".pt", ".pth")
    if path.endswith(matrices) and fsio.exists(path):
        files = [path]
    elif fsio.isdir(path):
        files = [fsio.join(path, n) for n in sorted(fsio.listdir(path)) if n.endswith((*matrices, ".npz"))]
    else:
        files = []
    if not files:
        raise UserError(f"image_cluster.target {path!r}: give an .npy or .pt file of embeddings, or a folder of "
                        f".npy/.pt files or of .npz files with '{tag}_img'")
    return files


def each_target(path: str, tag: str, rows: int = 65_536):
    """The target image embeddings a block of at most ``rows`` rows at a time (float32, rows without a value
    dropped): an ``.npy`` is read memory-mapped, a ``.pt`` or ``.npz`` file one file at a time, so memory is one
    block (or one such file), never the whole target."""
    from winnow.pipeline.data.parts import load_npz

    for f in target_files(path, tag):
        arr = load_npz(f, tag)["img"] if f.endswith(".npz") else load_matrix(f, f"image_cluster.target {f}", mmap=True)
        for s in range(0, len(arr), rows):
            block = np.asarray(arr[s: s + rows], np.float32)
            yield block[np.isfinite(block).all(axis=1)]
        del arr


def load_target(path: str, tag: str) -> np.ndarray:
    """The whole target as one float32 array (see ``each_target``)."""
    blocks = list(each_target(path, tag))
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def caption_mask(part, fasttext_model: str = "") -> np.ndarray:
    """DataComp's caption filter for the image-based baseline: fastText English, more than one fastText token,
    more than 5 characters."""
    from winnow.pipeline.data.parts import read_part


    table = read_part(part, ["caption"])
    english = EnglishFilter(fasttext_model=fasttext_model).score(table, {}).to_numpy()
    words = CaptionWordsFilter(tokenizer="fasttext").score(table, {}).to_numpy()
    chars = CaptionCharsFilter().score(table, {}).to_numpy()
    return (english == 1) & (words > 1) & (chars > 5)


@dataclass
class ImageClusterFilter(EmbeddingFilter):
    key = "image_cluster"
    tag: str = "l14"
    target: str = ""
    n_clusters: int = 0
    niter: int = 20
    seed: int = 0
    sample_rows: int = 1_280_000
    centroids: str = ""  # released centroids (.npy or .pt); empty: k-means over the pool
    caption_filter: bool = True  # k-means sample: only rows passing DataComp's caption filter
    fasttext_model: str = ""  # the caption filter's language id model (empty: the shipped lid.176.ftz)
    centroids_path: str = ""  # set by prepare
    kept_clusters: tuple = ()  # set by prepare

    def arrays(self):
        return ("img",)

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k not in ("centroids_path", "kept_clusters")}

    def prepare(self, context: Any) -> None:
        target = load_target(self.target, self.tag)
        if self.centroids:
            centroids = load_matrix(self.centroids, f"image_cluster.centroids {self.centroids}")
            what = f"{len(centroids):,} centroids from {self.centroids}"
        else:
            keep = functools.partial(caption_mask, fasttext_model=self.fasttext_model) if self.caption_filter else None
            x = context.sample(self.tag, "img", self.sample_rows, self.seed, keep=keep, dtype=np.float16)
            k = self.n_clusters or max(2, min(100_000, round(len(x) / SAMPLES_PER_CLUSTER)))
            if len(x) < k:
                raise UserError(f"image_cluster: {len(x)} embeddings cannot make {k} clusters; lower n_clusters")
            what = f"{k} clusters over {len(x):,} pool images"
            centroids = kmeans.train(x, k, niter=self.niter, seed=self.seed)
            del x  # the sample: before the subset reads its parts
        if centroids.shape[1] != target.shape[1]:
            raise UserError(f"image_cluster: centroids have {centroids.shape[1]} dimensions, the target embeddings "
                            f"{target.shape[1]}; use the same embedding model for both")
        self.centroids_path = context.save("centroids.npy", centroids)
        self.kept_clusters = tuple(sorted(int(c) for c in np.unique(nearest(target, centroids))))
        context.log(f"image_cluster: {what}; the {len(target):,} target images occupy {len(self.kept_clusters)}")

    def score(self, part, embeddings):
        img = self.array(embeddings, "img", len(part))
        if not self.centroids_path:
            raise ValueError("image_cluster: prepare() has not run")
        valid = np.isfinite(img).all(axis=1)
        out = np.full(len(part), np.nan)
        if valid.any():
            assigned = nearest(img[valid], _centroids(self.centroids_path))
            out[valid] = np.isin(assigned, np.array(self.kept_clusters, dtype=np.int64)).astype(float)
        return pd.Series(out, index=part.index)
