"""Sharded search on Ray: N index-shard actors each hold 1/N of an index version's vectors; a query goes to all of
them and their top-k are merged exactly (`pipeline.index.merge_topk`).

    index = ShardedIndex("data/index", num_shards=4)          # current version, or a version directory
    scores, rows = index.search(query_vectors, k=10)         # same contract as LoadedIndex.search (flat: identical)
    index.ids[rows[0, 0]], index.passage(rows[0, 0]), index.embeddings[rows]

A `pipeline.index.SearchIndex`, like `LoadedIndex`: each actor builds an exact index over its row range [lo, hi)
of embeddings.npy, so no process holds the corpus's vectors in memory; this process keeps ids and passage texts
(Arrow) and embeddings.npy memory-mapped, from which a training step reads only the rows it scores
(`RagModel.score_rows`). An index whose manifest names another encoder than `expected_encoder_fingerprint` is
refused before any actor starts. `open_search_index` picks this or `load_index` from a shard count.
"""
from __future__ import annotations

import os

import numpy as np
import ray

from pipeline.index import (IndexRows, IndexShard, SearchIndex, as_queries, load_index, merge_topk, read_rows,
                            shard_bounds)


class ShardedIndex(IndexRows):
    def __init__(self, root_or_version: str | os.PathLike, num_shards: int = 2,
                 expected_encoder_fingerprint: str | None = None, cpus_per_shard: float = 0.5):
        # the FAISS index is the actors' business: this process reads rows only (ids, texts, mapped embeddings)
        path, manifest, ids, embeddings, passages, _ = read_rows(root_or_version, expected_encoder_fingerprint,
                                                                  mmap=True, with_faiss=False)
        super().__init__(path, manifest, ids, embeddings, passages)
        self.bounds = shard_bounds(len(ids), num_shards)
        actor = ray.remote(num_cpus=cpus_per_shard)(IndexShard)
        self.shards = [actor.remote(str(self.path), lo, hi, expected_encoder_fingerprint) for lo, hi in self.bounds]

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(query_vectors, self.dim, self.path, k)
        q_ref = ray.put(q)
        parts = ray.get([s.search.remote(q_ref, int(k)) for s in self.shards])
        return merge_topk(parts, int(k), self.metric)

    def shutdown(self) -> None:
        for s in self.shards:
            ray.kill(s)
        self.shards = []

    def __repr__(self) -> str:
        return f"ShardedIndex({self.path}, version={self.version}, count={len(self)}, shards={len(self.bounds)})"


def open_search_index(index_dir: str | os.PathLike, search_shards: int = 1,
                      expected_encoder_fingerprint: str | None = None) -> SearchIndex:
    """The index a training worker searches: memory-mapped in this process (FAISS IO_FLAG_MMAP where the type
    allows, embeddings.npy with np.load(mmap_mode)), or, with search_shards > 1, through that many shard actors
    (owned by this process: `shutdown()` them when switching away)."""
    if search_shards > 1:
        return ShardedIndex(index_dir, num_shards=search_shards,
                            expected_encoder_fingerprint=expected_encoder_fingerprint)
    return load_index(index_dir, expected_encoder_fingerprint=expected_encoder_fingerprint)
