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

Shared shards (`group=`, what the training workers use): the actors are named
`<group>/<version>/<cluster | node-ID>/s<i>of<N>` in the namespace `latentrag-index` and created with
`get_if_exists`, so the first worker that opens a version starts them and every other worker of the run gets handles
to the same actors (scope `cluster`: one set, spread over the nodes; `node`: one set per node, on that node). They
are detached, so no worker's exit takes them along; who kills them: rank 0 at a refresh switch kills the old
version's set once every rank has switched (`shutdown(release_shared=True)`), and the driver kills every actor of
its group when the run ends (`release_shards(group)`). Without a group each ShardedIndex starts its own actors and
`shutdown()` kills them. Either way an actor that dies is restarted by Ray (`max_restarts=-1`): its constructor
rebuilds the shard from the version directory, and a search sent meanwhile is retried (`max_task_retries=-1`).
"""
from __future__ import annotations

import os

import numpy as np
import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import ConfigError
from pipeline.index import (IndexRows, IndexShard, SearchIndex, as_queries, load_index, merge_topk, read_rows,
                            shard_bounds)

NAMESPACE = "latentrag-index"
SCOPES = ("cluster", "node")


class ShardActor(IndexShard):
    """An `IndexShard` in a Ray actor, plus what its owner (and a test) may ask: what it holds and its memory."""

    def __init__(self, *args):
        self._rss_before = psutil.Process().memory_info().rss    # modules imported, no vectors yet
        super().__init__(*args)

    def describe(self) -> dict:
        return {"path": str(self.path), "lo": self.lo, "hi": self.hi, "version": self.version}

    def memory(self) -> dict:
        """pid and node; rows and the FAISS index's own bytes (ntotal x d x 4: a flat index of float32); RSS of the
        process, and how much it grew while the shard was built (the shard's share of RSS)."""
        rss = psutil.Process().memory_info().rss
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "rows": len(self),
                "index_bytes": int(self.index.ntotal) * int(self.index.d) * 4, "rss_bytes": rss,
                "rss_shard_bytes": rss - self._rss_before}


def shard_actor_name(group: str, version: str, where: str, i: int, num_shards: int) -> str:
    return f"{group}/{version}/{where}/s{i}of{num_shards}"


class ShardedIndex(IndexRows):
    def __init__(self, root_or_version: str | os.PathLike, num_shards: int = 2,
                 expected_encoder_fingerprint: str | None = None, cpus_per_shard: float = 0.5,
                 group: str | None = None, scope: str = "cluster", resource: str = ""):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if group is not None and (not group or "/" in group):
            raise ValueError(f"group names a run's shard actors: a non-empty name without '/', got {group!r}")
        # the FAISS index is the actors' business: this process reads rows only (ids, texts, mapped embeddings)
        path, manifest, ids, embeddings, passages, _ = read_rows(root_or_version, expected_encoder_fingerprint,
                                                                  mmap=True, with_faiss=False)
        super().__init__(path, manifest, ids, embeddings, passages)
        self.bounds = shard_bounds(len(ids), num_shards)
        self.group = group
        options = {"num_cpus": cpus_per_shard, "max_restarts": -1, "max_task_retries": -1}
        if resource:
            options["resources"] = {resource: 1}
        if scope == "node":     # this node's set: search traffic stays on the node
            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
            where = f"node-{node[:12]}"
        else:                   # one set for the run, spread so that each node holds a fraction of the vectors
            options["scheduling_strategy"] = "SPREAD"
            where = "cluster"
        actor = ray.remote(ShardActor)
        args = [(str(self.path), lo, hi, expected_encoder_fingerprint) for lo, hi in self.bounds]
        if group is None:
            self.names = []
            self.shards = [actor.options(**options).remote(*a) for a in args]
            return
        self.names = [shard_actor_name(group, self.version, where, i, num_shards) for i in range(num_shards)]
        self.shards = [actor.options(**options, name=name, namespace=NAMESPACE, lifetime="detached",
                                     get_if_exists=True).remote(*a) for name, a in zip(self.names, args)]
        # get_if_exists hands back whatever runs under the name: make sure it is this version's rows
        for name, (lo, hi), held in zip(self.names, self.bounds, ray.get([s.describe.remote() for s in self.shards])):
            if (held["path"], held["lo"], held["hi"]) != (str(self.path), lo, hi):
                raise ValueError(f"shard actor {name!r} (namespace {NAMESPACE}) holds rows [{held['lo']}, "
                                 f"{held['hi']}) of {held['path']}, not [{lo}, {hi}) of {self.path}: another index "
                                 f"under the same group name; release_shards({group!r}) removes that group's actors")

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(query_vectors, self.dim, self.path, k)
        q_ref = ray.put(q)
        parts = ray.get([s.search.remote(q_ref, int(k)) for s in self.shards])
        return merge_topk(parts, int(k), self.metric)

    def shard_memory(self) -> list[dict]:
        """`ShardActor.memory()` of every shard, in row order."""
        return ray.get([s.memory.remote() for s in self.shards])

    def shutdown(self, release_shared: bool = False) -> None:
        """Stop searching through these actors. Own actors (no group) are killed. Shared ones are left to the
        others, unless `release_shared`: then this version's set is killed on every node, which only one caller
        may do and only once no worker searches it any more (the refresh switch's rank 0, after a barrier)."""
        if self.group is None:
            for s in self.shards:
                ray.kill(s)
        elif release_shared:
            release_shards(self.group, self.version)
        self.shards = []

    def __repr__(self) -> str:
        return (f"ShardedIndex({self.path}, version={self.version}, count={len(self)}, shards={len(self.bounds)}"
                + (f", group={self.group}" if self.group else "") + ")")


def release_shards(group: str, version: str | None = None) -> list[str]:
    """Kill the shared shard actors of `group` (of one index version, or all of them); returns their names.
    Shard actors are detached: the driver of a run calls this when the run ends, whatever way it ends."""
    if not ray.is_initialized():
        return []
    prefix = f"{group}/" + (f"{version}/" if version else "")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:         # gone since the listing
            pass
    return names


def check_shard_room(index_cfg, train_cpus: float) -> None:
    """Shard actors that cannot be placed leave every worker waiting on its first search, after ingest and
    encoding: refused here with the numbers. Checks one set (index.shard_scope=node needs one per node with
    workers), the CPUs beside the train workers' and the nodes with index.shard_resource."""
    n = index_cfg.search_shards
    if n <= 1:
        return
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    res = index_cfg.shard_resource
    if res:
        have = sum(int(r.get(res, 0.0)) for r in nodes)
        if have < n:
            raise ConfigError(f"index.search_shards={n} shard actors need 1 of index.shard_resource={res!r} each, but "
                              f"the cluster's nodes hold {have} in all; start index nodes with "
                              f"--resources='{{\"{res}\": N}}' or lower index.search_shards")
    need = n * index_cfg.cpus_per_shard
    free = sum(r.get("CPU", 0.0) for r in nodes) - train_cpus
    if need > free + 1e-9:
        raise ConfigError(f"index.search_shards={n} shard actors of index.cpus_per_shard={index_cfg.cpus_per_shard:g} "
                          f"need {need:g} logical CPUs beside the {train_cpus:g} of the train workers, but the cluster "
                          f"has {free + train_cpus:g}; lower index.cpus_per_shard (a reservation, not a thread "
                          f"count) or index.search_shards")


def open_search_index(index_dir: str | os.PathLike, search_shards: int = 1,
                      expected_encoder_fingerprint: str | None = None, group: str | None = None,
                      scope: str = "cluster", cpus_per_shard: float = 0.5, resource: str = "") -> SearchIndex:
    """The index a training worker searches: memory-mapped in this process (FAISS IO_FLAG_MMAP where the type
    allows, embeddings.npy with np.load(mmap_mode)), or, with search_shards > 1, through that many shard actors
    (shared by every worker of `group`, else owned by this process: `shutdown()` them when switching away)."""
    if search_shards > 1:
        return ShardedIndex(index_dir, num_shards=search_shards,
                            expected_encoder_fingerprint=expected_encoder_fingerprint, cpus_per_shard=cpus_per_shard,
                            group=group, scope=scope, resource=resource)
    return load_index(index_dir, expected_encoder_fingerprint=expected_encoder_fingerprint)
