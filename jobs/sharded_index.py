"""Sharded search on Ray: N index-shard actors each hold 1/N of an index version's vectors; a query goes to all of
them and their top-k are merged exactly (`pipeline.index.merge_topk`).

    index = ShardedIndex("data/index", num_shards=4)          # current version, or a version directory
    scores, rows = index.search(query_vectors, k=10)         # same contract as LoadedIndex.search (flat: identical)
    index.ids[rows[0, 0]], index.passage(rows[0, 0])

Each actor memory-maps only its row range [lo, hi) of embeddings.npy and searches it exactly, so no process holds
the corpus's vectors; the driver keeps ids and passage texts (Arrow, memory-mapped). An index whose manifest names
another encoder than `expected_encoder_fingerprint` is refused before any actor starts.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from pipeline.index import (MANIFEST_NAME, PASSAGES_NAME, IndexShard, _check_encoder, as_queries, merge_topk,
                            read_manifest, resolve_version_dir, shard_bounds)


class ShardedIndex:
    def __init__(self, root_or_version: str | os.PathLike, num_shards: int = 2,
                 expected_encoder_fingerprint: str | None = None, cpus_per_shard: float = 0.5):
        import ray

        self.path = resolve_version_dir(root_or_version)
        self.manifest = read_manifest(self.path)
        _check_encoder(self.path, self.manifest, expected_encoder_fingerprint)
        self.metric = self.manifest.get("metric", "ip")
        n = int(self.manifest["count"])
        self.bounds = shard_bounds(n, num_shards)
        actor = ray.remote(num_cpus=cpus_per_shard)(IndexShard)
        self.shards = [actor.remote(str(self.path), lo, hi, expected_encoder_fingerprint) for lo, hi in self.bounds]
        passages = pq.read_table(self.path / PASSAGES_NAME, memory_map=True)
        self._passages = passages
        self.ids = passages.column("id").to_pylist()
        if len(self.ids) != n:
            raise ValueError(f"{self.path / PASSAGES_NAME} holds {len(self.ids)} ids, {MANIFEST_NAME} says {n}")

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import ray

        q = as_queries(query_vectors, self.dim, self.path, k)
        q_ref = ray.put(q)
        parts = ray.get([s.search.remote(q_ref, int(k)) for s in self.shards])
        return merge_topk(parts, int(k), self.metric)

    def passage(self, row: int) -> dict:
        row = int(row)
        if not 0 <= row < len(self.ids):
            raise IndexError(f"row {row} out of range for an index of {len(self.ids)} passages")
        rec = self._passages.slice(row, 1).to_pylist()[0]
        return {"id": rec["id"], "title": rec.get("title") or "", "text": rec.get("text") or ""}

    def shutdown(self) -> None:
        import ray

        for s in self.shards:
            ray.kill(s)
        self.shards = []
