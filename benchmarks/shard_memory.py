"""Memory of index-shard actors (index.search_shards) for 1, 2, 4 shards of one flat index version.

    .venv/bin/python benchmarks/shard_memory.py                       # 50k x 384, shards 1 2 4
    latentrag bench shard_memory --rows 100000 --shards 1 2 4 8

Writes a flat index version of --rows random unit vectors (dim --dim) under a temporary directory, then for each
shard count opens `jobs.sharded_index.ShardedIndex` as the training workers do (a named, shared set) on a local Ray
and asks every actor for `ShardActor.memory()`: the FAISS index's own bytes (ntotal x d x 4), the process's RSS, and
how much RSS grew while the actor built its shard (RSS includes each Ray worker's baseline: Python, numpy, faiss,
pyarrow). Checks that the sharded search returns the same rows as the whole index in one process. Prints a table
and writes --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 2 ** 20


def measure(rows: int, dim: int, shard_counts: list[int], cpus: int) -> dict:
    import ray

    from jobs.sharded_index import ShardedIndex, release_shards
    from pipeline.index import load_index, write_index_version

    if not ray.is_initialized():
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.standard_normal((32, dim)).astype(np.float32)
    out = {"rows": rows, "dim": dim, "index_mb": rows * dim * 4 / MB, "shards": {}}
    with tempfile.TemporaryDirectory() as tmp:
        version = write_index_version(Path(tmp) / "index", emb, [f"p{i}" for i in range(rows)], "flat",
                                      encoder_name="random", encoder_fingerprint="random", corpus_fingerprint="random")
        del emb
        _, ref_rows = load_index(version).search(q, 10)
        for n in shard_counts:
            group = f"shard-memory-{n}-{int(time.time())}"
            t = time.time()
            index = ShardedIndex(version, num_shards=n, cpus_per_shard=min(0.5, cpus / n), group=group)
            try:
                mem = index.shard_memory()         # waits for every actor to have built its shard
                seconds = time.time() - t
                same = bool(np.array_equal(index.search(q, 10)[1], ref_rows))
            finally:
                release_shards(group)
            out["shards"][n] = {"start_seconds": seconds, "same_rows_as_whole_index": same,
                                "per_shard": [{k: m[k] for k in ("rows", "index_bytes", "rss_bytes", "rss_shard_bytes")}
                                              for m in mem]}
            print(f"{n} shard(s): " + "; ".join(f"{m['rows']} rows, FAISS {m['index_bytes'] / MB:.1f} MB, RSS "
                                                f"{m['rss_bytes'] / MB:.0f} MB (+{m['rss_shard_bytes'] / MB:.0f} MB "
                                                f"building it)" for m in mem)
                  + f"; same rows as the whole index: {same}", flush=True)
    return out


def table(res: dict) -> str:
    one = res["shards"].get(1) or res["shards"][min(res["shards"])]
    one_rss = max(m["rss_bytes"] for m in one["per_shard"])
    lines = [f"flat index, {res['rows']} x {res['dim']} float32 ({res['index_mb']:.1f} MB of vectors)", "",
             "| shards | FAISS MB / shard (max) | RSS MB / actor (max) | RSS growth while building, MB (max) | "
             "max RSS / 1-shard RSS | same rows |", "|---|---|---|---|---|---|"]
    for n, r in res["shards"].items():
        ps = r["per_shard"]
        rss = max(m["rss_bytes"] for m in ps)
        lines.append(f"| {n} | {max(m['index_bytes'] for m in ps) / MB:.1f} | {rss / MB:.0f} | "
                     f"{max(m['rss_shard_bytes'] for m in ps) / MB:.0f} | {rss / one_rss:.2f} | "
                     f"{r['same_rows_as_whole_index']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shard_memory.json"))
    args = p.parse_args(argv)
    res = measure(args.rows, args.dim, args.shards, args.cpus)
    print(table(res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
