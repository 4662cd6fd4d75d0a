"""`LoadedIndex`: an index version memory-mapped in this process and searched with its FAISS index."""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from pipeline.index.protocol import as_queries
from pipeline.index.store import IndexRows, read_rows


class LoadedIndex(IndexRows):
    """A version directory opened for search (a `SearchIndex`).

    search(q [B, d] float32, k) -> (scores [B, k], rows [B, k]); rows index `ids`, `embeddings` and `passage(row)`.
    """

    def __init__(self, path: Path, index: faiss.Index, manifest: dict, ids: list[str], embeddings: np.ndarray,
                 passages: pa.Table):
        super().__init__(path, manifest, ids, embeddings, passages)
        self.index = index

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(query_vectors, self.dim, self.path, k)
        refine = int(self.manifest.get("params", {}).get("refine_factor", 1)) if self.manifest["type"] == "ivfpq" else 1
        if refine <= 1:
            return self.index.search(q, int(k))
        # approximate candidates, then exact re-scoring against the stored vectors (keeps PQ's memory, fixes its order)
        _, cand = self.index.search(q, min(int(k) * refine, len(self.ids)))
        safe = np.where(cand < 0, 0, cand)
        vecs = np.asarray(self.embeddings[safe.reshape(-1)], dtype=np.float32).reshape(*cand.shape, -1)
        if self.metric == "ip":
            exact = np.einsum("bd,bcd->bc", q, vecs)
        else:
            exact = -((vecs - q[:, None, :]) ** 2).sum(-1)
        exact = np.where(cand < 0, -np.inf, exact)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        rows = np.take_along_axis(cand, order, axis=1)
        scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
        if self.metric != "ip":
            scores = -scores  # faiss reports squared L2 distances for L2 indexes
        if rows.shape[1] < k:  # fewer passages than k: pad like faiss does
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        scores = np.where(rows < 0, -np.inf if self.metric == "ip" else np.inf, scores)
        return scores.astype(np.float32), rows

    def __repr__(self) -> str:
        m = self.manifest
        return f"LoadedIndex({self.path}, version={m['version']}, type={m['type']}, count={m['count']}, dim={m['dim']})"


def load_index(root_or_version_dir: str | os.PathLike, expected_encoder_fingerprint: str | None = None,
               mmap: bool = True) -> LoadedIndex:
    """Open an index root (via its ``current`` pointer) or a version directory.

    With `expected_encoder_fingerprint`, an index built with another encoder is refused (`IndexMismatchError`).
    With `mmap`, embeddings.npy (and the FAISS index where its type allows) are memory-mapped, not read.
    """
    version_dir, manifest, ids, embeddings, passages, index = read_rows(
        root_or_version_dir, expected_encoder_fingerprint, mmap=mmap, with_faiss=True)
    return LoadedIndex(version_dir, index, manifest, ids, embeddings, passages)
