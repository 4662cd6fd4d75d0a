"""Sharded search: N shards each hold rows [lo, hi) of a version; a query goes to all of them and their top-k are
merged exactly. Plain Python: jobs/sharded_index.py runs one `IndexShard` per Ray actor."""
from __future__ import annotations

import json
import os

import numpy as np

from pipeline.index.build import build_faiss_index
from pipeline.index.store import EMBEDDINGS_NAME, MANIFEST_NAME, check_encoder, resolve_version_dir


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
        check_encoder(version_dir, self.manifest, expected_encoder_fingerprint)
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
