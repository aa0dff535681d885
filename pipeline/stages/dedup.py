"""Deduplication and decontamination: exact, near-duplicate, semantic (SemDeDup), and against eval sets.

``dedup(pool, cfg, runner)`` writes ``<pool>/dedup/<tag>/duplicates.parquet`` plus a manifest: one row per
(sample, kind) that belongs to a duplicate group, with columns ``uid, kind, group, kept, similarity``:

- ``exact_image``: identical image bytes (the pool's ``sha256`` column, computed by img2dataset).
- ``exact_pair``: identical image bytes and identical normalised caption (lower case, collapsed spaces).
- ``near``: image-embedding cosine >= ``near_threshold`` (connected components of the >= threshold graph; each
  image's ``k`` most similar count). Search: exact over all images up to ``flat_max`` of them (one task holding
  them); above, within clusters: each image is compared, exactly, with the images of its nearest cluster and of
  up to ``nprobe`` - 1 more clusters whose centroid is within ``probe_margin`` of the nearest one's (recall
  against exact search is measured by ``benchmarks/bench_dedup.py``).
- ``semantic``: SemDeDup: spherical k-means trained on a sample; within each cluster, ``similarity`` is a sample's
  largest cosine to any member ranked before it (by the keep order below). It is a duplicate at ``eps`` when
  ``similarity > 1 - eps``: rows are kept for the largest of ``semantic_eps`` so that any of them (or any
  smaller eps) can be chosen at selection time without recomputing; ``kept`` is for the first eps listed.
- ``contaminated``: the image is a near duplicate (cosine >= ``contamination_threshold``) of an image of an
  evaluation set (``decontaminate``: eval set folders); ``group`` names the eval image, ``kept`` is False.

Memory is bounded per process, whatever the pool's size: every pass is a task of one part (its rows and
embeddings) or of one bucket of clusters or of exact-duplicate hashes, sized from ``worker_memory_gib``; the
driver holds the training sample (also sized from it) and, at the end, the duplicates themselves. The steps
are in :mod:`winnow.pipeline.stages.dedup_tasks`. Any fsspec URL works for the pool and the output.

Keep order, deterministic whatever the worker count: the highest image-text cosine (the CLIP score under
``keep_tag``, by default ``tag``; samples without a caption embedding rank last), then the smallest uid. In each
group the first sample in that order is kept. Selection drops the rest with the rule
``exclude_duplicates: {table: ..., kinds: [...]}`` (see :mod:`winnow.pipeline.stages.subset`).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.config import path
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data import manifest, shards
from winnow.pipeline.data.parts import embedding_path, list_parts, part_rows
from winnow.pipeline.data.pool import require_finished
from winnow.pipeline.run.stage import Stage
from winnow.pipeline.stages.dedup_tasks import (
    TABLE_COLUMNS,
    AssignTask,
    BucketTask,
    ExactTask,
    FlatTask,
    ScanTask,
    assign_part,
    cluster_bucket,
    components,
    exact_bucket,
    group_rows,
    keep_order,
    load_npz_arrays,
    near_flat,
    normalize,
    read_frame,
    save_npz,
    scan_part,
    train_clusters,
)

KINDS = ("exact_image", "exact_pair", "near", "semantic", "contaminated")
CONTAMINATION_WARN = 0.05  # a larger share of the pool flagged as eval copies says the descriptor cannot tell
TABLE = "duplicates.parquet"
WORK = "_work"  # the tasks' intermediate files, removed when the table is written
CLUSTER_ROWS = 1_000  # default clusters: sqrt(n) / 3, or more so that a cluster holds about this many rows
EXACT_ROW_BYTES = 400  # an exact-duplicate record in memory (uid, score, two hashes, pandas' grouping)
SAMPLE_BYTES_PER_DIM = 8  # a training-sample row per dimension: float32, and room for k-means' own copies
SAMPLE_PER_CLUSTER = 40  # k-means wants at least 39 sample rows per centroid
BUCKET_ROW_BYTES_PER_DIM = 12  # a bucket row per dimension: float16 copy, float32 normalised, search buffers


@dataclass
class DedupConfig:
    """Args:
        tag: embeddings used (``<pool>/embeddings/<tag>``; DataComp metadata: ``l14``/``b32``).
        keep_tag: embeddings whose image-text cosine orders the keep policy (default: ``tag``; set it when
            ``tag`` is an image-only descriptor such as ``copy``).
        near_threshold: cosine at or above which two images are near duplicates.
        flat_max: exact search over all images up to this many of them (one task holds them: 200,000 x 512-d
            is 0.4 GB); above, search within clusters.
        nprobe: clusters an image is compared within, at most (above ``flat_max``).
        probe_margin: a cluster beyond the nearest is searched when its centroid's cosine to the image is within
            this margin of the nearest centroid's (two copies at cosine 0.95 differ by about 0.014 per centroid
            cosine at 512-d, so 0.05 misses few; a larger margin copies more rows).
        k: neighbours retrieved per query (groups larger than k are still joined through their members).
        semantic_clusters: k-means clusters for SemDeDup and the search (0: sqrt(n) / 3, or n / 1,000 when that
            is more, which bounds the pairwise work within clusters: 24 clusters at 5,000 images, 1,000 at 1M,
            12,800 at 12.8M; SemDeDup used 50,000 clusters of about 8,800 for LAION-440M), and at most one per 40
            rows of the training sample (13,107 at 512-d with 2 GiB). Above 256 clusters, two levels: sqrt(k)
            coarse clusters, each split by its share of the sample.
        worker_memory_gib: memory each task may use; sizes the buckets and the training sample (see the
            README's dedup figures).
        semantic_eps: SemDeDup eps values computed in one pass (duplicate when cosine > 1 - eps).
        decontaminate: evaluation set folders (clip_benchmark layout) whose images the pool must not contain.
        contamination_threshold: cosine at or above which a pool image copies an eval image.
        device: "auto" (GPU if faiss and torch see one), "cpu" or "cuda" for the eval-set model.
    """

    tag: str = "l14"
    keep_tag: str = ""
    near_threshold: float = 0.95
    flat_max: int = 200_000
    nprobe: int = 3
    probe_margin: float = 0.05
    k: int = 16
    semantic_clusters: int = 0
    semantic_eps: list[float] = field(default_factory=lambda: [0.05, 0.02, 0.01])
    decontaminate: list[str] = path([])
    contamination_threshold: float = 0.9
    device: str = "auto"
    worker_memory_gib: float = 2.0

    def __post_init__(self) -> None:
        if not -1 <= self.near_threshold <= 1 or not -1 <= self.contamination_threshold <= 1:
            raise UserError("dedup: near_threshold and contamination_threshold are cosines in [-1, 1]")
        if not self.semantic_eps or not all(0 < e < 1 for e in self.semantic_eps):
            raise UserError("dedup.semantic_eps: give one or more values in (0, 1)")
        if self.k < 2 or self.nprobe < 1:
            raise UserError("dedup: k must be >= 2 and nprobe >= 1")
        if self.worker_memory_gib <= 0 or self.probe_margin < 0:
            raise UserError("dedup: worker_memory_gib must be > 0 and probe_margin >= 0")


def default_out(pool: str, tag: str) -> str:
    return fsio.join(pool, "dedup", tag)


def dedup(pool: str, cfg: DedupConfig, runner, out: str | None = None, overwrite: bool = False,
          allow_partial: bool = False, log=print) -> dict:
    """Find every kind of duplicate in ``pool`` and write the table; returns the manifest."""
    require_finished(pool, allow_partial, "dedup", log)
    out = out or default_out(pool, cfg.tag)
    inputs = [fsio.join(pool, manifest.MANIFEST)] + [fsio.join(pool, "embeddings", t, manifest.MANIFEST)
                                                     for t in dict.fromkeys((cfg.tag, cfg.keep_tag or cfg.tag))]
    stage = Stage("dedup", out, asdict(cfg), inputs=[p for p in inputs if fsio.exists(p)], runner=runner,
                  overwrite=overwrite, protect=[pool, *cfg.decontaminate], log=log)
    if stage.done:
        return stage.manifest
    work = fsio.join(out, WORK)
    parts = list_parts(pool)
    sizes = [part_rows(p) for p in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    budget = int(cfg.worker_memory_gib * 2**30)
    exact_buckets = max(1, -(-sum(sizes) * EXACT_ROW_BYTES // budget))
    dim = embedding_dim(pool, parts[0], cfg.tag) if parts else 1
    sample_rows = max(1, budget // (SAMPLE_BYTES_PER_DIM * dim))
    evalsets = _embed_evalsets(pool, cfg, work, log) if cfg.decontaminate else ()
    rate = min(1.0, sample_rows / max(1, sum(sizes)))  # each row's chance to be in the training sample
    scans = stage.map(scan_part, [ScanTask(pool, p, o, work, cfg.tag, cfg.keep_tag, rate, exact_buckets, evalsets,
                                           cfg.contamination_threshold) for p, o in zip(parts, offsets)],
                      label="dedup scan", unit="parts")
    n_ok, n_sampled = sum(s["ok"] for s in scans), sum(s["sampled"] for s in scans)
    log(f"dedup: {n_ok:,} images of {sum(sizes):,} rows, tag {cfg.tag}")
    n_clusters = cfg.semantic_clusters or max(1, round(np.sqrt(n_ok) / 3), -(-n_ok // CLUSTER_ROWS))
    if n_ok > sample_rows:  # the sample bounds the clusters it can train
        n_clusters = max(1, min(n_clusters, sample_rows // SAMPLE_PER_CLUSTER))
    clusters_path = fsio.join(work, "clusters.npz")
    if not fsio.exists(clusters_path):
        sample, at = np.empty((n_sampled, dim), np.float32), 0
        for p in parts:  # normalised part by part into one array: the driver's largest allocation
            rows = load_npz_arrays(fsio.join(work, "scan", f"{p.stem}.npz"), names=("sample",))["sample"]
            sample[at: at + len(rows)] = normalize(rows)
            at += len(rows)
        clusters = train_clusters(sample, n_clusters) if len(sample) else \
            {"leaves": np.zeros((1, dim), np.float32), "top": np.zeros((0, dim), np.float32), "leaf_top": np.zeros(1)}
        save_npz(clusters_path, **clusters)
        del sample
    n_leaves = len(load_npz_arrays(clusters_path)["leaves"])
    flat = n_ok <= cfg.flat_max
    copies = 1 if flat else 1 + 0.5 * (cfg.nprobe - 1)  # expected copies per row, for sizing buckets
    leaves_per_bucket = max(1, int(budget // BUCKET_ROW_BYTES_PER_DIM // dim / max(1.0, n_ok * copies / n_leaves)))
    stage.map(assign_part, [AssignTask(pool, p, o, work, cfg.tag, leaves_per_bucket, 1 if flat else cfg.nprobe,
                                       cfg.probe_margin) for p, o in zip(parts, offsets)],
              label="dedup assign", unit="parts")
    stems = tuple(p.stem for p in parts)
    buckets = [BucketTask(work, b, stems, not flat, cfg.k, cfg.near_threshold, max(cfg.semantic_eps))
               for b in range(-(-n_leaves // leaves_per_bucket))]
    if flat:
        stage.map(near_flat, [FlatTask(pool, tuple(zip(parts, offsets)), work, cfg.tag, cfg.k, cfg.near_threshold)],
                  label="dedup near (exact search)")
    stage.map(cluster_bucket, buckets, label="dedup clusters", unit="buckets")
    stage.map(exact_bucket, [ExactTask(work, b, stems) for b in range(exact_buckets)], label="dedup exact",
              unit="buckets")
    names = [f"b{t.bucket}" for t in buckets]
    contaminated = [p for p, s in zip(parts, scans) if s["contaminated"]]
    table = _table(work, contaminated, ["flat"] if flat else names, names, exact_buckets, cfg, log)
    shards.write_table(fsio.join(out, TABLE), table)
    fsio.remove(work)
    counts = {k: int(((table["kind"] == k) & ~table["kept"]).sum()) for k in KINDS}
    for k in cfg.semantic_eps:
        counts[f"semantic@{k:g}"] = int(((table["kind"] == "semantic") & (table["similarity"] > 1 - k)).sum())
    log("dedup: dropped per kind: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if counts["contaminated"] > CONTAMINATION_WARN * max(n_ok, 1):
        log(f"warning: {counts['contaminated']:,} of {n_ok:,} pool images ({counts['contaminated'] / n_ok:.0%}) "
            f"match an eval image at cosine >= {cfg.contamination_threshold:g}; copies of eval images are normally "
            f"rare, so the {cfg.tag!r} embedding probably cannot tell a copy from a look-alike: compare with a "
            "copy-detection descriptor (`winnow copy-descriptor POOL --out DIR`, then embed it) or raise "
            "--contamination-threshold")
    return stage.finish(rows={"images": int(n_ok), "table_rows": len(table)}, dropped=counts,
                        search="exact" if flat else f"{n_leaves} clusters, nprobe {cfg.nprobe}",
                        clusters=int(n_leaves), sample=int(n_sampled))


def embedding_dim(pool: str, part, tag: str) -> int:
    """The width of ``tag``'s image embeddings, from the first part's ``.npz`` header (no array is read)."""


    with fsio.open_read(embedding_path(pool, part, tag, None)) as f, zipfile.ZipFile(f) as z:
        name = f"{tag}_img.npy"
        if name not in z.namelist():
            raise UserError(f"dedup: embeddings of tag {tag!r} have no images ({tag}_img)")
        with z.open(name) as member:
            major, _ = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read(member)[0]
    return int(shape[1]) if len(shape) == 2 else 1


def _table(work: str, contaminated, near_outputs: list[str], buckets: list[str], exact_buckets: int,
           cfg: DedupConfig, log) -> pd.DataFrame:
    """The duplicates table from the tasks' outputs (its size is the number of duplicates, not of the pool);
    ``contaminated``: the parts whose scan found eval-set copies."""
    groups = fsio.join(work, "groups")
    tables = [read_frame(fsio.join(work, "exact", f"e{b}.parquet")) for b in range(exact_buckets)]
    edges = np.concatenate([load_npz_arrays(fsio.join(groups, f"{n}_edges.npz"))["edges"] for n in near_outputs])
    edges = edges[np.unique(edges[:, :2], axis=0, return_index=True)[1]]  # each pair may be found from both ends
    members = pd.concat([read_frame(fsio.join(groups, f"{n}_members.parquet")) for n in near_outputs])
    members = members.drop_duplicates("row").sort_values("row", ignore_index=True)
    if len(edges):
        rows = members["row"].to_numpy(np.int64)
        ends = np.searchsorted(rows, edges[:, :2].astype(np.int64))
        best = np.zeros(len(rows))
        np.maximum.at(best, ends[:, 0], edges[:, 2])
        np.maximum.at(best, ends[:, 1], edges[:, 2])
        uid = members["uid"].astype(str).to_numpy()
        tables.append(group_rows(components(len(rows), ends), np.arange(len(rows)),
                                 keep_order(uid, members["score"].to_numpy(float)), uid, "near", best))
    log(f"dedup: {len(edges):,} near-duplicate pairs (cosine >= {cfg.near_threshold})")
    semantic = pd.concat([read_frame(fsio.join(groups, f"{b}_semantic.parquet")) for b in buckets])
    tables.append(pd.DataFrame({"uid": semantic["uid"], "kind": "semantic", "group": semantic["group"],
                                "kept": semantic["similarity"] <= 1 - cfg.semantic_eps[0],
                                "similarity": semantic["similarity"]}))
    tables += [read_frame(fsio.join(work, "contaminated", f"{p.stem}.parquet")) for p in contaminated]
    tables = [t for t in tables if len(t)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TABLE_COLUMNS)
    table = table.astype({"uid": str, "kind": str, "group": str, "kept": bool, "similarity": float})
    return table.sort_values(["kind", "group", "uid"], ignore_index=True)


def _embed_evalsets(pool: str, cfg: DedupConfig, work: str, log) -> tuple:
    """Each eval set's images embedded by the model of the pool's tag, through the pool's decoding path
    (:mod:`winnow.pipeline.stages.embed`); ``(name, .npy path)`` pairs for the scan tasks."""
    from winnow.pipeline.data.evalsets import read_evalset
    from winnow.pipeline.data.images import input_side
    from winnow.pipeline.models.encode import cached_model, embed_images
    from winnow.pipeline.models.registry import default_device

    params = (manifest.read_manifest(fsio.join(pool, "embeddings", cfg.tag)) or {}).get("params", {})
    if "model" not in params:
        raise UserError(f"dedup.decontaminate needs the model of tag {cfg.tag!r}: embed the pool with "
                        "`winnow embed` (its manifest names the model) first")
    device = default_device() if cfg.device == "auto" else cfg.device
    model, preprocess, _ = cached_model(params["model"], params.get("pretrained", ""), device)
    out = []
    for i, folder in enumerate(cfg.decontaminate):
        name = os.path.basename(os.path.normpath(folder))
        path = fsio.join(work, "eval", f"{i}.npy")
        if not fsio.exists(path):
            data = read_evalset(folder)
            emb = embed_images(model, preprocess, data["images"], device, draft_side=2 * input_side(model))
            with fsio.atomic_open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(emb, dtype=np.float32))
            log(f"dedup: embedded {len(emb):,} images of {folder} to find their copies")
        out.append((name, path))
    return tuple(out)


def read_table(path: str) -> pd.DataFrame:
    if not fsio.exists(path):
        raise UserError(f"no dedup table at {path}; run `winnow dedup POOL --tag TAG` first")
    return pd.read_parquet(path)


def dropped_uids(table: pd.DataFrame, kinds: list[str], eps: float | None = None) -> set[str]:
    """uids that a rule excluding ``kinds`` drops (semantic: at ``eps``, default the table's first eps)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise UserError(f"exclude_duplicates: unknown kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
    drop = table["kind"].isin([k for k in kinds if k != "semantic"]) & ~table["kept"]
    if "semantic" in kinds:
        sem = table["kind"] == "semantic"
        drop |= sem & ((table["similarity"] > 1 - eps) if eps is not None else ~table["kept"])
    return set(table.loc[drop, "uid"])
