"""Where index-shard actors land on a two-node Ray cluster started here (ray.cluster_utils.Cluster: a head and a
worker node of 1 CPU each, the worker node with the custom resource `index`), for each placement setting:

    .venv/bin/python benchmarks/shard_placement.py            # ~45 s on 2 cores

- scope cluster (SPREAD): 4 shards, expected 2 per node;
- index.shard_resource=index: 4 shards, all on the node that has `index`;
- scope node: a task pinned on each node opens 2 shards; each node gets its own set, on itself.
Every set's search is compared with the whole index in one process. Prints one line per setting and writes --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs.sharded_index import ShardedIndex, release_shards
    from pipeline.index import load_index, write_index_version

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shard_placement.json"))
    args = p.parse_args(argv)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"index": 4})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    out: dict = {}
    try:
        nodes = {n["NodeID"]: ("index node" if n["Resources"].get("index") else "other node")
                 for n in ray.nodes() if n["Alive"]}
        rng = np.random.default_rng(0)
        emb = rng.standard_normal((4000, 32)).astype(np.float32)
        q = rng.standard_normal((5, 32)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            version = write_index_version(Path(tmp) / "index", emb, [f"p{i}" for i in range(4000)], "flat")
            ref = load_index(version).search(q, 8)[1]

            def record(setting, index):
                where = [nodes[m["node_id"]] for m in index.shard_memory()]
                out[setting] = {"shards_on": where, "same_rows": bool(np.array_equal(index.search(q, 8)[1], ref))}
                print(f"{setting}: {where}, same rows as the whole index: {out[setting]['same_rows']}", flush=True)

            for setting, kwargs in (("cluster (SPREAD)", {}), ("shard_resource=index", {"resource": "index"})):
                group = "placement-" + ("spread" if not kwargs else "resource")
                try:
                    record(setting, ShardedIndex(version, 4, cpus_per_shard=0.1, group=group, **kwargs))
                finally:
                    release_shards(group)

            @ray.remote(num_cpus=0)
            def worker(path):
                index = ShardedIndex(path, 2, cpus_per_shard=0.1, group="placement-node", scope="node")
                return ([nodes[m["node_id"]] for m in index.shard_memory()],
                        bool(np.array_equal(index.search(q, 8)[1], ref)))

            try:
                for node, name in nodes.items():
                    pin = NodeAffinitySchedulingStrategy(node, soft=False)
                    where, same = ray.get(worker.options(scheduling_strategy=pin).remote(str(version)))
                    out[f"node scope, worker on the {name}"] = {"shards_on": where, "same_rows": same}
                    print(f"node scope, worker on the {name}: {where}, same rows as the whole index: {same}", flush=True)
            finally:
                release_shards("placement-node")
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
