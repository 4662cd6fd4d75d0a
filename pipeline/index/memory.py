"""`ArrayIndex`: an exact `SearchIndex` over vectors in memory, no files and no FAISS search (unit tests,
benchmarks that compare against another implementation, tiny knowledge bases)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.index.build import check_embeddings
from pipeline.index.errors import IndexFormatError
from pipeline.index.protocol import as_queries


class ArrayIndex:
    """Exact search over `embeddings` [N, dim]: highest inner product ("ip") or smallest squared L2 distance ("l2")
    first, equal scores by row number (as `merge_topk`). `path` is a stand-in name; `manifest` holds what a written
    version's would (type flat, dim, metric, count, version)."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str] | None = None,
                 texts: Sequence[str] | None = None, titles: Sequence[str] | None = None, metric: str = "ip",
                 version: str = "v1", path: str = "/memory"):
        self.embeddings = check_embeddings(embeddings)
        n, d = self.embeddings.shape
        self.ids = [str(i) for i in ids] if ids is not None else [f"p{i}" for i in range(n)]
        if len(self.ids) != n or (texts is not None and len(texts) != n) or (titles is not None and len(titles) != n):
            raise IndexFormatError(f"{n} embeddings need {n} ids, texts and titles")
        if metric not in ("ip", "l2"):
            raise IndexFormatError(f"unknown metric {metric!r}; choose ip or l2")
        self._texts = list(texts) if texts is not None else None
        self._titles = list(titles) if titles is not None else None
        self.path = Path(path)
        self.manifest = {"version": version, "type": "flat", "dim": d, "metric": metric, "count": n}

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
        if self.manifest["metric"] == "ip":
            scores = q @ self.embeddings.T
            key = -scores
        else:
            scores = ((q[:, None, :] - self.embeddings[None]) ** 2).sum(-1)
            key = scores
        rows = np.argsort(key, axis=1, kind="stable")[:, :k]   # stable: ties by row number
        top = np.take_along_axis(scores, rows, axis=1).astype(np.float32)
        if rows.shape[1] < k:  # fewer rows than k: pad like faiss does
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            top = np.pad(top, ((0, 0), (0, pad)),
                         constant_values=-np.inf if self.manifest["metric"] == "ip" else np.inf)
        return top, rows.astype(np.int64)

    def passage(self, row: int) -> dict:
        row = int(row)
        if not 0 <= row < len(self.ids):
            raise IndexError(f"row {row} out of range for an index of {len(self.ids)} passages")
        if self._texts is None:
            raise ValueError(f"index {self.path} was made without passage texts")
        title = self._titles[row] if self._titles is not None else ""
        return {"id": self.ids[row], "title": title or "", "text": self._texts[row] or ""}

    def __repr__(self) -> str:
        return f"ArrayIndex(count={len(self)}, dim={self.dim}, metric={self.manifest['metric']})"
