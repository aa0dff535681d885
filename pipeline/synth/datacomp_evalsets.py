"""Miniature DataComp eval sets in the layouts of the published ones, for running the 38-task evaluation offline.

:func:`write_evalsets` fills a folder as DataComp's ``download_evalsets.py`` does, with a few synthetic images per
task instead of the real sets:

- per classification task ``wds_<key, / as ->_test/`` (``fairness/`` prefix dropped): ``classnames.txt`` (as many
  classes as the task has), ``zeroshot_classification_templates.txt``, ``test/nshards.txt`` and ``test/0.tar`` ..
  WebDataset samples ``<key>.{webp,png,jpg}`` + ``<key>.cls``; WILDS, Dollar Street and GeoDE samples add
  ``<key>.npy``, their metadata row (the fields DataComp's evaluators read, in their order); FairFace and UTKFace
  samples have no ``.cls``, only the ``.npy`` (age, gender, race, race_binary), and their class names and templates
  are prefixed with the objective (``race:``, ``gender:``, ``age:``, ``toxic:``).
- ``hf_cache/nlphuji___<name>/default/0.0.0/<hash>/<name>-test.arrow`` for Flickr, MSCOCO and WinoGAViL: Arrow
  IPC streams as ``datasets`` caches them (images as ``{bytes, path}``; one image stored by path only, under
  ``hf_cache/downloads/extracted/``, as an archive-backed dataset leaves it).

``scale`` > 0 writes ``scale x`` each task's real size instead (at least one item per class shown): the
evaluation then costs what the real sets cost, for benchmarks. Images are small class-coloured shapes, so a
model trained on the synthetic world is not at chance on them, and deterministic from ``seed``.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw

from winnow.pipeline.core import fsio

#: metadata fields of each dataset's .npy rows (DataComp's evaluators read them in this order)
META = {"wilds/iwildcam": ["location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"],
        "wilds/camelyon17": ["hospital", "slide", "y"], "wilds/fmow": ["region", "year", "y"],
        "fairness/dollar_street": ["income_ds", "income_meta", "region"], "fairness/geode": ["region", "country"],
        "fairness/fairface": ["age", "gender", "race", "race_binary"],
        "fairness/utkface": ["age", "gender", "race", "race_binary"]}
FACES = {"race": ["black", "white", "latino hispanic", "east asian", "southeast asian", "indian", "middle eastern"],
         "gender": ["male", "female"], "age": ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69",
                                                "70+"],
         "toxic": [*(f"person {i}" for i in range(14)), "animal", "gorilla", "chimpanzee", "orangutan", "thief",
                   "criminal", "suspicious person"]}
FORMATS = ("webp", "png", "jpg")


def _image(label: int, rng: np.random.Generator, side: int) -> Image.Image:
    hue = (label * 47) % 360
    colour = tuple(int(255 * c) for c in _hsv(hue / 360, 0.8, 0.9))
    im = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 60, 3)))
    d = ImageDraw.Draw(im)
    a, b = sorted(rng.integers(2, side - 2, 2))
    d.ellipse((a // 2, a // 2, side - a // 3, side - b // 4), fill=colour)
    return im


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:

    return colorsys.hsv_to_rgb(h, s, v)


def _encode(im: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    im.save(out, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return out.getvalue()


def _npy(row) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(row, dtype=np.int64), allow_pickle=False)
    return out.getvalue()


def _tar(path: str, samples: list[dict[str, bytes]]) -> None:
    with fsio.atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def _lines(path: str, lines: list[str]) -> None:
    fsio.write_bytes(path, "".join(line + "\n" for line in lines).encode())


def _meta_row(key: str, label: int, i: int, rng: np.random.Generator) -> list[int]:
    fields = META[key]
    row = [int(rng.integers(0, 4)) for _ in fields]  # a few groups per field
    if "y" in fields:
        row[fields.index("y")] = label
    if key == "wilds/fmow":  # regions 0..5, 5 being "Other"
        row[0] = i % 6
    return row


def _classification(folder: str, key: str, info: dict, n_items: int, per_shard: int, rng, side: int) -> int:
    k = int(info.get("num_classes") or 2)
    names = [f"{key.rsplit('/', 1)[-1]} class {c}" for c in range(k)]
    _lines(os.path.join(folder, "classnames.txt"), names)
    _lines(os.path.join(folder, "zeroshot_classification_templates.txt"), ["a photo of a {c}.", "a {c}."])
    samples = []
    for i in range(n_items):
        label = i % min(k, max(2, n_items // 2))
        members = {FORMATS[i % 3]: _encode(_image(label, rng, side), FORMATS[i % 3]), "cls": str(label).encode()}
        if key in META:
            members["npy"] = _npy(_meta_row(key, label, i, rng))
        samples.append(members)
    return _shards(folder, samples, per_shard)


def _faces(folder: str, key: str, n_items: int, per_shard: int, rng, side: int) -> int:
    _lines(os.path.join(folder, "classnames.txt"), [f"{o}:{c}" for o, names in FACES.items() for c in names])
    _lines(os.path.join(folder, "zeroshot_classification_templates.txt"),
           [f"{o}:a photo of a {{c}}." for o in FACES] + [f"{o}:a face of a {{c}}." for o in FACES])
    samples = []
    for i in range(n_items):
        race, gender, age = i % 7, i % 2, i % 9
        samples.append({FORMATS[i % 3]: _encode(_image(race, rng, side), FORMATS[i % 3]),
                        "npy": _npy([age, gender, race, int(race != 1)])})
    return _shards(folder, samples, per_shard)


def _shards(folder: str, samples: list[dict], per_shard: int) -> int:
    n = max(1, -(-len(samples) // per_shard))
    for s in range(n):
        _tar(os.path.join(folder, "test", f"{s}.tar"), samples[s * per_shard:(s + 1) * per_shard])
    _lines(os.path.join(folder, "test", "nshards.txt"), [str(n)])
    return len(samples)


def _arrow(folder: str, name: str, table) -> None:
    import pyarrow as pa

    path = os.path.join(folder, "default", "0.0.0", "0123456789abcdef", f"{name}-test.arrow")
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    fsio.write_bytes(path, sink.getvalue())
    fsio.write_json(os.path.join(os.path.dirname(path), "dataset_info.json"),
                    {"builder_name": name, "splits": {"test": {"num_examples": table.num_rows}}})


def _retrieval(hf_cache: str, name: str, n_items: int, rng, side: int) -> int:
    import pyarrow as pa

    images, captions = [], []
    for i in range(n_items):
        data = _encode(_image(i, rng, side), "jpg")
        if i == 0:  # stored by path: an archive-backed dataset keeps its images unpacked in the cache
            path = os.path.join(hf_cache, "downloads", "extracted", "f00d", name, f"{i}.jpg")
            fsio.write_bytes(path, data)
            images.append({"bytes": None, "path": "/elsewhere/hf_cache/downloads/extracted/f00d/" + f"{name}/{i}.jpg"})
        else:
            images.append({"bytes": data, "path": f"{i}.jpg"})
        captions.append([f"a picture of shape {i}", f"shape number {i} in colour"])
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    _arrow(os.path.join(hf_cache, f"nlphuji___{name}"), name, pa.table(
        {"image": pa.array(images, image_type), "caption": pa.array(captions, pa.list_(pa.string())),
         "img_id": pa.array([str(i) for i in range(n_items)])}))
    return n_items


def _winogavil(hf_cache: str, n_items: int, rng, side: int) -> int:
    import pyarrow as pa

    rows = []
    for i in range(n_items):
        n = (5, 6, 10, 12)[i % 4]
        candidates = [f"thing{i}_{j}" for j in range(n)]
        associations = candidates[: 2 + i % 3]
        rows.append({"cue": ["apple", "river", "Orange", "stone"][i % 4], "candidates": candidates,
                     "associations": associations,
                     "candidate_images": [{"bytes": _encode(_image(j, rng, side), "jpg"), "path": f"{c}.jpg"}
                                          for j, c in enumerate(candidates)],
                     "num_associations": len(associations)})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("cue", pa.string()), ("candidates", pa.list_(pa.string())),
                        ("associations", pa.list_(pa.string())), ("candidate_images", pa.list_(image_type)),
                        ("num_associations", pa.int64())])
    _arrow(os.path.join(hf_cache, "nlphuji___winogavil"), "winogavil", pa.Table.from_pylist(rows, schema))
    return n_items


def write_evalsets(folder: str, tasklist: str = "datacomp", per_class: int = 2, classes_shown: int = 4,
                   scale: float = 0.0, side: int = 24, seed: int = 0, keys: list[str] | None = None) -> dict:
    """Write miniature eval sets for every task of a DataComp-format task list (``keys``: only those); returns
    ``{task key: items written}``."""
    import yaml

    from winnow.pipeline.tasks import tasklists_dir

    path = tasklist if os.path.isfile(tasklist) else str(tasklists_dir() / f"{tasklist}.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    rng = np.random.default_rng(seed)
    written, hf_cache = {}, os.path.join(folder, "hf_cache")
    for key, info in doc.items():
        if keys is not None and key not in keys:
            continue
        n = max(2, round(scale * int(info.get("size") or 0))) if scale > 0 else per_class * classes_shown
        if key == "misc/winogavil":
            written[key] = _winogavil(hf_cache, max(n, 8), rng, side)
        elif key.startswith("retrieval/"):
            written[key] = _retrieval(hf_cache, key.split("/", 1)[1], n, rng, side)
        else:
            name = key.split("/", 1)[1] if key.startswith("fairness/") else key.replace("/", "-")
            target = os.path.join(folder, f"wds_{name}_test")
            if key in ("fairness/fairface", "fairness/utkface"):
                written[key] = _faces(target, key, max(n, 14), 256, rng, side)
            else:
                written[key] = _classification(target, key, info, n, 256, rng, side)
    fsio.write_bytes(os.path.join(folder, "fixtures.json"), json.dumps(written, indent=1).encode())
    return written
