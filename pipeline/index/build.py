"""Building FAISS indexes: in one process (`build_faiss_index`), or shard-parallel: an empty (trained) index,
copies of it filled shard by shard (`add_vectors`, in Ray tasks in jobs/index.py) and merged in order."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import faiss
import numpy as np

from pipeline.index.errors import IndexFormatError

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
INDEX_PARAMS = {"flat": (), "hnsw": ("M", "efConstruction", "efSearch"),
                "ivfpq": ("nlist", "m", "nbits", "nprobe", "train_size", "refine_factor", "seed")}
MERGEABLE_TYPES = ("flat", "ivfpq")


def _default_pq_m(d: int) -> int:
    """Sub-quantizers for IVFPQ: the largest divisor of d giving >= 8 dims per sub-vector, at most 64."""
    for m in range(min(64, d), 0, -1):
        if d % m == 0 and d // m >= 8:
            return m
    return 1


def resolve_params(index_type: str, n: int, d: int, **params: Any) -> dict:
    """Fill in defaults for an index type at size n x d (clamped so small corpora still train)."""
    allowed = INDEX_PARAMS.get(index_type)
    if allowed is None:
        raise IndexFormatError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise IndexFormatError(f"unknown parameter(s) {', '.join(unknown)} for a {index_type} index; "
                               f"it takes {', '.join(allowed) or 'none'}")
    if index_type == "flat":
        return {}
    if index_type == "hnsw":
        out = {"M": 32, "efConstruction": 80, "efSearch": 64}
        out.update({k: int(v) for k, v in params.items() if k in out})
        return out
    # ivfpq: faiss wants ~39 training points per centroid; 4*sqrt(n) lists is the usual rule of thumb
    max_nlist = max(1, n // 39)
    nlist = int(params.get("nlist") or min(max_nlist, max(1, int(4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, max_nlist))
    m = int(params.get("m") or _default_pq_m(d))
    if d % m:
        raise IndexFormatError(f"ivfpq: m={m} must divide the embedding dim {d}")
    # 2**nbits codewords per sub-quantizer, again with ~39 training points each
    nbits = int(params.get("nbits") or 8)
    nbits = max(1, min(nbits, int(math.log2(max(2.0, n / 39)))))
    nprobe = int(params.get("nprobe") or 16)
    nprobe = max(1, min(nprobe, nlist))
    train_size = int(params.get("train_size") or 100_000)
    # search fetches refine_factor * k candidates and re-scores them exactly with embeddings.npy (1: off)
    refine_factor = int(params.get("refine_factor") or 4)
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe, "train_size": train_size,
            "refine_factor": max(1, refine_factor), "seed": int(params.get("seed", 0))}


def check_embeddings(embeddings: Any) -> np.ndarray:
    """`embeddings` as contiguous float32 [N, dim], N, dim > 0, all finite; else IndexFormatError."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise IndexFormatError(f"embeddings must be a 2-D array [N, dim], got shape {emb.shape}")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise IndexFormatError(f"embeddings are empty: shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise IndexFormatError(f"embeddings must be floating point, got dtype {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
        raise IndexFormatError(f"embeddings contain NaN or inf (first bad row: {bad})")
    return emb


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise IndexFormatError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


@contextlib.contextmanager
def _omp_threads(n: int, threads: int | None):
    """Run FAISS with `threads` OpenMP threads (small builds default to 1: thread start-up and spinning cost more
    than they save below ~20k vectors, and badly so on a busy machine); restores the previous setting."""
    if threads is None:
        threads = 1 if n <= 20_000 else 0
    before = faiss.omp_get_max_threads()
    if threads > 0:
        faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _flat(d: int, metric: str) -> faiss.Index:
    return faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)


def _trained_ivfpq(sample: np.ndarray, metric: str, p: dict) -> faiss.Index:
    """The one place an IVF-PQ index is made: trained on at most p["train_size"] rows of `sample` (drawn with
    p["seed"]), holding no vectors yet. A one-process build and a shard-parallel one get the same index from it."""
    n, d = sample.shape
    index = faiss.IndexIVFPQ(_flat(d, metric), d, p["nlist"], p["m"], p["nbits"], METRICS[metric])
    if n > p["train_size"]:
        rng = np.random.default_rng(p["seed"])
        sample = sample[np.sort(rng.choice(n, p["train_size"], replace=False))]
    index.cp.seed = p["seed"]
    index.pq.cp.seed = p["seed"]
    index.train(sample)
    index.nprobe = p["nprobe"]
    return index


def build_faiss_index(embeddings: np.ndarray, index_type: str = "flat", metric: str = "ip",
                      threads: int | None = None, **params: Any) -> faiss.Index:
    """A FAISS index over `embeddings` (float32 [N, d]); row r of the index is row r of `embeddings`.

    flat:  exact search (IndexFlatIP / IndexFlatL2).
    hnsw:  IndexHNSWFlat, params M (32), efConstruction (80), efSearch (64).
    ivfpq: IndexIVFPQ trained on a random sample, params nlist (4*sqrt(N), at most N/39), m (largest divisor of
           dim with >= 8 dims each, <= 64), nbits (8, at most log2(N/39)), nprobe (16, at most nlist), train_size,
           refine_factor (4: `LoadedIndex.search` re-scores refine_factor*k candidates exactly; 1 turns it off).
    `threads`: OpenMP threads for the build (default: 1 below 20k vectors, FAISS's default above).
    """
    emb = check_embeddings(embeddings)
    n, d = emb.shape
    _check_metric(metric)
    p = resolve_params(index_type, n, d, **params)
    with _omp_threads(n, threads):
        if index_type == "flat":
            index = _flat(d, metric)
        elif index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["M"], METRICS[metric])
            index.hnsw.efConstruction = p["efConstruction"]
            index.hnsw.efSearch = p["efSearch"]
        else:
            index = _trained_ivfpq(emb, metric, p)
        index.add(emb)
    return index


def _apply_search_params(index: faiss.Index, index_type: str, params: dict) -> None:
    """Search-time settings from a manifest's params (they are not all kept by faiss.write_index)."""
    if index_type == "hnsw" and "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    elif index_type == "ivfpq" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


# --------------------------------------------------------------------------------------------------------------
# shard-parallel builds
# --------------------------------------------------------------------------------------------------------------

def empty_index(index_type: str, n: int, sample: np.ndarray, metric: str = "ip", threads: int | None = None,
                **params: Any) -> tuple[faiss.Index, dict]:
    """An index of `index_type` for n vectors that holds none yet, and its resolved params. ivfpq is trained here on
    `sample` (vectors drawn from the corpus; at most `train_size` of them are used), flat needs no training. Fill
    copies of it with `add_vectors` (one per embedding shard, in parallel) and join them with `merge_indexes`.
    HNSW graphs cannot be merged: an hnsw index is built in one process (`build_faiss_index`, OpenMP threads)."""
    if index_type not in MERGEABLE_TYPES:
        raise IndexFormatError(f"a {index_type} index cannot be built shard-parallel and merged "
                               f"(only {', '.join(MERGEABLE_TYPES)}); build it in one process")
    _check_metric(metric)
    sample = check_embeddings(sample)
    d = sample.shape[1]
    p = resolve_params(index_type, int(n), d, **params)
    if index_type == "flat":
        return _flat(d, metric), p
    with _omp_threads(int(n), threads):
        return _trained_ivfpq(sample, metric, p), p


def serialize_index(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def deserialize_index(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


def add_vectors(empty: faiss.Index | np.ndarray, embeddings: np.ndarray, threads: int | None = None) -> faiss.Index:
    """A copy of `empty` (an index or its serialized bytes) holding `embeddings`, rows 0..n-1 in order."""
    index = deserialize_index(empty if isinstance(empty, np.ndarray) else serialize_index(empty))
    emb = check_embeddings(embeddings)
    if emb.shape[1] != index.d:
        raise IndexFormatError(f"embeddings have dim {emb.shape[1]}, the index {index.d}")
    with _omp_threads(len(emb), threads):
        index.add(emb)
    return index


def merge_indexes(parts: list[faiss.Index]) -> faiss.Index:
    """One index holding parts[0]'s rows, then parts[1]'s, ...: row numbers continue across parts (FAISS
    `merge_from`, exact for flat and for ivfpq parts made from one trained `empty_index`)."""
    if not parts:
        raise IndexFormatError("no index parts to merge")
    merged = deserialize_index(serialize_index(parts[0]))
    for part in parts[1:]:
        if part.d != merged.d:
            raise IndexFormatError(f"cannot merge index parts of dims {merged.d} and {part.d}")
        merged.merge_from(part, merged.ntotal if isinstance(merged, faiss.IndexIVF) else 0)
    return merged
