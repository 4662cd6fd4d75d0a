"""`SearchIndex`: what the model, the estimators, evaluation, checkpoints and serving need from an index.

Implementations: `LoadedIndex` (a version directory memory-mapped in this process, pipeline/index/mapped.py),
`jobs.sharded_index.ShardedIndex` (search spread over index-shard actors, rows memory-mapped in this process) and
`ArrayIndex` (exact, in memory: tests and benchmarks without files). Rows are the index's row numbers: they index
`ids`, `embeddings` and `passage(row)` alike, and `search` returns them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SearchIndex(Protocol):
    path: Path                 # the version directory (checkpoints record it; an in-memory index names a stand-in)
    manifest: dict             # manifest.json: type, dim, metric, count, fingerprints, params
    ids: list[str]             # passage id of each row
    embeddings: np.ndarray     # float32 [N, dim], usually memory-mapped: a step reads only the rows it scores

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """query_vectors float32 [B, dim] -> (scores float32 [B, k], rows int64 [B, k]), best first (inner product
        for "ip", squared distance for "l2"); rows -1 pad a result when the index holds fewer than k rows, with the
        worst score (-inf, or FAISS's -FLT_MAX, for "ip"): compare the scores of real rows only."""
        ...

    def passage(self, row: int) -> dict:
        """{"id", "title", "text"} of one row (IndexError outside [0, len))."""
        ...


def passage_text(title: str | None, text: str) -> str:
    """The text the passage encoder sees: ``title + ". " + text`` when the title is non-empty, else ``text``."""
    title = "" if title is None else str(title)
    return f"{title}. {text}" if title.strip() else str(text)


def as_queries(query_vectors: Any, dim: int, where: Any, k: int) -> np.ndarray:
    """Query vectors as a contiguous float32 [B, dim] array; a clear error for a wrong shape or k < 1."""
    q = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query vectors must have shape [B, {dim}] for index {where}, got {q.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return q
