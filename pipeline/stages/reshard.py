"""Resharding: materialise a subset (``uids.npy``) into new WebDataset shards by copying tar members' bytes.

Like DataComp's resharder, and readable by its ``train.py`` and by ``open_clip_train --dataset-type webdataset``:

- output ``{j:08d}.tar`` of ``shard_size`` samples (the last one partial), each with ``{j:08d}_stats.json``
  (``successes``), plus ``sizes.json`` (``{"00000000.tar": n, ...}``, read by open_clip for the epoch length),
  ``meta.json`` (``output_shard_count``, ``output_shard_format``) and ``sample_ids.npy`` (the subset);
- a uid listed k times is written k times, with keys ``<uid>-0`` ... ``<uid>-(k-1)``; a uid held by several
  pool rows is taken from the first of them (pool order: input shard, then key), so no key is ever written twice;
- members (jpg, txt, json) are copied byte for byte, never decoded or re-encoded; except, with ``blur_faces``,
  the image of a sample with face boxes (normalised ``[x0, y0, x1, y1]``, DataComp's ``face_bboxes``: the pool's
  own column, or the ``face_bboxes`` that ``winnow embed --detect faces`` recorded), which is blurred by
  img2dataset's ``BoundingBoxBlurrer`` (what DataComp's download blurred with) and re-encoded as JPEG quality 95.

Unlike it, the output is deterministic: the plan (which sample goes to which output shard, in pool order: input
shard, then key, never the parquet's row order, which follows the order downloads finished in) is fixed before any
copying, so the same subset of the same pool gives the same bytes whatever the number of workers, and a killed
run resumes by redoing only the output shards without a ``_stats.json``. Planning reads only the parquet uid
columns; copying seeks to the selected members of each input tar instead of reading it whole.
"""

from __future__ import annotations

import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import path
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import shards
from winnow.pipeline.data.pool import require_finished
from winnow.pipeline.data.uid import UID_DTYPE, sort_uids, uids_to_array
from winnow.pipeline.run.stage import Stage


@dataclass
class ReshardConfig:
    """``shard_size``: samples per output shard (DataComp's resharder: 10,000). ``blur_faces``: blur the face
    boxes of each sample; ``faces``: the folder of ``winnow embed --detect faces`` whose boxes are used (empty: the
    pool's ``face_bboxes`` column, else the one embeddings folder of the pool that has them)."""

    shard_size: int = 10_000
    blur_faces: bool = False
    faces: str = path("")

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise UserError("reshard.shard_size must be >= 1")


@dataclass(frozen=True)
class PlanTask:
    pool: str
    shard_id: int
    digits: int
    subset: str
    faces: str = ""  # "pool": the pool's face_bboxes column; a folder: its <shard>.parquet face_bboxes; "": none


def load_subset(path: str) -> np.ndarray:
    if not fsio.exists(path):
        raise UserError(f"subset file not found: {path} (write one with `winnow subset`)")
    arr = fsio.load_npy(path, f"subset {path}")
    if arr.dtype != UID_DTYPE:
        raise UserError(f"{path}: subset arrays must have dtype {UID_DTYPE} (DataComp's format), got {arr.dtype}")
    return arr


def plan_shard(task: PlanTask) -> pd.DataFrame:
    """Rows of one input shard that the subset selects: key, uid, count (times listed in the subset)."""
    subset = sort_uids(load_subset(task.subset))  # DataComp silently drops matches of unsorted subsets
    columns = ["uid", "key", "status", *(["face_bboxes"] if task.faces == "pool" else [])]
    table = shards.read_table(task.pool, task.shard_id, columns=columns, digits=task.digits)
    if task.faces and task.faces != "pool":
        with fsio.open_read(fsio.join(task.faces, f"{shards.shard_name(task.shard_id, task.digits)}.parquet")) as f:
            boxes = pd.read_parquet(f, columns=["key", "face_bboxes"])
        table = table.merge(boxes, on="key", how="left")
    ok = table[(table["status"] == "success").to_numpy()]
    if ok.empty or not len(subset):
        return pd.DataFrame({"shard": [], "key": [], "uid": [], "count": [], "boxes": []})
    query = uids_to_array(ok["uid"], sort=False)
    counts = np.searchsorted(subset, query, side="right") - np.searchsorted(subset, query, side="left")
    keep = counts > 0
    boxes = [_boxes(b) for b in ok["face_bboxes"].to_numpy()[keep]] if "face_bboxes" in ok else [()] * keep.sum()
    plan = pd.DataFrame({"shard": task.shard_id, "key": ok["key"].astype(str).to_numpy()[keep],
                         "uid": ok["uid"].to_numpy()[keep], "count": counts[keep], "boxes": boxes})
    return plan.sort_values("key", kind="stable", ignore_index=True)  # key order, not download order


def _boxes(value) -> tuple:
    """Face boxes as a tuple of 4-tuples of floats (whatever list/array form the parquet gave)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    return tuple(tuple(float(v) for v in box) for box in value if len(box) == 4)


@dataclass(frozen=True)
class CopyTask:
    pool: str
    digits: int
    out: str
    out_id: int
    sources: tuple  # ((input shard id, ((key, (new_key, ...)), ...)), ...)
    blur: tuple = ()  # ((input shard id, key, ((x0, y0, x1, y1), ...)), ...): the samples whose faces are blurred

    @property
    def marker(self) -> str:
        return fsio.join(self.out, f"{self.out_id:08d}_stats.json")


def copy_shard(task: CopyTask) -> int:
    """Write output shard ``out_id`` from the planned members of its input shards."""
    written, keys, blurred, faces = 0, set(), 0, 0
    start = time.time()
    blur = {(shard_id, key): boxes for shard_id, key, boxes in task.blur}
    with shards.TarWriter(fsio.join(task.out, f"{task.out_id:08d}.tar")) as out:
        for shard_id, wanted in task.sources:
            new_keys = dict(wanted)
            path = shards.paths(task.pool, shard_id, task.digits)["tar"]
            for key, members in _members(path, new_keys):
                boxes = blur.get((shard_id, key))
                if boxes:
                    members = [(ext, info, _blurred(data, boxes) if ext in IMAGE_EXTS else data)
                               for ext, info, data in members]
                for new_key in new_keys[key]:
                    if new_key in keys:  # a key repeated inside an input tar: copied once
                        continue
                    keys.add(new_key)
                    for ext, info, data in members:
                        out.add(f"{new_key}.{ext}", data, mtime=info.mtime, mode=info.mode)
                    written += 1
                    blurred += bool(boxes)
                    faces += len(boxes or ())
    return {"successes": written, "count": written, "blurred_samples": blurred, "blurred_faces": faces,
            "duration": time.time() - start}


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _blurred(data: bytes, boxes: tuple) -> bytes:
    """The image with its boxes blurred by img2dataset's blurrer, as JPEG quality 95 (DataComp's download)."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return data
    ok, encoded = cv2.imencode(".jpg", _blurrer()(img, [list(b) for b in boxes]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return encoded.tobytes() if ok else data


def _blurrer():
    """img2dataset's ``BoundingBoxBlurrer``, loaded from its file (its package ``__init__`` imports torch)."""
    import importlib.util

    global _BLURRER
    if _BLURRER is None:
        where = importlib.util.find_spec("img2dataset").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location("winnow_img2dataset_blurrer", f"{where}/blurrer.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _BLURRER = module.BoundingBoxBlurrer()
    return _BLURRER


_BLURRER = None


def _members(tar_path: str, wanted: dict):
    """Yield ``(key, [(ext, info, bytes), ...])`` for the wanted keys in tar order, seeking past the rest.

    A sample's members are adjacent in a WebDataset tar, so each group is yielded as soon as the key changes.
    """
    fs, p = fsio.get_fs(tar_path)
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        key, group = None, []
        for info in tar:  # headers only; the data of unwanted members is skipped by seeking
            if not info.isfile():
                continue
            name_key, _, ext = info.name.rpartition("/")[2].partition(".")
            if name_key != key:
                if group:
                    yield key, group
                key, group = name_key, []
            if name_key in wanted:
                group.append((ext, info, tar.extractfile(info).read()))
        if group:
            yield key, group


def reshard(pool: str, subset_path: str, out: str, runner, shard_size: int = ReshardConfig.shard_size,
            overwrite: bool = False, allow_partial: bool = False, blur_faces: bool = False, faces: str = "",
            log=print) -> dict:
    """Materialise ``subset_path`` from ``pool`` into ``out``; return the manifest."""
    shard_size = ReshardConfig(shard_size).shard_size
    require_finished(pool, allow_partial, "reshard", log)
    ids = shards.list_shards(pool)
    if not ids:
        raise UserError(f"{pool} holds no shards to reshard from")
    subset = load_subset(subset_path)
    digits = shards.name_digits(pool)
    face_source = _face_source(pool, ids[0], digits, faces) if blur_faces else ""
    params = {"shard_size": shard_size, "pool": str(pool), **({"blur_faces": face_source} if blur_faces else {})}
    stage = Stage("reshard", out, params, inputs=[subset_path], runner=runner,
                  overwrite=overwrite, protect=[pool, subset_path], enclosing=[pool], log=log, redo=True)
    if stage.done:
        return stage.manifest
    plans = runner.map(plan_shard, [PlanTask(pool, i, digits, subset_path, face_source) for i in ids],
                       label="reshard plan")
    plan = pd.concat(plans, ignore_index=True) if plans else pd.DataFrame(columns=["shard", "key", "uid", "count"])
    repeated = int(plan["uid"].duplicated().sum())
    if repeated:  # pool rows sharing a uid: the first in pool order is the sample, as ingest's duplicate_uid
        log(f"reshard: {repeated:,} pool rows repeat the uid of an earlier row; the first of each is used")
        plan = plan.drop_duplicates("uid", keep="first").reset_index(drop=True)
    total = int(plan["count"].sum()) if len(plan) else 0
    missing = len(np.unique(subset)) - plan["uid"].nunique() if len(plan) else len(np.unique(subset))
    if total == 0:
        raise UserError(f"no sample of {subset_path} is in {pool}; check that the subset was made from this pool")
    tasks = _copy_tasks(plan, pool, digits, out, shard_size)
    log(f"reshard: {total:,} samples ({len(plan):,} unique, {missing:,} subset uids not in the pool) "
        f"into {len(tasks)} shards of {shard_size:,} -> {out}")
    stats = stage.map(copy_shard, tasks, label="reshard copy", unit="output shards")
    sizes = {f"{t.out_id:08d}.tar": s["successes"] for t, s in zip(tasks, stats)}
    fsio.write_json(fsio.join(out, "sizes.json"), sizes)
    fsio.write_json(fsio.join(out, "meta.json"), {"output_shard_count": len(tasks), "output_count": total,
                                                   "output_shard_format": "{:08d}.tar", "input_dir": str(pool),
                                                   "subset_file": str(subset_path), "missing_uids": int(missing)})
    with fsio.atomic_open(fsio.join(out, "sample_ids.npy"), "wb") as f:
        np.save(f, subset)
    blurred = {k: sum(s.get(k, 0) for s in stats) for k in ("blurred_samples", "blurred_faces")} if blur_faces else {}
    return stage.finish(rows={"samples": total, "unique": len(plan), "missing_uids": int(missing),
                            "repeated_pool_uids": repeated, **blurred},
                      shards=len(tasks))


def _face_source(pool: str, first_shard: int, digits: int, faces: str) -> str:
    """Where the face boxes come from: ``faces`` (a folder of embed ledgers), the pool's own ``face_bboxes``
    column ("pool"), or the one embeddings folder of the pool whose ledgers have them."""
    name = shards.shard_name(first_shard, digits)
    if faces:
        if not fsio.exists(fsio.join(faces, f"{name}.parquet")):
            raise UserError(f"reshard --faces {faces}: no {name}.parquet there; point it at the folder of "
                            "`winnow embed POOL --detect faces`")
        return faces
    if "face_bboxes" in shards.read_table(pool, first_shard, digits=digits).columns:
        return "pool"
    base = fsio.join(pool, "embeddings")
    for tag in sorted(fsio.listdir(base)) if fsio.exists(base) else []:
        path = fsio.join(base, tag, f"{name}.parquet")
        if fsio.exists(path):
            with fsio.open_read(path) as f:
                if "face_bboxes" in pq.read_schema(f).names:
                    return fsio.join(base, tag)
    raise UserError(f"reshard --blur-faces: {pool} has no face boxes; run `winnow embed {pool} --detect faces` "
                    "first, or pass --faces FOLDER")


def _copy_tasks(plan: pd.DataFrame, pool: str, digits: int, out: str, shard_size: int) -> list[CopyTask]:
    """Cut the expanded plan (pool order, repeats adjacent) into output shards of ``shard_size`` samples."""
    tasks, current, filled, blur = [], defaultdict(lambda: defaultdict(list)), 0, []
    if "boxes" not in plan:
        plan = plan.assign(boxes=[()] * len(plan))

    def close():
        nonlocal current, filled, blur
        sources = tuple((sid, tuple((k, tuple(v)) for k, v in keys.items())) for sid, keys in current.items())
        tasks.append(CopyTask(pool, digits, out, len(tasks), sources, tuple(blur)))
        current, filled, blur = defaultdict(lambda: defaultdict(list)), 0, []

    for shard_id, key, uid, count, boxes in plan[["shard", "key", "uid", "count", "boxes"]].itertuples(index=False):
        for j in range(int(count)):
            if boxes and (not blur or blur[-1][:2] != (int(shard_id), key)):
                blur.append((int(shard_id), key, boxes))
            current[int(shard_id)][key].append(f"{uid}-{j}")
            filled += 1
            if filled == shard_size:
                close()
    if filled:
        close()
    return tasks

