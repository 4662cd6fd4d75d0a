"""Versioned FAISS indexes over passage embeddings.

An index root holds numbered versions and a pointer to the one in use:

    root/
      current              # text file holding the name of the current version, e.g. "v3" (replaced atomically)
      v1/ v2/ v3/          # one directory per version, each complete before it appears under its name
        index.faiss        # the FAISS index (flat | hnsw | ivfpq), row r <-> ids[r]
        embeddings.npy     # float32 [N, dim], the exact vectors (training gathers passage vectors by row)
        passages.parquet   # id, title, text per row (retrieval returns text)
        manifest.json      # version, type, dim, metric, count, corpus/encoder fingerprints, encoder, created, params

A version directory is written under a temporary name and renamed into place, and `current` is replaced with
`os.replace`, so a reader never sees a half-written index. `load_index` refuses an index whose encoder fingerprint
differs from the one the caller queries with (`IndexMismatchError`). No Ray here: `jobs/index.py` does the encoding.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
CURRENT_NAME = "current"
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"
EMBEDDINGS_NAME = "embeddings.npy"
PASSAGES_NAME = "passages.parquet"
_VERSION_RE = re.compile(r"^v(\d+)$")


class IndexFormatError(ValueError):
    """Base for index problems (bad input, unreadable or inconsistent version directory)."""


class IndexMismatchError(IndexFormatError):
    """The index was built with another encoder than the one it is queried with."""


class IndexVerificationError(IndexFormatError):
    """A version directory's files disagree with each other or with its manifest."""


def passage_text(title: str | None, text: str) -> str:
    """The text the passage encoder sees: ``title + ". " + text`` when the title is non-empty, else ``text``."""
    title = "" if title is None else str(title)
    return f"{title}. {text}" if title.strip() else str(text)


# --------------------------------------------------------------------------------------------------------------
# building FAISS indexes
# --------------------------------------------------------------------------------------------------------------

INDEX_PARAMS = {"flat": (), "hnsw": ("M", "efConstruction", "efSearch"),
           "ivfpq": ("nlist", "m", "nbits", "nprobe", "train_size", "refine_factor", "seed")}


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
    if index_type == "ivfpq":
        # faiss wants ~39 training points per centroid; 4*sqrt(n) lists is the usual rule of thumb
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
    raise IndexFormatError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")


def _check_embeddings(embeddings: Any) -> np.ndarray:
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
    emb = _check_embeddings(embeddings)
    n, d = emb.shape
    if metric not in METRICS:
        raise IndexFormatError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    faiss_metric = METRICS[metric]
    p = resolve_params(index_type, n, d, **params)
    with _omp_threads(n, threads):
        return _build(emb, index_type, metric, faiss_metric, p)


def _build(emb: np.ndarray, index_type: str, metric: str, faiss_metric: int, p: dict) -> faiss.Index:
    n, d = emb.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["M"], faiss_metric)
        index.hnsw.efConstruction = p["efConstruction"]
        index.hnsw.efSearch = p["efSearch"]
    else:
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["m"], p["nbits"], faiss_metric)
        rng = np.random.default_rng(p["seed"])
        sample = emb if n <= p["train_size"] else emb[np.sort(rng.choice(n, p["train_size"], replace=False))]
        index.cp.seed = p["seed"]
        index.pq.cp.seed = p["seed"]
        index.train(sample)
        index.nprobe = p["nprobe"]
    index.add(emb)
    return index


def _apply_search_params(index: faiss.Index, index_type: str, params: dict) -> None:
    if index_type == "hnsw" and "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    elif index_type == "ivfpq" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


# --------------------------------------------------------------------------------------------------------------
# shard-parallel builds: an empty (trained) index, parts filled shard by shard (in Ray tasks), merged in order
# --------------------------------------------------------------------------------------------------------------

MERGEABLE_TYPES = ("flat", "ivfpq")


def empty_index(index_type: str, n: int, sample: np.ndarray, metric: str = "ip", threads: int | None = None,
                **params: Any) -> tuple[faiss.Index, dict]:
    """An index of `index_type` for n vectors that holds none yet, and its resolved params. ivfpq is trained here on
    `sample` (vectors drawn from the corpus; at most `train_size` of them are used), flat needs no training. Fill
    copies of it with `add_vectors` (one per embedding shard, in parallel) and join them with `merge_indexes`.
    HNSW graphs cannot be merged: an hnsw index is built in one process (`build_faiss_index`, OpenMP threads)."""
    if index_type not in MERGEABLE_TYPES:
        raise IndexFormatError(f"a {index_type} index cannot be built shard-parallel and merged "
                               f"(only {', '.join(MERGEABLE_TYPES)}); build it in one process")
    if metric not in METRICS:
        raise IndexFormatError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    sample = _check_embeddings(sample)
    d = sample.shape[1]
    p = resolve_params(index_type, int(n), d, **params)
    if index_type == "flat":
        return (faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)), p
    quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["m"], p["nbits"], METRICS[metric])
    if len(sample) > p["train_size"]:
        rng = np.random.default_rng(p["seed"])
        sample = sample[np.sort(rng.choice(len(sample), p["train_size"], replace=False))]
    index.cp.seed = p["seed"]
    index.pq.cp.seed = p["seed"]
    with _omp_threads(int(n), threads):
        index.train(sample)
    index.nprobe = p["nprobe"]
    return index, p


def serialize_index(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def deserialize_index(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


def add_vectors(empty: faiss.Index | np.ndarray, embeddings: np.ndarray, threads: int | None = None) -> faiss.Index:
    """A copy of `empty` (an index or its serialized bytes) holding `embeddings`, rows 0..n-1 in order."""
    index = deserialize_index(empty if isinstance(empty, np.ndarray) else serialize_index(empty))
    emb = _check_embeddings(embeddings)
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


# --------------------------------------------------------------------------------------------------------------
# sharded search: N shards each hold rows [lo, hi) of a version; the query goes to all, the top-k are merged exactly
# --------------------------------------------------------------------------------------------------------------

def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of `num_shards` near-equal contiguous shards of n rows."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > n:
        raise ValueError(f"num_shards={num_shards} is more than the {n} rows of the index")
    edges = [n * i // num_shards for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the union of per-shard results [(scores [B, k_i], global rows [B, k_i]), ...].

    Best first: highest inner product ("ip") or smallest distance ("l2"); equal scores break ties by row number;
    rows -1 (a shard with fewer than k vectors) never beat a real row. Pads with -1 like FAISS when the shards hold
    fewer than k rows in all."""
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=1)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in parts], axis=1)
    key = -scores if metric == "ip" else scores.copy()
    key = np.where(rows < 0, np.inf, key)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), key), axis=1)[:, :k]
    top_rows = np.take_along_axis(rows, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    if top_rows.shape[1] < k:
        pad = k - top_rows.shape[1]
        top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf if metric == "ip" else np.inf)
    return top_scores, top_rows


class IndexShard:
    """Rows [lo, hi) of an index version, searched on their own (exact, over a memory-mapped slice of
    embeddings.npy): `search` returns global row numbers. Plain Python; jobs/sharded_index.py runs one per Ray actor
    so that no process holds more than 1/N of the vectors."""

    def __init__(self, root_or_version: str | os.PathLike, lo: int, hi: int,
                 expected_encoder_fingerprint: str | None = None):
        version_dir = resolve_version_dir(root_or_version)
        self.manifest = json.loads((version_dir / MANIFEST_NAME).read_text())
        _check_encoder(version_dir, self.manifest, expected_encoder_fingerprint)
        n = int(self.manifest["count"])
        if not 0 <= lo < hi <= n:
            raise ValueError(f"shard rows [{lo}, {hi}) out of range for index {version_dir} of {n} rows")
        self.path, self.lo, self.hi = version_dir, int(lo), int(hi)
        emb = np.load(version_dir / EMBEDDINGS_NAME, mmap_mode="r")
        self.metric = self.manifest.get("metric", "ip")
        self.index = build_faiss_index(np.asarray(emb[lo:hi], dtype=np.float32), "flat", self.metric)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def __len__(self) -> int:
        return self.hi - self.lo

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise ValueError(f"query vectors must have shape [B, {self.index.d}], got {q.shape}")
        scores, rows = self.index.search(q, min(int(k), len(self)))
        return scores, np.where(rows < 0, -1, rows + self.lo)


# --------------------------------------------------------------------------------------------------------------
# version directories
# --------------------------------------------------------------------------------------------------------------

def _version_number(name: str) -> int | None:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def list_versions(root: str | os.PathLike) -> list[str]:
    """Version directory names under an index root, oldest first (``["v1", "v2", ...]``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(n, p.name) for p in root.iterdir() if p.is_dir() and (n := _version_number(p.name)) is not None]
    return [name for _, name in sorted(found)]


def current_version(root: str | os.PathLike) -> str | None:
    """The name the ``current`` pointer holds, or None when there is none."""
    f = Path(root) / CURRENT_NAME
    if not f.is_file():
        return None
    name = f.read_text().strip()
    return name or None


def set_current(root: str | os.PathLike, version: str) -> None:
    """Point ``root/current`` at `version` atomically (temp file + fsync + os.replace)."""
    root = Path(root)
    if not (root / version / MANIFEST_NAME).is_file():
        raise IndexFormatError(f"cannot point {root / CURRENT_NAME} at {version}: {root / version} is not an index version")
    tmp = root / f".{CURRENT_NAME}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / CURRENT_NAME)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _str_column(values: Any, name: str, n: int) -> list[str]:
    values = ["" if v is None else str(v) for v in values]
    if len(values) != n:
        raise IndexFormatError(f"{name}: {len(values)} values for {n} embeddings")
    return values


def write_index_version(root: str | os.PathLike, embeddings: np.ndarray, ids: Any, index_type: str = "flat",
                        encoder_name: str | None = None, encoder_fingerprint: str | None = None,
                        corpus_fingerprint: str | None = None, titles: Any = None, texts: Any = None,
                        metric: str = "ip", make_current: bool = True, extra: dict | None = None,
                        index: faiss.Index | None = None, **params: Any) -> Path:
    """Build an index over `embeddings` and write it as the next version ``root/v{N}``; returns that directory.

    Everything is validated and built in memory first, then written into ``root/.tmp-*`` and renamed into place, so
    bad input leaves nothing behind and a reader never sees a partial version. With `make_current` (the default)
    ``root/current`` then points at the new version. `extra` (JSON-able) is stored in the manifest under "build".
    `index`: an index already built over exactly these rows in this order (a shard-parallel build), else one is built.
    """
    emb = _check_embeddings(embeddings)
    n, d = emb.shape
    ids = [str(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
    if len(ids) != n:
        raise IndexFormatError(f"{len(ids)} ids for {n} embeddings: every embedding row needs exactly one id")
    if len(set(ids)) != n:
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise IndexFormatError(f"passage ids must be unique; {dup!r} appears more than once")
    columns = {"id": pa.array(ids, pa.string())}
    if titles is not None:
        columns["title"] = pa.array(_str_column(titles, "titles", n), pa.string())
    if texts is not None:
        columns["text"] = pa.array(_str_column(texts, "texts", n), pa.string())
    threads = params.pop("threads", None)
    if index is None:
        index = build_faiss_index(emb, index_type, metric, threads=threads, **params)
    elif index.ntotal != n or index.d != d:
        raise IndexFormatError(f"the prebuilt index holds {index.ntotal} vectors of dim {index.d}, "
                               f"the embeddings {n} of dim {d}")
    resolved = resolve_params(index_type, n, d, **params)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        faiss.write_index(index, str(tmp / INDEX_NAME))
        np.save(tmp / EMBEDDINGS_NAME, emb)
        pq.write_table(pa.table(columns), tmp / PASSAGES_NAME)
        manifest = {"version": None, "type": index_type, "dim": d, "metric": metric, "count": n,
                    "corpus_fingerprint": corpus_fingerprint, "encoder_fingerprint": encoder_fingerprint,
                    "encoder": encoder_name,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "params": resolved, "has_text": "text" in columns,
                    "embeddings_sha256": _sha256_file(tmp / EMBEDDINGS_NAME),
                    "files": {"index": INDEX_NAME, "embeddings": EMBEDDINGS_NAME, "passages": PASSAGES_NAME}}
        if extra:
            manifest["build"] = extra
        # claim the next free number; a concurrent writer that wins the same name makes the rename fail: retry
        for _ in range(1000):
            existing = [_version_number(v) for v in list_versions(root)]
            name = f"v{max(existing, default=0) + 1}"
            manifest["version"] = name
            with open(tmp / MANIFEST_NAME, "w") as fh:
                json.dump(manifest, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, root / name)
                break
            except OSError:
                if not (root / name).exists():
                    raise
        else:  # pragma: no cover
            raise IndexFormatError(f"could not claim a version name under {root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if make_current:
        set_current(root, name)
    return root / name


def resolve_version_dir(root_or_version: str | os.PathLike) -> Path:
    """A version directory itself, or the one an index root's ``current`` pointer names."""
    path = Path(root_or_version)
    if (path / MANIFEST_NAME).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"index not found: {path}")
    name = current_version(path)
    if name is None:
        versions = list_versions(path)
        hint = f" (versions present: {', '.join(versions)})" if versions else ""
        raise FileNotFoundError(f"{path} is neither an index version (no {MANIFEST_NAME}) nor an index root "
                                f"with a '{CURRENT_NAME}' pointer{hint}")
    version_dir = path / name
    if not (version_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{path / CURRENT_NAME} points at {name}, but {version_dir / MANIFEST_NAME} is missing")
    return version_dir


def read_manifest(root_or_version: str | os.PathLike) -> dict:
    return json.loads((resolve_version_dir(root_or_version) / MANIFEST_NAME).read_text())


def _read_faiss(path: Path, mmap: bool) -> faiss.Index:
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # index types that cannot be memory-mapped are read into memory
            pass
    return faiss.read_index(str(path))


def as_queries(query_vectors, dim: int, where, k: int) -> np.ndarray:
    """Query vectors as a contiguous float32 [B, dim] array; a clear error for a wrong shape or k < 1."""
    q = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query vectors must have shape [B, {dim}] for index {where}, got {q.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return q


class LoadedIndex:
    """A version directory opened for search.

    search(q [B, d] float32, k) -> (scores [B, k], rows [B, k]); rows index `ids`, `embeddings` and `passage(row)`.
    """

    def __init__(self, path: Path, index: faiss.Index, manifest: dict, ids: list[str], embeddings: np.ndarray,
                 passages: pa.Table):
        self.path = Path(path)
        self.index = index
        self.manifest = manifest
        self.ids = ids
        self.embeddings = embeddings
        self._passages = passages
        self._titles = passages.column("title").combine_chunks() if "title" in passages.column_names else None
        self._texts = passages.column("text").combine_chunks() if "text" in passages.column_names else None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(query_vectors, self.dim, self.path, k)
        refine = int(self.manifest.get("params", {}).get("refine_factor", 1)) if self.manifest["type"] == "ivfpq" else 1
        if refine <= 1:
            return self.index.search(q, int(k))
        # approximate candidates, then exact re-scoring against the stored vectors (keeps PQ's memory, fixes its order)
        _, cand = self.index.search(q, min(int(k) * refine, len(self.ids)))
        safe = np.where(cand < 0, 0, cand)
        vecs = np.asarray(self.embeddings[safe.reshape(-1)], dtype=np.float32).reshape(*cand.shape, -1)
        if self.manifest.get("metric", "ip") == "ip":
            exact = np.einsum("bd,bcd->bc", q, vecs)
        else:
            exact = -((vecs - q[:, None, :]) ** 2).sum(-1)
        exact = np.where(cand < 0, -np.inf, exact)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        rows = np.take_along_axis(cand, order, axis=1)
        scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
        if self.manifest.get("metric", "ip") != "ip":
            scores = -scores  # faiss reports squared L2 distances for L2 indexes
        if rows.shape[1] < k:  # fewer passages than k: pad like faiss does
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        scores = np.where(rows < 0, -np.inf if self.manifest.get("metric", "ip") == "ip" else np.inf, scores)
        return scores.astype(np.float32), rows

    def passage(self, row: int) -> dict:
        row = int(row)
        if not 0 <= row < len(self.ids):
            raise IndexError(f"row {row} out of range for an index of {len(self.ids)} passages")
        if self._texts is None:
            raise ValueError(f"index {self.path} was written without passage texts")
        title = self._titles[row].as_py() if self._titles is not None else ""
        return {"id": self.ids[row], "title": title or "", "text": self._texts[row].as_py() or ""}

    def __repr__(self) -> str:
        m = self.manifest
        return f"LoadedIndex({self.path}, version={m['version']}, type={m['type']}, count={m['count']}, dim={m['dim']})"


def _check_encoder(version_dir: Path, manifest: dict, expected_encoder_fingerprint: str | None) -> None:
    have = manifest.get("encoder_fingerprint")
    if expected_encoder_fingerprint is not None and have != expected_encoder_fingerprint:
        raise IndexMismatchError(
            f"index {version_dir} was built with encoder fingerprint {have} (encoder {manifest.get('encoder')!r}), "
            f"but it is being queried with an encoder whose fingerprint is {expected_encoder_fingerprint}; "
            f"rebuild the index with this encoder (`latentrag index`) or query it with the encoder it was built with")


def load_index(root_or_version_dir: str | os.PathLike, expected_encoder_fingerprint: str | None = None,
               mmap: bool = True) -> LoadedIndex:
    """Open an index root (via its ``current`` pointer) or a version directory.

    With `expected_encoder_fingerprint`, an index built with another encoder is refused (`IndexMismatchError`).
    With `mmap`, embeddings.npy (and the FAISS index where its type allows) are memory-mapped, not read.
    """
    version_dir = resolve_version_dir(root_or_version_dir)
    manifest = json.loads((version_dir / MANIFEST_NAME).read_text())
    _check_encoder(version_dir, manifest, expected_encoder_fingerprint)
    for name in (INDEX_NAME, EMBEDDINGS_NAME, PASSAGES_NAME):
        if not (version_dir / name).is_file():
            raise FileNotFoundError(f"index version {version_dir} is missing {name}")
    index = _read_faiss(version_dir / INDEX_NAME, mmap)
    _apply_search_params(index, manifest["type"], manifest.get("params", {}))
    embeddings = np.load(version_dir / EMBEDDINGS_NAME, mmap_mode="r" if mmap else None)
    passages = pq.read_table(version_dir / PASSAGES_NAME, memory_map=mmap)
    ids = passages.column("id").to_pylist()
    n = int(manifest["count"])
    if not (index.ntotal == len(ids) == embeddings.shape[0] == n):
        raise IndexVerificationError(
            f"index version {version_dir} is inconsistent: manifest count {n}, index {index.ntotal} vectors, "
            f"{len(ids)} ids, {embeddings.shape[0]} embedding rows")
    return LoadedIndex(version_dir, index, manifest, ids, embeddings, passages)


def verify_index(version_dir: str | os.PathLike, sample: int | None = 100, checksum: bool = True,
                 seed: int = 0) -> dict:
    """Check a version directory: counts and dims agree, the embeddings file matches its checksum, and a sample of
    index vectors matches embeddings.npy (reconstructed exactly for flat/hnsw, re-encoded for ivfpq, and each
    sampled vector finds its own row). Raises `IndexVerificationError` naming what disagrees; returns a report."""
    version_dir = resolve_version_dir(version_dir)
    manifest = json.loads((version_dir / MANIFEST_NAME).read_text())
    problems: list[str] = []
    emb_path = version_dir / EMBEDDINGS_NAME
    try:
        emb = np.load(emb_path, mmap_mode="r")
    except Exception as exc:  # truncated or garbled header
        raise IndexVerificationError(f"{emb_path} is unreadable: {exc}") from exc
    index = faiss.read_index(str(version_dir / INDEX_NAME))
    _apply_search_params(index, manifest["type"], manifest.get("params", {}))
    n_ids = pq.read_metadata(version_dir / PASSAGES_NAME).num_rows
    n, d = int(manifest["count"]), int(manifest["dim"])
    if not (index.ntotal == n_ids == emb.shape[0] == n):
        problems.append(f"counts disagree: manifest {n}, index {index.ntotal}, ids {n_ids}, embeddings {emb.shape[0]}")
    if emb.ndim != 2 or emb.shape[1] != d or index.d != d:
        problems.append(f"dims disagree: manifest {d}, index {index.d}, embeddings {emb.shape}")
    if emb.dtype != np.float32:
        problems.append(f"embeddings dtype is {emb.dtype}, expected float32")
    checked_sum = False
    if checksum and manifest.get("embeddings_sha256"):
        checked_sum = True
        if _sha256_file(emb_path) != manifest["embeddings_sha256"]:
            problems.append(f"{EMBEDDINGS_NAME} does not match the checksum in {MANIFEST_NAME} (file changed or corrupt)")
    if problems:
        raise IndexVerificationError(f"index {version_dir} failed verification: " + "; ".join(problems))

    rng = np.random.default_rng(seed)
    rows = np.arange(n) if sample is None or sample >= n else np.sort(rng.choice(n, int(sample), replace=False))
    vecs = np.ascontiguousarray(emb[rows], dtype=np.float32)
    index_type = manifest["type"]
    if index_type in ("flat", "hnsw"):
        stored = np.stack([index.reconstruct(int(r)) for r in rows])
        bad = rows[~np.isclose(stored, vecs, rtol=1e-5, atol=1e-6).all(axis=1)]
    else:  # ivfpq stores codes: re-encode the embedding and compare with the stored vector's decoding
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        stored = np.stack([index.reconstruct(int(r)) for r in rows])
        expected = index.sa_decode(index.sa_encode(vecs))
        bad = rows[~np.isclose(stored, expected, rtol=1e-4, atol=1e-5).all(axis=1)]
    if len(bad):
        raise IndexVerificationError(
            f"index {version_dir} failed verification: {len(bad)} of {len(rows)} sampled rows of {EMBEDDINGS_NAME} "
            f"do not match the vectors in {INDEX_NAME} (first bad row {int(bad[0])})")
    # the sampled vectors should find themselves (exact for flat; approximate indexes may miss a few)
    k = min(10, n)
    _, found = index.search(vecs, k)
    self_hit = float(np.mean([(found[i] == r).any() for i, r in enumerate(rows)]))
    if index_type == "flat" and self_hit < 1.0:
        raise IndexVerificationError(f"index {version_dir}: only {self_hit:.2%} of sampled rows find themselves "
                                     f"in the top {k} of an exact index")
    return {"version_dir": str(version_dir), "version": manifest.get("version"), "type": index_type,
            "count": n, "dim": d, "sampled_rows": int(len(rows)), "checksum_checked": checked_sum,
            f"self_recall@{k}": self_hit, "ok": True}
