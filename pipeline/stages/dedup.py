"""Deduplication and decontamination: exact, near-duplicate, semantic (SemDeDup), and against eval sets.

``dedup(pool, cfg, runner)`` writes ``<pool>/dedup/<tag>/duplicates.parquet`` plus a manifest: one row per
(sample, kind) that belongs to a duplicate group, with columns ``uid, kind, group, kept, similarity``:

- ``exact_image``: identical image bytes (the pool's ``sha256`` column, computed by img2dataset).
- ``exact_pair``: identical image bytes and identical normalised caption (lower case, collapsed spaces).
- ``near``: image-embedding cosine >= ``near_threshold`` (connected components of the >= threshold graph).
  Search: exact ``IndexFlatIP`` up to ``flat_max`` images; above, IVF with 4-bit PQ fast-scan codes and an fp16
  re-ranking stage (``nlist`` lists, ``nprobe`` probed; recall against exact search is measured by
  ``benchmarks/bench_dedup.py``);
  ``faiss-gpu`` is used when faiss sees a GPU. The index is built once; queries run as one Dask task per shard
  (each loads the index and its own shard's embeddings), so memory per worker is the index plus one shard.
- ``semantic``: SemDeDup: faiss k-means over the embeddings; within each cluster, ``similarity`` is a sample's
  largest cosine to any member ranked before it (by the keep order below). It is a duplicate at ``eps`` when
  ``similarity > 1 - eps``: rows are kept for the largest of ``semantic_eps`` so that any of them (or any
  smaller eps) can be chosen at selection time without recomputing; ``kept`` is for the first eps listed.
- ``contaminated``: the image is a near duplicate (cosine >= ``contamination_threshold``) of an image of an
  evaluation set (``decontaminate``: eval set folders); ``group`` names the eval image, ``kept`` is False.

Keep order, deterministic whatever the worker count: the highest image-text cosine (the CLIP score under
``keep_tag``, by default ``tag``; samples without a caption embedding rank last), then the smallest uid. In each
group the first sample in that order is kept. Selection drops the rest with the rule
``exclude_duplicates: {table: ..., kinds: [...]}`` (see :mod:`pipeline.stages.subset`).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from pipeline.core import fsio
from pipeline.data import manifest, shards
from pipeline.core.errors import UserError
from pipeline.data.pool import require_finished
from pipeline.run.stage import Stage

K_FACTOR = 4  # IVF-PQ candidates re-ranked exactly per neighbour kept
KINDS = ("exact_image", "exact_pair", "near", "semantic", "contaminated")
TABLE = "duplicates.parquet"


@dataclass
class DedupConfig:
    """Args:
        tag: embeddings used (``<pool>/embeddings/<tag>``; DataComp metadata: ``l14``/``b32``).
        keep_tag: embeddings whose image-text cosine orders the keep policy (default: ``tag``; set it when
            ``tag`` is an image-only descriptor such as ``copy``).
        near_threshold: cosine at or above which two images are near duplicates.
        flat_max: exact search up to this many images; IVF-PQ with exact re-ranking above.
        nlist / nprobe: IVF lists (0: about 2 x sqrt(n)) and lists probed per query.
        k: neighbours retrieved per query (groups larger than k are still joined through their members).
        semantic_clusters: k-means clusters for SemDeDup (0: sqrt(n) / 3, which balances the k-means cost against
            the pairwise cost within clusters: 333 clusters of 3,000 at 1M; SemDeDup used 50,000 clusters of
            about 8,800 for LAION-440M).
        semantic_eps: SemDeDup eps values computed in one pass (duplicate when cosine > 1 - eps).
        decontaminate: evaluation set folders (clip_benchmark layout) whose images the pool must not contain.
        contamination_threshold: cosine at or above which a pool image copies an eval image.
        device: "auto" (GPU if faiss and torch see one), "cpu" or "cuda" for the eval-set model.
    """

    tag: str = "l14"
    keep_tag: str = ""
    near_threshold: float = 0.95
    flat_max: int = 200_000
    nlist: int = 0
    nprobe: int = 16
    k: int = 16
    semantic_clusters: int = 0
    semantic_eps: list[float] = field(default_factory=lambda: [0.05, 0.02, 0.01])
    decontaminate: list[str] = field(default_factory=list)
    contamination_threshold: float = 0.9
    device: str = "auto"

    def __post_init__(self) -> None:
        if not -1 <= self.near_threshold <= 1 or not -1 <= self.contamination_threshold <= 1:
            raise UserError("dedup: near_threshold and contamination_threshold are cosines in [-1, 1]")
        if not self.semantic_eps or not all(0 < e < 1 for e in self.semantic_eps):
            raise UserError("dedup.semantic_eps: give one or more values in (0, 1)")
        if self.k < 2 or self.nprobe < 1:
            raise UserError("dedup: k must be >= 2 and nprobe >= 1")


# ------------------------------------------------------------------------------------------------ building blocks
def normalize_caption(text) -> str:
    return re.sub(r"\s+", " ", str(text or "")).strip().lower()


def keep_order(uids: np.ndarray, clip_score: np.ndarray) -> np.ndarray:
    """Rank of every row in the keep order (0 = kept first): highest clip score, then smallest uid."""
    score = np.where(np.isfinite(clip_score), clip_score, -np.inf)
    order = np.lexsort((uids.astype(str), -score))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label (the smallest member index) of each of ``n`` nodes, given (m, 2) edges."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def group_rows(labels: np.ndarray, rows: np.ndarray, rank: np.ndarray, uids: np.ndarray, kind: str,
               similarity: np.ndarray | None = None) -> pd.DataFrame:
    """Table rows for every member of a group of two or more: the best-ranked member is kept and names it."""
    frame = pd.DataFrame({"row": rows, "label": labels})
    sizes = frame.groupby("label")["row"].transform("size")
    frame = frame[sizes > 1].copy()
    if frame.empty:
        return pd.DataFrame(columns=["uid", "kind", "group", "kept", "similarity"])
    frame["rank"] = rank[frame["row"].to_numpy()]
    best = frame.loc[frame.groupby("label")["rank"].idxmin(), ["label", "row"]].set_index("label")["row"]
    keeper = best.reindex(frame["label"]).to_numpy()
    return pd.DataFrame({"uid": uids[frame["row"].to_numpy()], "kind": kind, "group": uids[keeper],
                         "kept": frame["row"].to_numpy() == keeper,
                         "similarity": similarity[frame["row"].to_numpy()] if similarity is not None else 1.0})


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def build_index(x: np.ndarray, cfg: DedupConfig, seed: int = 0):
    """An inner-product faiss index over normalised rows: exact Flat up to ``flat_max`` rows; above, IVF with
    4-bit PQ fast-scan codes (d/8 sub-quantisers) whose candidates (``k_factor`` x k) are re-ranked with fp16
    copies of the vectors, so the cosines compared with the threshold are (nearly) exact."""
    import faiss

    d = x.shape[1]
    if len(x) <= cfg.flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = cfg.nlist or int(2 * np.sqrt(len(x)))
        m = next(m for m in (d // 8, d // 4, d // 2, d) if d % m == 0 and m % 2 == 0) if d % 2 == 0 else d
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fs,Refine(SQfp16)", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(x[np.sort(rng.choice(len(x), min(len(x), nlist * 40), replace=False))])
        _tune(index, cfg)
    index.add(x)
    return index


def _tune(index, cfg: DedupConfig) -> None:
    import faiss

    if hasattr(index, "k_factor"):
        index.k_factor = K_FACTOR
        faiss.extract_index_ivf(index).nprobe = cfg.nprobe


def on_gpu(index):
    """The index moved to every GPU faiss sees (``faiss-gpu`` installed and a GPU present), else unchanged."""
    import faiss

    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def search_edges(index, queries: np.ndarray, offset: int, cfg: DedupConfig) -> np.ndarray:
    """(m, 3) array of (query row, neighbour row, cosine) with cosine >= near_threshold, query row < neighbour."""
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(cfg.k, index.ntotal))
    q = np.repeat(np.arange(offset, offset + len(queries)), sims.shape[1]).reshape(sims.shape)
    hit = (sims >= cfg.near_threshold) & (ids >= 0) & (ids != q)
    a, b = q[hit], ids[hit]
    out = np.stack([np.minimum(a, b), np.maximum(a, b), sims[hit]], axis=1) if hit.any() else np.zeros((0, 3))
    return out


def semantic(x: np.ndarray, rank: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup over normalised rows: (cluster of each row, largest cosine to a better-ranked row of its cluster)."""
    import faiss

    k = max(1, min(len(x), n_clusters))
    if k > 1:
        kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True)  # trains on <= 256 per centroid
        kmeans.train(x)
        _, assign = kmeans.index.search(x, 1)
        assign = assign[:, 0]
    else:
        assign = np.zeros(len(x), np.int64)
    best = np.full(len(x), -1.0, np.float32)
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        members = members[np.argsort(rank[members])]
        if len(members) < 2:
            continue
        block = x[members]
        sims = block @ block.T
        sims[np.tril_indices(len(members))] = -1.0  # only better-ranked (earlier) members count
        best[members] = sims.max(axis=0)
    return assign, best


# ------------------------------------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class QueryTask:
    index_path: str
    embeddings: str  # .npy of this part's normalised query rows
    offset: int
    out: str  # .npy of its edges
    config: dict

    @property
    def marker(self) -> str:
        return self.out.removesuffix(".npy") + "_stats.json"


def query_part(task: QueryTask) -> dict:
    """Search one part's images against the whole index; write its >= threshold edges (a shard-sized task)."""
    import faiss

    cfg = DedupConfig(**task.config)
    index = faiss.read_index(task.index_path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    _tune(index, cfg)
    index = on_gpu(index)
    queries = np.load(task.embeddings, allow_pickle=False)
    edges = search_edges(index, queries, task.offset, cfg)
    with fsio.atomic_open(task.out, "wb") as f:
        np.save(f, edges.astype(np.float64))
    stats = {"edges": int(len(edges))}
    fsio.write_json(task.marker, stats)  # the commit marker, written last
    return stats


def load_pool(pool: str, tag: str, keep_tag: str = "") -> dict:
    """uid, sha256, caption, state, image embeddings (``tag``) and clip score (``keep_tag``) of every row."""
    from pipeline.data.parts import list_parts, load_embeddings, read_part

    from filters.clip import ClipFilter

    scorer = ClipFilter(tag=keep_tag or tag)
    tables, img, clip, bounds = [], [], [], []
    for part in list_parts(pool):
        table = read_part(part, ["uid", "caption", "sha256", scorer.precomputed])
        emb = load_embeddings(pool, part, tuple(dict.fromkeys((tag, scorer.tag))), None)
        if "img" not in emb[tag]:
            raise UserError(f"dedup: embeddings of tag {tag!r} have no images ({tag}_img)")
        if len(emb[tag]["img"]) != len(table):
            raise UserError(f"dedup: {part.stem}: {len(emb[tag]['img'])} embeddings for {len(table)} rows; re-embed")
        bounds.append((part.stem, sum(len(t) for t in tables), len(table)))
        tables.append(table)
        img.append(emb[tag]["img"].astype(np.float16))
        # the clip filter's score (DataComp's precomputed column when there is one); NaN without captions
        has_txt = scorer.precomputed in table.columns or "txt" in emb[scorer.tag]
        clip.append(scorer.score(table, emb).to_numpy() if has_txt else np.full(len(table), np.nan))
    frame = pd.concat(tables, ignore_index=True)
    return {"frame": frame, "img": np.concatenate(img), "clip": np.concatenate(clip), "parts": bounds}


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
    data = load_pool(pool, cfg.tag, cfg.keep_tag)
    frame = data["frame"]
    uids = frame["uid"].astype(str).to_numpy()
    ok = (frame["state"] == "ok").to_numpy(dtype=bool, na_value=False) & _finite_rows(data["img"])
    rank = keep_order(uids, data["clip"])
    rows = np.flatnonzero(ok)
    x = _normalized_rows(data["img"], rows)  # float32, one copy: the only full-size array besides the index
    del data["img"]
    log(f"dedup: {len(rows):,} images of {len(frame):,} rows, tag {cfg.tag}")
    tables = [_exact(frame, rows, rank, uids)]

    # near duplicates: one index, queries sharded per part
    index = build_index(x, cfg)
    index_path = fsio.join(out, "index.faiss")
    _write_index(index, index_path)
    tasks = []
    for stem, start, count in data["parts"]:
        local = np.flatnonzero(ok[start: start + count]) + start  # pool rows of this part
        if not len(local):
            continue
        offset = int(np.searchsorted(rows, local[0]))
        emb_path = fsio.join(out, "queries", f"{stem}.npy")
        with fsio.atomic_open(emb_path, "wb") as f:
            np.save(f, x[offset: offset + len(local)])
        tasks.append(QueryTask(index_path, emb_path, offset, fsio.join(out, "edges", f"{stem}.npy"), asdict(cfg)))
    stage.map(query_part, tasks, label="dedup search", unit="parts")
    edges = np.concatenate([np.load(t.out, allow_pickle=False) for t in tasks] or [np.zeros((0, 3))])
    edges = edges[np.unique(edges[:, :2], axis=0, return_index=True)[1]]  # each pair is found from both ends
    labels = components(len(rows), edges[:, :2].astype(np.int64))
    best_sim = np.zeros(len(rows))
    np.maximum.at(best_sim, edges[:, 0].astype(np.int64), edges[:, 2])
    np.maximum.at(best_sim, edges[:, 1].astype(np.int64), edges[:, 2])
    tables.append(group_rows(labels, rows, rank, uids, "near", _spread(best_sim, rows, len(frame))))
    log(f"dedup: {len(edges):,} near-duplicate pairs (cosine >= {cfg.near_threshold})")

    # semantic (SemDeDup)
    n_clusters = cfg.semantic_clusters or max(1, round(np.sqrt(len(rows)) / 3))
    assign, sim = semantic(x, rank[rows], n_clusters)
    eps_max, eps_kept = max(cfg.semantic_eps), cfg.semantic_eps[0]
    hit = sim > 1 - eps_max
    tables.append(pd.DataFrame({"uid": uids[rows[hit]], "kind": "semantic",
                                "group": [f"cluster-{c}" for c in assign[hit]],
                                "kept": sim[hit] <= 1 - eps_kept, "similarity": sim[hit].astype(float)}))

    if cfg.decontaminate:
        tables.append(_contamination(pool, cfg, x, uids[rows], log))
    table = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) else \
        pd.DataFrame(columns=["uid", "kind", "group", "kept", "similarity"])
    table = table.astype({"uid": str, "kind": str, "group": str, "kept": bool, "similarity": float})
    table = table.sort_values(["kind", "group", "uid"], ignore_index=True)
    shards.write_table(fsio.join(out, TABLE), table)
    counts = {k: int(((table["kind"] == k) & ~table["kept"]).sum()) for k in KINDS}
    for k in cfg.semantic_eps:
        counts[f"semantic@{k:g}"] = int(((table["kind"] == "semantic") & (table["similarity"] > 1 - k)).sum())
    log("dedup: dropped per kind: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return stage.finish(rows={"images": int(len(rows)), "table_rows": int(len(table))}, dropped=counts,
                        index=type(index).__name__)


def _write_index(index, path: str) -> None:
    import faiss

    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def _finite_rows(a: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    return np.concatenate([np.isfinite(a[s: s + chunk]).all(axis=1) for s in range(0, len(a), chunk)] or
                          [np.zeros(0, bool)])


def _normalized_rows(a: np.ndarray, rows: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    out = np.empty((len(rows), a.shape[1]), np.float32)
    for s in range(0, len(rows), chunk):
        out[s: s + chunk] = normalize(a[rows[s: s + chunk]])
    return out


def _spread(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    full = np.zeros(n)
    full[rows] = values
    return full


def _exact(frame: pd.DataFrame, rows: np.ndarray, rank: np.ndarray, uids: np.ndarray) -> pd.DataFrame:
    if "sha256" not in frame.columns:
        return pd.DataFrame()
    sha = frame["sha256"].astype(str).to_numpy()[rows]
    caption = np.array([normalize_caption(c) for c in frame["caption"].to_numpy()[rows]], dtype=object)
    by_image = pd.factorize(sha)[0]
    by_pair = pd.factorize(pd.Series(sha) + "\n" + pd.Series(caption))[0]
    return pd.concat([group_rows(by_image, rows, rank, uids, "exact_image"),
                      group_rows(by_pair, rows, rank, uids, "exact_pair")], ignore_index=True)


def _contamination(pool: str, cfg: DedupConfig, x: np.ndarray, uids: np.ndarray, log) -> pd.DataFrame:
    """Pool images whose nearest eval image (same model as the pool's embeddings) is within the threshold."""
    import faiss

    from pipeline.data.evalsets import read_evalset
    from pipeline.data.images import input_side
    from pipeline.models.encode import cached_model, embed_images
    from pipeline.models.registry import default_device

    params = (manifest.read_manifest(fsio.join(pool, "embeddings", cfg.tag)) or {}).get("params", {})
    if "model" not in params:
        raise UserError(f"dedup.decontaminate needs the model of tag {cfg.tag!r}: embed the pool with "
                        "`winnow embed` (its manifest names the model) first")
    device = default_device() if cfg.device == "auto" else cfg.device
    model, preprocess, _ = cached_model(params["model"], params.get("pretrained", ""), device)
    frames = []
    for folder in cfg.decontaminate:  # the eval images through the same decoding as the pool's (pipeline.stages.embed)
        data = read_evalset(folder)
        emb = embed_images(model, preprocess, data["images"], device, draft_side=2 * input_side(model))
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        sims, ids = index.search(x, 1)
        hit = sims[:, 0] >= cfg.contamination_threshold
        name = os.path.basename(os.path.normpath(folder))
        frames.append(pd.DataFrame({"uid": uids[hit], "kind": "contaminated",
                                    "group": [f"{name}/{i}" for i in ids[hit, 0]], "kept": False,
                                    "similarity": sims[hit, 0].astype(float)}))
        log(f"dedup: {int(hit.sum()):,} pool images copy an image of {folder} (cosine >= "
            f"{cfg.contamination_threshold})")
    return pd.concat(frames, ignore_index=True)


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
