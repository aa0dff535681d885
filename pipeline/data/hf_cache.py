"""Reading a Hugging Face ``datasets`` cache without the ``datasets`` library.

DataComp evaluates Flickr, MSCOCO and WinoGAViL from ``nlphuji/<name>`` loaded with
``datasets.load_dataset(..., split="test", cache_dir=DATA_DIR/hf_cache)``: its ``download_evalsets.py`` leaves
them as Arrow files under ``hf_cache/nlphuji___<name>/<config>/<version>/<hash>/<name>-test*.arrow`` (Arrow IPC
streams, the test split possibly in several files). An image column is a struct of ``bytes`` and ``path``: the
bytes, or a path into ``hf_cache/downloads/extracted/`` where the dataset's archive was unpacked (an absolute
path of the machine that downloaded it, found again under the cache when the folder moved).
"""

from __future__ import annotations

import pyarrow as pa

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError


def dataset_dir(hf_cache: str, repo: str) -> str:
    """The cache folder of ``repo`` (``nlphuji/winogavil`` -> ``hf_cache/nlphuji___winogavil``)."""
    return fsio.join(hf_cache, repo.replace("/", "___"))


def read_split(folder: str, split: str = "test") -> pa.Table:
    """Every row of ``split`` in the cached dataset ``folder`` (all its Arrow files of that split, in name order)."""
    files = [f for f in fsio.glob(fsio.join(folder, "**", "*.arrow")) if f"-{split}" in f.rsplit("/", 1)[-1]]
    if not files:
        raise UserError(f"{folder} holds no cached {split} split (*-{split}*.arrow); fetch it with DataComp's "
                        "`python download_evalsets.py DATA_DIR` (it fills DATA_DIR/hf_cache)")
    tables = []
    for path in sorted(files):
        with fsio.open_read(path) as f:
            data = f.read()
        try:
            tables.append(pa.ipc.open_stream(data).read_all())
        except pa.ArrowInvalid:
            tables.append(pa.ipc.open_file(data).read_all())
    return pa.concat_tables(tables)


def image_bytes(cell: dict | None, hf_cache: str) -> bytes:
    """The encoded image of one image cell (its bytes, or the file its path names, looked up again under the
    cache when the absolute path is from another machine)."""
    if not cell:
        raise UserError("an image cell is empty")
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path") or ""
    if fsio.exists(path):
        return fsio.read_bytes(path)
    parts = path.replace("\\", "/").split("/")
    if "extracted" in parts:
        local = fsio.join(hf_cache, "downloads", "extracted", *parts[parts.index("extracted") + 1:])
        if fsio.exists(local):
            return fsio.read_bytes(local)
    raise UserError(f"image {path[-80:]!r} of the cached dataset is neither stored in it nor found under {hf_cache}")
