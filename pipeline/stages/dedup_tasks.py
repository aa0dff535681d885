"""Dedup's worker tasks and building blocks, each with memory bounded by one part or one bucket (never the pool).

The driver (:mod:`winnow.pipeline.stages.dedup`) runs four maps; every task writes its files under ``<out>/_work`` and
a
marker last, so a killed run resumes task by task:

1. ``scan_part`` (one per part): the part's ok rows (global row, uid, keep score), a random sample of their image
   embeddings for training, the exact-duplicate keys partitioned by hash, and the eval-set copies it holds.
2. the driver trains the clusters on the sample (flat spherical k-means; above ``FLAT_CLUSTERS`` clusters, two
   levels), then ``assign_part`` (one per part) writes each ok row into the bucket of its nearest cluster, and,
   for the near-duplicate search, a copy into each other cluster within ``probe_margin`` (at most ``nprobe``).
3. ``cluster_bucket`` (one per bucket of clusters): SemDeDup within each cluster, and near-duplicate edges of
   every row against the rows whose nearest cluster it is; ``near_flat`` instead searches all rows exactly when
   the pool has at most ``flat_max`` of them (one task holding them).
4. ``exact_bucket`` (one per hash bucket): groups of identical image bytes and identical (image, caption) pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.parts import Part, load_embeddings, read_part
from winnow.pipeline.data.shards import write_table

FLAT_CLUSTERS = 256  # up to this many clusters, one flat k-means; above, two levels (sqrt(K) coarse clusters)
COARSE_PROBE = 16  # two levels: a row's nearest clusters are looked for within its 16 nearest coarse clusters
# up to this many clusters, rows are assigned by one flat search over all of them, exact and faster than the two
# levels' many small searches (measured per 100,000 rows x 512-d: 1,000 clusters flat 0.6 s vs 2.9 s; the
# two levels win above about 5,000)
FLAT_ASSIGN = 4096
TABLE_COLUMNS = ["uid", "kind", "group", "kept", "similarity"]


# ------------------------------------------------------------------------------------------------ building blocks
def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


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
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def group_rows(labels: np.ndarray, rows: np.ndarray, rank: np.ndarray, uids: np.ndarray, kind: str,
               similarity: np.ndarray | None = None) -> pd.DataFrame:
    """Table rows for every member of a group of two or more: the best-ranked member is kept and names it."""
    frame = pd.DataFrame({"row": rows, "label": labels})
    sizes = frame.groupby("label")["row"].transform("size")
    frame = frame[sizes > 1].copy()
    if frame.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    frame["rank"] = rank[frame["row"].to_numpy()]
    best = frame.loc[frame.groupby("label")["rank"].idxmin(), ["label", "row"]].set_index("label")["row"]
    keeper = best.reindex(frame["label"]).to_numpy()
    return pd.DataFrame({"uid": uids[frame["row"].to_numpy()], "kind": kind, "group": uids[keeper],
                         "kept": frame["row"].to_numpy() == keeper,
                         "similarity": similarity[frame["row"].to_numpy()] if similarity is not None else 1.0})


def search_edges(index, queries: np.ndarray, query_ids: np.ndarray, ids: np.ndarray, k: int,
                 threshold: float) -> np.ndarray:
    """(m, 3) array of (row, row, cosine), smaller row first, for every query's top-``k`` neighbours (itself
    included, then dropped) at or above ``threshold``. Query i is row ``query_ids[i]``, index entry j row
    ``ids[j]``."""
    sims, nn = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    found = nn >= 0
    a = np.repeat(np.asarray(query_ids, np.int64), sims.shape[1]).reshape(sims.shape)
    b = np.where(found, np.asarray(ids, np.int64)[np.maximum(nn, 0)], -1)
    hit = (sims >= threshold) & found & (a != b)
    a, b = a[hit], b[hit]
    return np.stack([np.minimum(a, b), np.maximum(a, b), sims[hit]], axis=1) if hit.any() else np.zeros((0, 3))


def best_earlier(x: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For rows in keep order: each row's largest cosine to a row before it (-1 for the first), in column
    blocks so that memory stays (rows x chunk)."""
    best = np.full(len(x), -1.0, np.float32)
    for s in range(1, len(x), chunk):
        cols = np.arange(s, min(len(x), s + chunk))
        sims = x[: cols[-1]] @ x[cols].T  # earlier rows x this block
        sims[np.arange(cols[-1])[:, None] >= cols[None, :]] = -1.0  # only rows ranked before each column
        best[cols] = sims.max(axis=0)
    return best


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (faiss; it trains on at most 256 rows per centroid). Few rows per centroid are
    expected here (clusters only bound the exact search), so faiss's warning about them is not shown."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def train_clusters(x: np.ndarray, k: int, seed: int = 0) -> dict:
    """Cluster centroids from a sample: flat up to ``FLAT_CLUSTERS``; above, sqrt(k) coarse clusters each split
    in proportion to its share of the sample. Returns ``leaves`` (k' x d), ``top`` (t x d), ``leaf_top`` (k')."""
    k = max(1, min(len(x), k))
    if k <= FLAT_CLUSTERS:
        leaves = kmeans(x, k, seed) if k > 1 else normalize(x.mean(axis=0, keepdims=True))
        return {"leaves": leaves, "top": np.zeros((0, x.shape[1]), np.float32), "leaf_top": np.zeros(len(leaves),
                                                                                                     np.int64)}
    t = int(np.ceil(np.sqrt(k)))
    top = kmeans(x, t, seed)
    assign = nearest(top, x, 1)[1][:, 0]
    leaves, leaf_top = [], []
    for c in range(t):
        members = x[assign == c]
        if not len(members):
            continue
        sub = max(1, min(len(members), round(k * len(members) / len(x))))
        leaves.append(kmeans(members, sub, seed + 1 + c) if sub > 1 else normalize(members.mean(0, keepdims=True)))
        leaf_top += [c] * len(leaves[-1])
    return {"leaves": np.concatenate(leaves), "top": top, "leaf_top": np.array(leaf_top, np.int64)}


def nearest(centroids: np.ndarray, x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the ``p`` most similar centroids of each row, best first (faiss, exact)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), min(p, len(centroids)))


def groups(keys: np.ndarray) -> tuple[list, list[np.ndarray]]:
    """The distinct values of ``keys`` (ascending) and, for each, the positions holding it (ascending): one sort."""
    order = np.argsort(keys, kind="stable")
    values, starts = np.unique(keys[order], return_index=True)
    return values.tolist(), np.split(order, starts[1:]) if len(order) else []


def assign_leaves(clusters: dict, x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``p`` leaves of each row (sims, ids; -1 where fewer): flat search (up to ``FLAT_ASSIGN`` leaves), or
    within the ``COARSE_PROBE`` nearest coarse clusters."""
    top, leaves, leaf_top = clusters["top"], clusters["leaves"], clusters["leaf_top"]
    if not len(top) or len(leaves) <= FLAT_ASSIGN:
        sims, ids = nearest(leaves, x, p)
    else:
        # each row's candidates: the top p leaves of each of its COARSE_PROBE coarse clusters, in that cluster's
        # slot of one (rows, COARSE_PROBE x p) array; one sort per row at the end picks the best p
        _, coarse = nearest(top, x, COARSE_PROBE)
        probes = coarse.shape[1]
        cand_s = np.full((len(x), probes * p), -np.inf, np.float32)
        cand_i = np.full((len(x), probes * p), -1, np.int64)
        members_of = dict(zip(*groups(leaf_top)))
        for c, at in zip(*groups(coarse.ravel())):  # the (row, slot) pairs probing each coarse cluster
            members = members_of.get(c)
            if members is None:  # also c = -1: fewer coarse clusters than probes
                continue
            rows, slots = at // probes, at % probes
            s, i = nearest(leaves[members], x[rows], p)
            cols = slots[:, None] * p + np.arange(s.shape[1])
            cand_s[rows[:, None], cols] = s
            cand_i[rows[:, None], cols] = np.where(i >= 0, members[np.maximum(i, 0)], -1)
        pick = np.argsort(-cand_s, axis=1, kind="stable")[:, :p]
        sims, ids = np.take_along_axis(cand_s, pick, 1), np.take_along_axis(cand_i, pick, 1)
    if sims.shape[1] < p:
        pad = p - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return sims, ids


# ------------------------------------------------------------------------------------------------ file helpers
def save_npz(path: str, **arrays) -> None:
    with fsio.atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_npz_arrays(path: str, prefix: str = "", names: tuple = ()) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` whose names start with ``prefix`` (the prefix removed), or only those in
    ``names``; only those are read, never unpickled."""
    fs, p = fsio.get_fs(path)
    with fs.open(p, "rb") as f, np.load(f, allow_pickle=False) as z:
        return {n[len(prefix):]: z[n] for n in z.files if n.startswith(prefix) and (not names or n in names)}


SCAN_KEYS = ("rows", "uid", "score")  # of a scan file, what the later passes read


def read_frame(path: str) -> pd.DataFrame:
    with fsio.open_read(path) as f:
        return pd.read_parquet(f)


# ------------------------------------------------------------------------------------------------ 1. scan
@dataclass(frozen=True)
class ScanTask:
    pool: str
    part: Part
    offset: int  # global row of the part's first row
    work: str
    tag: str
    keep_tag: str
    sample_rate: float  # 1.0: every ok row is in the training sample
    exact_buckets: int
    evalsets: tuple = ()  # (name, path of its normalised image embeddings .npy)
    contamination_threshold: float = 0.9
    seed: int = 0

    @property
    def marker(self) -> str:
        return fsio.join(self.work, "scan", f"{self.part.stem}.json")


def scan_part(task: ScanTask) -> dict:
    from winnow.filters.clip import ClipFilter

    scorer = ClipFilter(tag=task.keep_tag or task.tag)
    table = read_part(task.part, ["uid", "caption", "sha256", scorer.precomputed])
    emb = load_embeddings(task.pool, task.part, tuple(dict.fromkeys((task.tag, scorer.tag))), None)
    if "img" not in emb[task.tag]:
        raise UserError(f"dedup: embeddings of tag {task.tag!r} have no images ({task.tag}_img)")
    img = emb[task.tag]["img"]
    if len(img) != len(table):
        raise UserError(f"dedup: {task.part.stem}: {len(img)} embeddings for {len(table)} rows; re-embed")
    has_txt = scorer.precomputed in table.columns or "txt" in emb[scorer.tag]
    score = scorer.score(table, emb).to_numpy(dtype=np.float32) if has_txt else np.full(len(table), np.nan,
                                                                                          np.float32)
    ok = (table["state"] == "ok").to_numpy(dtype=bool, na_value=False) & np.isfinite(img).all(axis=1)
    local = np.flatnonzero(ok)
    uid = table["uid"].astype(str).to_numpy()[local].astype(bytes)
    rows = local + task.offset
    pick = np.ones(len(local), bool) if task.sample_rate >= 1 else \
        np.random.default_rng([task.seed, task.offset]).random(len(local)) < task.sample_rate
    score = score[local]
    out = {"rows": rows, "uid": uid, "score": score, "sample": img[local[pick]].astype(np.float16)}
    if "sha256" in table.columns:  # exact keys, partitioned by hash
        sha = table["sha256"].astype(str).to_numpy()[local].astype(object)
        caption = np.array([normalize_caption(c) for c in table["caption"].to_numpy()[local]], dtype=object)
        h_img = pd.util.hash_array(sha)
        h_pair = pd.util.hash_array(np.array([s + "\n" + c for s, c in zip(sha, caption)], dtype=object))
        for b in range(task.exact_buckets):
            sel = (h_img % task.exact_buckets) == b
            out |= {f"e{b}_uid": uid[sel], f"e{b}_score": score[sel], f"e{b}_img": h_img[sel],
                    f"e{b}_pair": h_pair[sel]}
    save_npz(fsio.join(task.work, "scan", f"{task.part.stem}.npz"), **out)
    contaminated = _contamination(task, normalize(img[local]), uid)
    if contaminated is not None:
        write_table(fsio.join(task.work, "contaminated", f"{task.part.stem}.parquet"), contaminated)
    return {"rows": len(table), "ok": len(local), "sampled": int(pick.sum()),
                                "contaminated": 0 if contaminated is None else len(contaminated)}


def _contamination(task: ScanTask, x: np.ndarray, uid: np.ndarray) -> pd.DataFrame | None:
    import faiss

    if not task.evalsets:
        return None
    frames = []
    for name, path in task.evalsets:
        emb = fsio.load_npy(path, f"eval-set embeddings {path}")
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        sims, ids = index.search(x, 1) if len(x) else (np.zeros((0, 1)), np.zeros((0, 1), np.int64))
        hit = sims[:, 0] >= task.contamination_threshold
        frames.append(pd.DataFrame({"uid": uid[hit].astype(str), "kind": "contaminated",
                                    "group": [f"{name}/{i}" for i in ids[hit, 0]], "kept": False,
                                    "similarity": sims[hit, 0].astype(float)}))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------ 2. assign
@dataclass(frozen=True)
class AssignTask:
    pool: str
    part: Part
    offset: int
    work: str
    tag: str
    leaves_per_bucket: int
    nprobe: int  # 1: no copies for the near-duplicate search (it runs flat)
    probe_margin: float

    @property
    def marker(self) -> str:
        return fsio.join(self.work, "assign", f"{self.part.stem}.json")


def assign_part(task: AssignTask) -> dict:
    scan = load_npz_arrays(fsio.join(task.work, "scan", f"{task.part.stem}.npz"), names=SCAN_KEYS)
    clusters = load_npz_arrays(fsio.join(task.work, "clusters.npz"))
    img = load_embeddings(task.pool, task.part, (task.tag,), None)[task.tag]["img"]
    x = normalize(img[scan["rows"] - task.offset])
    sims, ids = assign_leaves(clusters, x, task.nprobe)
    # row i goes to its nearest leaf (primary) and, as a near-duplicate query only, to each other leaf of its
    # top nprobe within probe_margin of the nearest
    probe = (ids >= 0) & (sims >= sims[:, :1] - task.probe_margin)
    probe[:, 0] = True
    r, j = np.nonzero(probe)
    leaf, primary = ids[r, j], j == 0
    bucket = leaf // task.leaves_per_bucket
    out = {}
    for b in np.unique(bucket):
        sel = bucket == b
        out |= {f"b{b}_row": scan["rows"][r[sel]], f"b{b}_leaf": leaf[sel], f"b{b}_primary": primary[sel],
                f"b{b}_vec": img[scan["rows"][r[sel]] - task.offset].astype(np.float16),
                f"b{b}_score": scan["score"][r[sel]], f"b{b}_uid": scan["uid"][r[sel]]}
    save_npz(fsio.join(task.work, "assign", f"{task.part.stem}.npz"), **out)
    return {"rows": len(x), "copies": int((~primary).sum())}


# ------------------------------------------------------------------------------------------------ 3. clusters
@dataclass(frozen=True)
class BucketTask:
    work: str
    bucket: int
    stems: tuple  # every part (its assign file may hold rows of this bucket)
    near: bool  # False: the near-duplicate search runs flat (near_flat)
    k: int
    near_threshold: float
    semantic_eps: float  # the largest eps: rows above 1 - eps are written

    @property
    def marker(self) -> str:
        return fsio.join(self.work, "groups", f"b{self.bucket}.json")


def cluster_bucket(task: BucketTask) -> dict:
    """SemDeDup within each cluster of the bucket; near-duplicate edges of each row (and of each copy placed
    here by ``assign_part``) against the cluster's own rows."""
    parts = [load_npz_arrays(fsio.join(task.work, "assign", f"{s}.npz"), f"b{task.bucket}_") for s in task.stems]
    parts = [p for p in parts if p]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    del parts
    semantic, edges, members = [], [], []
    for leaf, at in zip(*groups(data["leaf"] if data else np.zeros(0, np.int64))):
        prim, copies = at[data["primary"][at]], at[~data["primary"][at]]
        if not len(prim):
            continue
        score = data["score"][prim]
        prim = prim[np.lexsort((data["uid"][prim], -np.where(np.isfinite(score), score, -np.inf)))]
        best, near = within_cluster(normalize(data["vec"][prim]), normalize(data["vec"][copies]) if task.near else
                                    None, task.k, task.near_threshold)
        hit = best > 1 - task.semantic_eps
        semantic.append(pd.DataFrame({"uid": data["uid"][prim[hit]].astype(str), "group": f"cluster-{leaf}",
                                      "similarity": best[hit].astype(float)}))
        if len(near):  # local indices: primaries 0..m-1, then the copies
            rows = data["row"][np.concatenate([prim, copies])]
            a, b = rows[near[:, 0].astype(np.int64)], rows[near[:, 1].astype(np.int64)]
            edges.append(np.stack([np.minimum(a, b), np.maximum(a, b), near[:, 2]], axis=1))
    edges = np.concatenate(edges) if edges else np.zeros((0, 3))
    if len(edges):
        rows = np.unique(edges[:, :2].astype(np.int64))
        first = np.unique(data["row"], return_index=True)
        pos = first[1][np.searchsorted(first[0], rows)]
        members.append(pd.DataFrame({"row": rows, "uid": data["uid"][pos].astype(str), "score": data["score"][pos]}))
    out = fsio.join(task.work, "groups", f"b{task.bucket}")
    write_table(out + "_semantic.parquet", pd.concat(semantic, ignore_index=True) if semantic else
                pd.DataFrame(columns=["uid", "group", "similarity"]))
    save_npz(out + "_edges.npz", edges=edges.astype(np.float64))
    write_table(out + "_members.parquet", pd.concat(members) if members else
                pd.DataFrame({"row": np.zeros(0, np.int64), "uid": [], "score": np.zeros(0, np.float32)}))
    return {"rows": int(data["primary"].sum()) if data else 0, "edges": len(edges)}


FULL_MAX = 4096  # clusters up to this many rows use one full similarity matrix (64 MB); larger ones, blocks


def within_cluster(x: np.ndarray, copies: np.ndarray | None, k: int, threshold: float) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """For a cluster's rows ``x`` in keep order: each row's largest cosine to an earlier row (SemDeDup), and,
    when ``copies`` is given, near-duplicate edges (i, j, cosine) of every row and copy (index m + c) against
    its top-``k`` rows (itself included, then dropped) at or above ``threshold``."""
    m = len(x)
    if m > FULL_MAX:
        import faiss

        best = best_earlier(x)
        if copies is None:
            return best, np.zeros((0, 3))
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        ids = np.arange(m)
        return best, search_edges(index, np.concatenate([x, copies]), np.arange(m + len(copies)), ids, k, threshold)
    s = x @ x.T
    best = np.where(np.tri(m, dtype=bool), np.float32(-1), s).max(axis=0)
    if copies is None:
        return best, np.zeros((0, 3))
    edges = [_top_k_edges(s, np.arange(m), k, threshold)]
    if len(copies):
        edges.append(_top_k_edges(copies @ x.T, np.arange(m, m + len(copies)), k, threshold))
    return best, np.concatenate(edges)


def _top_k_edges(sims: np.ndarray, query: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """(i, j, cosine) for each query row's ``k`` most similar columns (the query itself dropped) >= threshold.
    Entries at or above the threshold are few: a row with at most ``k`` of them keeps them all (they are its
    top-``k`` that pass), and only a row with more is partitioned."""
    k = min(k, sims.shape[1])
    mask = sims >= threshold
    counts = np.count_nonzero(mask, axis=1)
    many = np.flatnonzero(counts > k)
    mask[many] = False
    r, c = np.nonzero(mask)
    qs, cs, vs = [query[r]], [c], [sims[r, c]]
    if len(many):
        sub = sims[many]
        top = np.argpartition(-sub, k - 1, axis=1)[:, :k]
        val = np.take_along_axis(sub, top, axis=1)
        keep = val >= threshold
        qs.append(np.broadcast_to(query[many][:, None], top.shape)[keep])
        cs.append(top[keep])
        vs.append(val[keep])
    q, c, v = np.concatenate(qs), np.concatenate(cs), np.concatenate(vs)
    hit = q != c
    return np.stack([q[hit], c[hit], v[hit]], axis=1).astype(np.float64)


@dataclass(frozen=True)
class FlatTask:
    pool: str
    parts: tuple  # (Part, offset) of every part
    work: str
    tag: str
    k: int
    near_threshold: float

    @property
    def marker(self) -> str:
        return fsio.join(self.work, "groups", "flat.json")


def near_flat(task: FlatTask) -> dict:
    """Exact near-duplicate search of every ok row against all of them (pools up to ``flat_max`` rows)."""
    import faiss

    scans = [load_npz_arrays(fsio.join(task.work, "scan", f"{p.stem}.npz"), names=SCAN_KEYS) for p, _ in task.parts]
    x = np.concatenate([normalize(load_embeddings(task.pool, p, (task.tag,), None)[task.tag]["img"][s["rows"] - o])
                        for (p, o), s in zip(task.parts, scans)] or [np.zeros((0, 1), np.float32)])
    rows = np.concatenate([s["rows"] for s in scans]) if scans else np.zeros(0, np.int64)
    edges = [np.zeros((0, 3))]
    if len(x):
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # faiss-gpu installed and a GPU present
            index = faiss.index_cpu_to_all_gpus(index)
        start = 0
        for s in scans:  # queries part by part
            n = len(s["rows"])
            edges.append(search_edges(index, x[start: start + n], rows[start: start + n], rows, task.k,
                                      task.near_threshold))
            start += n
    edges = np.concatenate(edges)
    members = pd.DataFrame(columns=["row", "uid", "score"])
    if len(edges):
        uid = np.concatenate([s["uid"] for s in scans])
        score = np.concatenate([s["score"] for s in scans])
        pos = np.searchsorted(rows, np.unique(edges[:, :2].astype(np.int64)))
        members = pd.DataFrame({"row": rows[pos], "uid": uid[pos].astype(str), "score": score[pos]})
    out = fsio.join(task.work, "groups", "flat")
    save_npz(out + "_edges.npz", edges=edges.astype(np.float64))
    write_table(out + "_members.parquet", members)
    return {"rows": len(x), "edges": len(edges)}


# ------------------------------------------------------------------------------------------------ 4. exact
@dataclass(frozen=True)
class ExactTask:
    work: str
    bucket: int
    stems: tuple

    @property
    def marker(self) -> str:
        return fsio.join(self.work, "exact", f"e{self.bucket}.json")


def exact_bucket(task: ExactTask) -> dict:
    """Groups of identical image bytes (``sha256``) and identical (image, normalised caption) pairs."""
    parts = [load_npz_arrays(fsio.join(task.work, "scan", f"{s}.npz"), f"e{task.bucket}_") for s in task.stems]
    parts = [p for p in parts if p]
    table = pd.DataFrame(columns=TABLE_COLUMNS)
    if parts:
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        uid, idx = data["uid"].astype(str), np.arange(len(data["uid"]))
        rank = keep_order(uid, data["score"])
        found = [group_rows(data[key], idx, rank, uid, kind) for key, kind in (("img", "exact_image"),
                                                                             ("pair", "exact_pair"))]
        table = pd.concat([t for t in found if len(t)] or [table], ignore_index=True)
    write_table(fsio.join(task.work, "exact", f"e{task.bucket}.parquet"), table)
    return {"rows": len(table)}
