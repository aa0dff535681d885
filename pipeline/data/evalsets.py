"""Reading and writing evaluation sets (clip_benchmark's export layout, which DataComp's eval sets use).

An eval set folder holds ``test/*.tar`` (WebDataset: ``<key>.jpg`` or ``.png``/``.webp``, ``<key>.cls`` with the
integer label, ``<key>.txt`` with the image's captions for retrieval), ``classnames.txt`` and
``zeroshot_classification_templates.txt``. As in clip_benchmark's retrieval sets, a ``.txt`` holding several lines
is several captions of that image (:func:`split_captions`). A DiST set stores ``<key>.original.png``, ``.synth_a.png``
and
``.synth_b.png`` per triplet instead. A labeled source for building eval sets may also be a folder of class
folders (ImageNet's val layout).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import numpy as np

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.shards import image_bytes, iter_tar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: the odd-one-out members of a DiST triplet, in the order they are stored
MEMBERS = ("original", "synth_a", "synth_b")


def _tars(folder: str, what: str) -> list[str]:
    """The shards of an eval set in their order: numbered names (DataComp's ``{0..n-1}.tar``) by number."""
    tars = fsio.glob(fsio.join(folder, "test", "*.tar"))
    if not tars:
        raise UserError(f"{what} {folder} has no test/*.tar shards")
    stem = lambda t: t.rsplit("/", 1)[-1][:-4]  # noqa: E731
    return sorted(tars, key=lambda t: (0, int(stem(t)), "") if stem(t).isdigit() else (1, 0, stem(t)))


def read_evalset(folder: str) -> dict:
    """Images (encoded bytes), labels, captions, class names and templates of an eval set folder."""
    images, labels, captions, meta = [], [], [], []
    for tar in _tars(folder, "eval set"):
        for s in iter_tar(tar):
            data = image_bytes(s)
            if data is None:
                continue
            images.append(data)
            labels.append(int(s["cls"]) if "cls" in s else -1)
            captions.append(s["txt"].decode() if "txt" in s else None)
            if "npy" in s:  # WILDS and fairness sets: a row of group metadata per image
                meta.append(np.load(io.BytesIO(s["npy"]), allow_pickle=False))
    def read(name: str) -> list[str] | None:
        path = fsio.join(folder, name)
        return [ln.strip() for ln in fsio.read_bytes(path).decode().splitlines() if ln.strip()] \
            if fsio.exists(path) else None

    classnames = read("classnames.txt") or []
    templates = read("zeroshot_classification_templates.txt") or ["a photo of a {c}."]
    if meta and len(meta) != len(images):
        raise UserError(f"eval set {folder}: {len(meta)} of {len(images)} images have .npy metadata; all or none")
    return {"images": images, "labels": np.array(labels), "captions": captions, "classnames": classnames,
            "templates": templates, "meta": np.stack(meta) if meta else None}


def fingerprint(folder: str) -> str:
    """``sha256:<hex>`` of what an evaluation on ``folder`` sees: every file's path (relative to the folder) and
    size and, for local tars, every member's name and size in order (the eval items and their order). Two
    evaluations are comparable item by item only when their sets' fingerprints are equal."""

    h = hashlib.sha256()
    fs, root = fsio.get_fs(folder)
    if not fs.exists(root):
        return "missing"
    for path in sorted(fs.find(root)):
        rel = path[len(root.rstrip("/")) + 1:]
        h.update(f"{rel}\0{fs.size(path)}\n".encode())
        if rel.endswith(".tar") and fsio.is_local(folder):
            with tarfile.open(path, "r:") as tar:  # headers only: data is skipped by seeking
                for m in tar:
                    h.update(f"{m.name}\0{m.size}\n".encode())
    return f"sha256:{h.hexdigest()}"


def split_captions(captions: list[str]) -> tuple[list[str], np.ndarray]:
    """Every caption of every image (clip_benchmark's convention: one caption per line of an image's ``.txt``,
    split as ``str.splitlines``) and, per caption, the index of its image."""
    lines = [c.splitlines() for c in captions]
    return [t for ts in lines for t in ts], np.repeat(np.arange(len(lines)), [len(ts) for ts in lines])


def read_labeled(source: str) -> dict:
    """A labeled image source for building eval sets: an eval set folder or a folder with one sub-folder of
    images per class (class names are the sub-folder names). Returns :func:`read_evalset`'s dict; every image
    must have a label."""
    if not fsio.isdir(source):
        raise UserError(f"labeled source not found: {source} (an eval set folder or a folder of class folders)")
    if fsio.glob(fsio.join(source, "test", "*.tar")):
        data = read_evalset(source)
    else:
        classes = [d for d in fsio.listdir(source) if fsio.isdir(fsio.join(source, d))]
        images, labels = [], []
        for label, name in enumerate(classes):
            for f in fsio.listdir(fsio.join(source, name)):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    images.append(fsio.read_bytes(fsio.join(source, name, f)))
                    labels.append(label)
        if not images:
            raise UserError(f"{source} has neither test/*.tar shards nor class folders of images")
        data = {"images": images, "labels": np.array(labels), "captions": [None] * len(images),
                "classnames": classes, "templates": ["a photo of a {c}."]}
    if (data["labels"] < 0).any() or len(set(data["labels"].tolist())) < 2:
        raise UserError(f"{source}: needs a .cls label per image and at least two classes")
    return data


def labeled_files(source: str) -> list[str]:
    """The files that make up a labeled source (its fingerprint for stage manifests)."""
    tars = fsio.glob(fsio.join(source, "test", "*.tar"))
    if tars:
        return tars + [p for p in (fsio.join(source, "classnames.txt"),
                                   fsio.join(source, "zeroshot_classification_templates.txt")) if fsio.exists(p)]
    return [f for f in fsio.glob(fsio.join(source, "*", "*")) if f.lower().endswith(IMAGE_SUFFIXES)]


def per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` images of every class, in the source's order (all when n <= 0)."""
    if n <= 0:
        return np.arange(len(labels))
    seen: dict[int, int] = {}
    keep = []
    for i, lab in enumerate(labels.tolist()):
        if seen.get(lab, 0) < n:
            seen[lab] = seen.get(lab, 0) + 1
            keep.append(i)
    return np.array(keep, int)


def write_evalset_meta(folder: str, classnames: list[str], templates: list[str]) -> None:
    """The class names and templates files of an eval set folder (clip_benchmark layout)."""
    fsio.write_bytes(os.path.join(folder, "classnames.txt"), "".join(c + "\n" for c in classnames).encode())
    fsio.write_bytes(os.path.join(folder, "zeroshot_classification_templates.txt"),
                     "".join(t + "\n" for t in templates).encode())


def read_triplets(folder: str) -> tuple[list[list[bytes]], np.ndarray]:
    """The (original, synth A, synth B) PNG bytes and the label of every triplet of a DiST folder."""
    triplets, labels = [], []
    for tar in _tars(folder, "DiST set"):
        for s in iter_tar(tar):
            if all(f"{m}.png" in s for m in MEMBERS):
                triplets.append([s[f"{m}.png"] for m in MEMBERS])
                labels.append(int(s["cls"]) if "cls" in s else -1)
    if not triplets:
        raise UserError(f"{folder} holds no (original, synth_a, synth_b) triplets")
    return triplets, np.array(labels)
