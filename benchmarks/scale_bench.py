"""Wikipedia-scale index benchmark and plan (issue 21, item 5). One process, ONE FAISS thread, prints a table, writes
JSON (and a plot when matplotlib is there).

Vectors: the real all-MiniLM-L6-v2 embeddings of an existing index (--real-from; 10,544 cmu_qa_wiki passages by
default; when that index is missing, a small one is built with `latentrag index` over generated passages), then
normalised convex mixes of random pairs of them up to N (`encode_bench.index_vectors`, called chunk by chunk so
no N-sized temporaries exist); queries are further mixes (not indexed), the same at every size. Ground truth: exact
top-10 by inner product (`faiss.knn`, FAISS's flat search over the array in blocks: no second copy of the vectors).

Per size N (--sizes, plus --hnsw-sizes):
  IVF-PQ, built as `latentrag index` builds it (pipeline.index.empty_index = the training, add_vectors = the add;
    its defaults: nlist 4*sqrt(N), m 48, nbits 8, train_size 100,000), build seconds (train + add), peak RSS
    above what the process held before the build (psutil, sampled every 20 ms in a thread: tracemalloc does not
    see FAISS's allocations), index bytes (serialized), ms/query in batches of --search-batch and recall@10 at a
    few nprobe, with and without the exact re-scoring (refine_factor 4, the default: re-scores 40 candidates per
    query against the float32 vectors, which LoadedIndex.search reads from embeddings.npy).
  HNSW (M 32, efConstruction 80) at --hnsw-sizes only (its build is the slow one): the same figures, a few efSearch.
Fits: y = a * N^b by least squares on log-log, per figure, extrapolated to 21M and 100M.
Plan: from the fits and the measured H200 encode rates (benchmarks/results/gpu/), the table of the README's
"Wikipedia scale" section: index bytes per shard, shards per node, encode hours per GPU, refresh cost and the
training time between refreshes that keeps refresh under 5% (encode_bench.refresh_costs).

    .venv/bin/python -m benchmarks.scale_bench                       # 1M, 2M, 5M IVF-PQ; HNSW 250k-1M; ~40 min
    .venv/bin/python -m benchmarks.scale_bench --sizes 20000,40000 --hnsw-sizes 20000 --queries 200 \\
        --out /tmp/scale.json                                         # a check of the script, seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.encode_bench import _refresh_rates, _save, generate_passages, index_vectors, refresh_costs

DEFAULT_REAL = "/tmp/latentrag-bench-index-cmu-100-10544"
DEFAULT_GPU_RATES = "benchmarks/results/gpu/encode_gpu_check_h200_actor_threads8.json"   # 4,254 passages/s fp32
PLAN_CORPORA = {"21M": 21_000_000, "100M": 100_000_000}
PLAN_SHARDS = (1, 8, 32)
NODE_GIB = (64, 128, 256)
NODE_USABLE = 0.75          # of a node's memory for index shards: the rest for the OS, Ray's object store, encoders
# nprobe with and without the default 4x re-scoring, and a deeper re-scoring (search-time only: no rebuild)
IVFPQ_SWEEP = ([{"nprobe": n, "refine_factor": r} for r in (1, 4) for n in (16, 32, 64, 128)]
               + [{"nprobe": n, "refine_factor": 16} for n in (16, 64)])
HNSW_SWEEP = [{"efSearch": ef} for ef in (32, 64, 128)]
DEFAULTS = {"ivfpq": {"nprobe": 16, "refine_factor": 4}, "hnsw": {"efSearch": 64}}   # the project's defaults
# fitted figures: CPU seconds of this (the only FAISS) thread, not wall seconds, so that other users of the
# machine's cores do not bend the curves
FITTED = ("build_cpu_seconds", "train_cpu_seconds", "add_cpu_seconds", "build_peak_rss_increase_mb", "index_bytes",
          "search_cpu_ms_per_query", "miss_rate@10")


def _say(msg: str) -> None:
    print(f"[scale_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# fits
# ----------------------------------------------------------------------------------------------------------------

def fit_power_law(ns, ys) -> dict:
    """y = a * n^b by least squares on (log n, log y): {"a", "b", "r2" (in log space), "points"}. Needs >= 2
    distinct n and every y > 0 (a power law has no zero or negative values)."""
    n = np.asarray(ns, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"fit_power_law: ns and ys must be 1-D of one length, got {n.shape} and {y.shape}")
    if len(np.unique(n)) < 2:
        raise ValueError(f"fit_power_law needs at least 2 distinct sizes, got {n.tolist()}")
    if (n <= 0).any() or (y <= 0).any():
        raise ValueError(f"fit_power_law needs positive sizes and values, got n={n.tolist()} y={y.tolist()}")
    lx, ly = np.log(n), np.log(y)
    b, log_a = np.polyfit(lx, ly, 1)
    resid = ly - (log_a + b * lx)
    total = ((ly - ly.mean()) ** 2).sum()
    r2 = 1.0 - (resid ** 2).sum() / total if total > 0 else 1.0
    return {"a": float(math.exp(log_a)), "b": float(b), "r2": round(float(r2), 4), "points": len(n)}


def predict(fit: dict, n: float) -> float:
    return fit["a"] * float(n) ** fit["b"]


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------

def _release_freed_memory() -> None:
    """Hand memory that is freed but still resident back to the OS (glibc keeps it for reuse), so the next build's
    RSS increase counts what it allocates rather than what it reuses from the previous one."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: the increase may then undercount
        pass


class PeakRSS:
    """Peak resident set size of this process while the `with` block runs, sampled every `interval` s in a thread
    (FAISS allocates in C++, where tracemalloc does not look). `.start_mb`, `.peak_mb`, `.increase_mb`."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        _release_freed_memory()
        self._start = self._peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.start_mb = round(self._start / 2 ** 20, 1)
        self.peak_mb = round(self._peak / 2 ** 20, 1)
        self.increase_mb = round((self._peak - self._start) / 2 ** 20, 1)


def real_vectors(real_from: str | None, work: Path) -> tuple[np.ndarray, str]:
    """(float32 [R, d] real MiniLM passage embeddings, where they come from). From the index at `real_from` when it
    exists; else a small index is built with `latentrag index` over 2,000 generated passages (about 2 min on 2
    cores) and reused on the next run."""
    from pipeline.index import load_index

    if real_from and Path(real_from).exists():
        emb = np.asarray(load_index(real_from).embeddings, dtype=np.float32)
        return emb, f"the index {real_from}"
    built = work / "scale-bench-real-2000"
    if not (built / "current").is_file():
        _say(f"{real_from} not found: building real MiniLM embeddings of 2,000 generated passages in {built}")
        generate_passages(work / "scale-bench-passages-2000", 2000, 4)
        proc = subprocess.run([sys.executable, "-m", "jobs.index", "--passages",
                               str(work / "scale-bench-passages-2000"), "--out", str(built)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"latentrag index failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return np.asarray(load_index(built).embeddings, dtype=np.float32), f"2,000 generated passages indexed in {built}"


def make_vectors(n: int, real: np.ndarray, chunk: int = 250_000, seed: int = 0) -> np.ndarray:
    """[n, d] float32: the real vectors first, then `encode_bench.index_vectors`'s mixes of them, made `chunk` at a
    time (its seed = seed + chunk number) and written into one preallocated array."""
    r, d = real.shape
    x = np.empty((n, d), dtype=np.float32)
    x[:min(n, r)] = real[:n]
    for c, lo in enumerate(range(r, n, chunk)):
        m = min(chunk, n - lo)
        part, _, _ = index_vectors(r + m, 0, "real-mix", real, seed=seed + 1 + c)
        x[lo:lo + m] = part[r:]
    return x


def exact_top10(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact top-10 rows by inner product: FAISS's flat search straight over `x` in blocks (faiss.knn makes no
    copy of the database, unlike IndexFlatIP.add)."""
    import faiss

    _, rows = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def _as_loaded(index, kind: str, params: dict, x: np.ndarray):
    """A LoadedIndex over the in-memory index and vectors (what `load_index` returns for a version on disk), so the
    search measured, re-scoring included, is the project's; no version is written (5M vectors are 7.7 GB).
    ids: a range (only its length is used by search); no passage texts."""
    import pyarrow as pa

    from pipeline.index import LoadedIndex

    manifest = {"version": f"scale-{len(x)}", "type": kind, "dim": int(x.shape[1]), "metric": "ip",
                "count": len(x), "params": dict(params)}
    return LoadedIndex(Path(f"<in memory {kind} {len(x)}>"), index, manifest, range(len(x)), x, pa.table({}))


def _clocks() -> tuple[float, float]:
    """(wall, this thread's CPU) seconds: FAISS at one thread computes in the calling thread."""
    return time.perf_counter(), time.thread_time()


def _search(loaded, q: np.ndarray, truth: np.ndarray, batch: int) -> dict:
    """ms per query (wall and CPU) and recall@10, searching q in batches of `batch`."""
    rows = []
    w0, c0 = _clocks()
    for lo in range(0, len(q), batch):
        rows.append(loaded.search(q[lo:lo + batch], 10)[1])
    w1, c1 = _clocks()
    rows = np.concatenate(rows)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]))
    return {"search_ms_per_query": round(1000 * (w1 - w0) / len(q), 4),
            "search_cpu_ms_per_query": round(1000 * (c1 - c0) / len(q), 4), "recall@10": round(recall, 4)}


def _sweep(loaded, kind: str, sweep: list[dict], q: np.ndarray, truth: np.ndarray, batch: int) -> list[dict]:
    from pipeline.index import _apply_search_params

    saved, out = dict(loaded.manifest["params"]), []
    loaded.search(q[:batch], 10)            # warm-up: the first search pays for page faults and lazy set-up
    for setting in sweep:
        loaded.manifest["params"] = {**saved, **setting}
        _apply_search_params(loaded.index, kind, setting)
        out.append({**setting, **_search(loaded, q, truth, batch)})
    loaded.manifest["params"] = saved
    _apply_search_params(loaded.index, kind, saved)
    return out


def _summary(kind: str, sweep: list[dict]) -> dict:
    """The figures at the project's default search settings, which the fits use."""
    row = next(r for r in sweep if all(r[k] == v for k, v in DEFAULTS[kind].items()))
    return {"search_ms_per_query": row["search_ms_per_query"], "search_cpu_ms_per_query":
            row["search_cpu_ms_per_query"], "recall@10": row["recall@10"], "miss_rate@10": round(1 - row["recall@10"], 4)}


def bench_ivfpq(x: np.ndarray, q: np.ndarray, truth: np.ndarray, batch: int, **params) -> dict:
    """IVF-PQ as `latentrag index` builds it: empty_index trains (on at most train_size rows), add_vectors adds."""
    from pipeline.index import add_vectors, empty_index, serialize_index

    with PeakRSS() as mem:
        t0 = _clocks()
        empty, p = empty_index("ivfpq", len(x), x, threads=1, **params)
        t1 = _clocks()
        index = add_vectors(empty, x, threads=1)
        t2 = _clocks()
    del empty
    size = int(serialize_index(index).nbytes)
    sweep = _sweep(_as_loaded(index, "ivfpq", p, x), "ivfpq", IVFPQ_SWEEP, q, truth, batch)
    return {"params": p, "train_seconds": round(t1[0] - t0[0], 2), "add_seconds": round(t2[0] - t1[0], 2),
            "build_seconds": round(t2[0] - t0[0], 2), "train_cpu_seconds": round(t1[1] - t0[1], 2),
            "add_cpu_seconds": round(t2[1] - t1[1], 2), "build_cpu_seconds": round(t2[1] - t0[1], 2),
            "rss_before_mb": mem.start_mb, "build_peak_rss_mb": mem.peak_mb,
            "build_peak_rss_increase_mb": mem.increase_mb, "index_bytes": size,
            "index_bytes_per_vector": round(size / len(x), 2), **_summary("ivfpq", sweep), "sweep": sweep}


def bench_hnsw(x: np.ndarray, q: np.ndarray, truth: np.ndarray, batch: int, **params) -> dict:
    from pipeline.index import build_faiss_index, resolve_params, serialize_index

    p = resolve_params("hnsw", len(x), x.shape[1], **params)
    with PeakRSS() as mem:
        t0 = _clocks()
        index = build_faiss_index(x, "hnsw", threads=1, **p)
        t1 = _clocks()
    size = int(serialize_index(index).nbytes)
    sweep = _sweep(_as_loaded(index, "hnsw", p, x), "hnsw", HNSW_SWEEP, q, truth, batch)
    return {"params": p, "build_seconds": round(t1[0] - t0[0], 2), "build_cpu_seconds": round(t1[1] - t0[1], 2),
            "rss_before_mb": mem.start_mb,
            "build_peak_rss_mb": mem.peak_mb, "build_peak_rss_increase_mb": mem.increase_mb, "index_bytes": size,
            "index_bytes_per_vector": round(size / len(x), 2), **_summary("hnsw", sweep), "sweep": sweep}


def _fits_memory(n: int, d: int, hnsw: bool) -> tuple[bool, str]:
    """Will a size fit in what the machine has free? The vectors, plus check_embeddings' isfinite mask (1 byte a
    value) and FAISS's working memory, plus HNSW's own copy of the vectors; 25% margin for other users."""
    import psutil

    need = n * d * 4 * (1.0 + 0.25 + (1.0 if hnsw else 0.0)) * 1.25 + 1e9
    avail = psutil.virtual_memory().available
    return need < avail, f"needs about {need / 2 ** 30:.1f} GiB, {avail / 2 ** 30:.1f} GiB available"


def run_sizes(x_real: np.ndarray, sizes: list[int], hnsw_sizes: list[int], queries: int, batch: int,
              results: dict, out: Path, ivfpq_params: dict | None = None) -> None:
    """Measure every size (ascending), saving the JSON after each; frees the vectors between sizes. A size that
    would not fit in free memory stops the run there, recorded under results["stopped"]. Index kinds that
    results["sizes"] already holds for a size (a resumed run) are not measured again."""
    import faiss

    faiss.omp_set_num_threads(1)
    _, q, _ = index_vectors(len(x_real), queries, "real-mix", x_real, seed=10_000)
    d = x_real.shape[1]
    done = {r["vectors"]: r for r in results["sizes"]}
    for n in sorted(set(sizes) | set(hnsw_sizes)):
        kinds = [k for k in ["ivfpq"] + (["hnsw"] if n in hnsw_sizes else []) if k not in done.get(n, {})]
        if not kinds:
            continue
        ok, why = _fits_memory(n, d, "hnsw" in kinds)
        if not ok:
            results["stopped"] = f"stopped before {n} vectors: {why}"
            _say(results["stopped"])
            _save(results, out)
            return
        t0 = time.perf_counter()
        x = make_vectors(n, x_real)
        made = time.perf_counter() - t0
        t0 = _clocks()
        truth = exact_top10(x, q)
        t1 = _clocks()
        row = done.get(n) or {"vectors": n}
        row.update({"make_vectors_seconds": round(made, 1), "loadavg_before": list(os.getloadavg()),
                    "exact_search_ms_per_query": round(1000 * (t1[0] - t0[0]) / len(q), 3),
                    "exact_search_cpu_ms_per_query": round(1000 * (t1[1] - t0[1]) / len(q), 3)})
        for kind in kinds:
            _say(f"{n} vectors: {kind} build ({why})")
            if kind == "ivfpq":
                row[kind] = bench_ivfpq(x, q, truth, batch, **(ivfpq_params or {}))
            else:
                row[kind] = bench_hnsw(x, q, truth, batch)
            r = row[kind]
            _say(f"  {kind}: build {r['build_seconds']} s ({r['build_cpu_seconds']} CPU s), "
                 f"+{r['build_peak_rss_increase_mb']} MB, {r['index_bytes'] / 2 ** 20:.1f} MiB, "
                 f"{r['search_cpu_ms_per_query']} CPU ms/query, "
                 f"recall@10 {r['recall@10']}")
        row["loadavg_after"] = list(os.getloadavg())
        if n not in done:
            results["sizes"].append(row)
        results["sizes"].sort(key=lambda r: r["vectors"])
        del x, truth
        gc.collect()
        _save(results, out)


def fits(sizes: list[dict]) -> dict:
    """Per kind and figure, the power-law fit over the measured sizes and its value at 21M and 100M. IVF-PQ is fitted
    over the sizes above its training sample when there are 2 or more (there k-means runs on train_size vectors, as
    it will at 21M and 100M; below, on all N of them: another curve)."""
    out = {}
    for kind in ("ivfpq", "hnsw"):
        rows = [r for r in sizes if kind in r]
        if kind == "ivfpq":
            above = [r for r in rows if r["vectors"] > r[kind]["params"]["train_size"]]
            rows = above if len(above) >= 2 else rows
        if len(rows) < 2:
            continue
        out[kind] = {}
        for key in FITTED:
            pts = [(r["vectors"], r[kind][key]) for r in rows if key in r[kind] and r[kind][key] > 0]
            if len({n for n, _ in pts}) < 2:
                continue
            f = fit_power_law(*zip(*pts))
            out[kind][key] = {**f, "at": {name: predict(f, n) for name, n in PLAN_CORPORA.items()}}
    return out


# ----------------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------------

def plan(results: dict, gpu_results: str, dim: int = 384) -> dict:
    """The README's Wikipedia-scale table from the IVF-PQ fits and the measured H200 encode rates.

    Per corpus: IVF-PQ bytes (the fit; also the arithmetic m + 8 bytes a vector + centroids as a check), the float32
    and float16 vectors the exact re-scoring reads (embeddings.npy; memory-mapped, but random reads, so keep them in
    RAM or page cache), bytes per shard for S shards, how many such shards a node of 64/128/256 GiB holds (75% of it
    for shards), build core-hours at the project's defaults, encode hours on one GPU, and refresh_costs' minutes per
    refresh on 1/8/64 GPUs with the training time between refreshes that keeps refresh under 5%."""
    from pipeline.index import resolve_params

    fit = results["fits"].get("ivfpq", {})
    hf = results["fits"].get("hnsw", {})
    rows = [r for r in results["sizes"] if "ivfpq" in r]
    p = rows[-1]["ivfpq"]["params"] if rows else {"m": 48}
    rates = _refresh_rates({}, [gpu_results])
    refresh = refresh_costs(rates)
    corpora = {}
    for name, n in PLAN_CORPORA.items():
        nlist = resolve_params("ivfpq", n, dim)["nlist"]
        pq_bytes = predict(fit["index_bytes"], n) if "index_bytes" in fit else None
        arithmetic = n * (p["m"] + 8) + nlist * dim * 4
        vec32, vec16 = n * dim * 4, n * dim * 2
        shards = []
        for s in PLAN_SHARDS:
            per = {"pq_only": (pq_bytes or arithmetic) / s, "pq_and_float16_vectors": ((pq_bytes or arithmetic) + vec16) / s,
                   "pq_and_float32_vectors": ((pq_bytes or arithmetic) + vec32) / s}
            shards.append({"shards": s, "bytes_per_shard": {k: int(v) for k, v in per.items()},
                           "shards_per_node": {f"{g} GiB": {k: int(NODE_USABLE * g * 2 ** 30 // v)
                                                            for k, v in per.items()} for g in NODE_GIB}})
        nodes = {f"{g} GiB": {k: math.ceil(v / (NODE_USABLE * g * 2 ** 30)) for k, v in
                              (("pq_only", pq_bytes or arithmetic), ("pq_and_float16_vectors", (pq_bytes or arithmetic) + vec16),
                               ("pq_and_float32_vectors", (pq_bytes or arithmetic) + vec32))} for g in NODE_GIB}
        # the build is train + add, two power laws: sum their fits (one fit of the sum bends at the wrong place)
        build = {k.replace("_cpu_seconds", ""): float(f"{predict(fit[k], n) / 3600:.4g}")
                 for k in ("train_cpu_seconds", "add_cpu_seconds") if k in fit}
        if len(build) == 2:
            build["build"] = float(f"{build['train'] + build['add']:.4g}")
        encode = {rate: round(n / r["passages_per_s"] / 3600, 2) for rate, r in rates.items()}
        # k-means wants >= 39 points per list (FAISS warns below); the default 100,000 gives 21M's 18,330 lists 5.5
        # each. Its cost is (sample x nlist) distance products, so scale the largest measured training by that.
        wanted = 39 * nlist
        if rows:
            last = rows[-1]["ivfpq"]
            per_unit = last["train_cpu_seconds"] / (min(last["params"]["train_size"], rows[-1]["vectors"])
                                                   * last["params"]["nlist"])
            build["train_at_39_per_list"] = float(f"{per_unit * wanted * nlist / 3600:.4g}")
        corpora[name] = {
            "passages": n, "nlist_default": nlist,
            "ivfpq_bytes_fit": int(pq_bytes) if pq_bytes else None, "ivfpq_bytes_arithmetic": int(arithmetic),
            "float32_vectors_bytes": vec32, "float16_vectors_bytes": vec16, "shards": shards, "min_nodes": nodes,
            "build_core_hours": build, "train_size_for_39_per_list": wanted,
            "hnsw_fit": {k: float(f"{predict(hf[k], n):.4g}") for k in ("index_bytes", "build_cpu_seconds")
                         if k in hf},
            "search_cpu_ms_per_query": float(f"{predict(fit['search_cpu_ms_per_query'], n):.4g}")
            if "search_cpu_ms_per_query" in fit else None,
            "encode_hours_one_gpu": encode,
            "refresh": [row for row in refresh["table"] if row["passages"] == n]}
    return {"node_usable_share": NODE_USABLE, "gpu_rates": rates, "ivfpq_m": p["m"], "dim": dim, "max_share_of_training":
            refresh["max_share_of_training"], "corpora": corpora,
            "assumptions": "IVF-PQ at the project's defaults (nlist 4*sqrt(N), m 48, nbits 8, train_size 100,000); "
                           "bytes and build time from the power-law fits of the measured sizes; a refresh's cost is "
                           "its GPU encode (data-parallel, one encoder actor per GPU, linear); the IVF-PQ rebuild "
                           "runs on CPU nodes beside training (it delays the switch, it takes no GPU)"}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------

def _gib(b: float) -> str:
    return f"{b / 2 ** 30:.3g}"


def _h(hours: float) -> str:
    return f"{hours * 60:.3g} min" if hours < 1 else f"{hours:.3g} h"


def markdown(r: dict) -> str:
    """The README's tables (measured sizes, then the plan), made from the JSON alone."""
    lines = ["| vectors | IVF-PQ build, CPU s (train + add) | build peak RSS above the vectors | IVF-PQ bytes | "
             "CPU ms/query, nprobe 16 + 4x re-scoring | recall@10 at nprobe 16 / 32 / 64 / 128 (4x re-scoring; "
             "nprobe 16 without) | HNSW build, CPU s | HNSW bytes | HNSW recall@10 (efSearch 64) |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in r["sizes"]:
        i, h = row.get("ivfpq"), row.get("hnsw")
        rec = " / ".join(str(s["recall@10"]) for s in i["sweep"] if s["refine_factor"] == 4)
        raw = next(s["recall@10"] for s in i["sweep"] if s["refine_factor"] == 1 and s["nprobe"] == 16)
        lines.append(f"| {row['vectors']:,} | {i['build_cpu_seconds']:.4g} ({i['train_cpu_seconds']:.4g} + "
                     f"{i['add_cpu_seconds']:.4g}) | {i['build_peak_rss_increase_mb']:.0f} MB | "
                     f"{i['index_bytes'] / 2 ** 20:.1f} MiB | {i['search_cpu_ms_per_query']:.3g} | {rec} ({raw}) | "
                     + (f"{h['build_cpu_seconds']:.4g} | {h['index_bytes'] / 2 ** 20:.0f} MiB | {h['recall@10']} |"
                        if h else "- | - | - |"))
    fits_line = "; ".join(f"{kind} {key.replace('_cpu', '')} N^{f['b']:.2f}" for kind, fs in r["fits"].items()
                          for key, f in fs.items() if key != "miss_rate@10")
    lines += ["", f"Fits y = a N^b over the measured sizes: {fits_line}.", ""]
    if "plan" not in r:
        return "\n".join(lines)
    pl = r["plan"]
    cs = pl["corpora"]
    names = list(cs)
    fp32 = next(k for k in pl["gpu_rates"] if k.endswith("fp32"))
    fp16 = next((k for k in pl["gpu_rates"] if k.endswith("fp16")), None)

    def row(label: str, f) -> str:
        return f"| {label} | " + " | ".join(f(cs[n]) for n in names) + " |"

    def per_shard(c, s, key):
        return next(x for x in c["shards"] if x["shards"] == s)[key]

    lines += ["| IVF-PQ, project defaults | " + " | ".join(f"{n} passages" for n in names) + " |",
              "|---|" + "---:|" * len(names),
              row(f"nlist (4 sqrt N); m {pl['ivfpq_m']}, nbits 8", lambda c: f"{c['nlist_default']:,}"),
              row(f"IVF-PQ index (fit; arithmetic N x {pl['ivfpq_m'] + 8} B + centroids)",
                  lambda c: f"{_gib(c['ivfpq_bytes_fit'])} GiB ({_gib(c['ivfpq_bytes_arithmetic'])})"),
              row("vectors the 4x re-scoring reads (float32 / float16)",
                  lambda c: f"{_gib(c['float32_vectors_bytes'])} / {_gib(c['float16_vectors_bytes'])} GiB")]
    for s in PLAN_SHARDS[1:]:
        lines.append(row(f"per shard, {s} shards: PQ only / with float16 / float32 vectors", lambda c, s=s: " / ".join(
            _gib(per_shard(c, s, "bytes_per_shard")[k]) for k in ("pq_only", "pq_and_float16_vectors",
                                                                  "pq_and_float32_vectors")) + " GiB"))
    for s in PLAN_SHARDS[1:]:
        lines.append(row(f"shards of {s} per 64 / 128 / 256 GiB node, with float32 vectors ({NODE_USABLE:.0%} "
                         "of the node)", lambda c, s=s: " / ".join(
                             str(v["pq_and_float32_vectors"]) for v in per_shard(c, s, "shards_per_node").values())))
    lines += [row("nodes of 64 / 128 / 256 GiB for the whole index with float32 vectors",
                  lambda c: " / ".join(str(v["pq_and_float32_vectors"]) for v in c["min_nodes"].values())),
              row("IVF-PQ build, one core (train + add)", lambda c: f"{_h(c['build_core_hours']['build'])} "
                  f"({_h(c['build_core_hours']['train'])} + {_h(c['build_core_hours']['add'])})"),
              row("IVF-PQ training, one core, on 39 points per list instead (k-means cost x sample x nlist)",
                  lambda c: f"{_h(c['build_core_hours']['train_at_39_per_list'])} on "
                            f"{c['train_size_for_39_per_list'] / 1e6:.3g}M"),
              row("HNSW instead (M 32; fits): bytes, build on one core", lambda c: (
                  f"{_gib(c['hnsw_fit']['index_bytes'])} GiB, {_h(c['hnsw_fit']['build_cpu_seconds'] / 3600)}"
                  if len(c["hnsw_fit"]) == 2 else "not measured")),
              row("search, one core, nprobe 16 + 4x re-scoring (fit)", lambda c: f"{c['search_cpu_ms_per_query']:.3g} ms"),
              row(f"encode on one H200, fp32 ({pl['gpu_rates'][fp32]['passages_per_s']:,.0f} passages/s per actor)",
                  lambda c: _h(c["encode_hours_one_gpu"][fp32]))]
    if fp16:
        lines.append(row(f"encode on one H200, fp16 ({pl['gpu_rates'][fp16]['passages_per_s']:,.0f}/s)",
                         lambda c: _h(c["encode_hours_one_gpu"][fp16])))

    def refresh(c, what):
        rows = [x for x in c["refresh"] if x["rate"] == fp32]
        return " / ".join(_h(x["refresh_minutes"] / 60) if what == "cost" else
                          _h(x["min_training_hours_between_refreshes"]) for x in rows)

    lines += [row("one refresh (full re-encode, fp32) on 1 / 8 / 64 H200", lambda c: refresh(c, "cost")),
              row(f"training between refreshes for refresh <= {pl['max_share_of_training']:.0%} (1 / 8 / 64)",
                  lambda c: refresh(c, "every"))]
    return "\n".join(lines)


def table(r: dict) -> str:
    lines = [f"vectors: {r['vectors_are']}", f"one FAISS thread; {r['queries']} queries, batches of "
             f"{r['search_batch']}; loadavg at start {r['machine_load_at_start']}", "",
             "CPU seconds of the one FAISS thread (wall seconds in the JSON); defaults: nprobe 16 + 4x re-scoring, "
             "efSearch 64",
             "        N  kind  build CPU s  (train / add)   peak RSS +MB   index MiB   CPU ms/query  recall@10"]
    for row in r["sizes"]:
        for kind in ("ivfpq", "hnsw"):
            if kind not in row:
                continue
            k = row[kind]
            split = f"({k['train_cpu_seconds']} / {k['add_cpu_seconds']})" if kind == "ivfpq" else ""
            lines.append(f"{row['vectors']:>9}  {kind:<5} {k['build_cpu_seconds']:>11}  {split:<18} "
                         f"{k['build_peak_rss_increase_mb']:>10}   {k['index_bytes'] / 2 ** 20:>9.1f}   "
                         f"{k['search_cpu_ms_per_query']:>12}  {k['recall@10']:>9}")
    lines.append("")
    for row in r["sizes"]:
        for kind in ("ivfpq", "hnsw"):
            if kind in row:
                lines.append(f"{row['vectors']:>9} {kind:<6} " + "  ".join(
                    "/".join(str(v) for k2, v in s.items() if k2 in ("nprobe", "refine_factor", "efSearch"))
                    + f": {s['recall@10']} {s['search_cpu_ms_per_query']}ms" for s in row[kind]["sweep"]))
    if r.get("stopped"):
        lines.append(r["stopped"])
    lines += ["", "fits y = a * N^b (log-log least squares) and their value at 21M / 100M:"]
    for kind, fs in r["fits"].items():
        for key, f in fs.items():
            lines.append(f"  {kind:<6} {key:<28} b {f['b']:.3f}  r2 {f['r2']:.3f}  "
                         f"21M {f['at']['21M']:.4g}  100M {f['at']['100M']:.4g}")
    if "plan" in r:
        lines += ["", "plan (IVF-PQ, project defaults):"]
        for name, c in r["plan"]["corpora"].items():
            lines.append(f"  {name}: IVF-PQ {_gib(c['ivfpq_bytes_fit'] or 0)} GiB (arithmetic "
                         f"{_gib(c['ivfpq_bytes_arithmetic'])}), + float32 vectors {_gib(c['float32_vectors_bytes'])}"
                         f" GiB; build core-hours {c['build_core_hours']}; encode hours on one GPU "
                         f"{c['encode_hours_one_gpu']}")
            for s in c["shards"]:
                b = s["bytes_per_shard"]
                lines.append(f"    {s['shards']:>3} shards: {_gib(b['pq_only'])} GiB PQ, "
                             f"{_gib(b['pq_and_float32_vectors'])} GiB with float32 vectors per shard; shards per "
                             f"node (with vectors) " + ", ".join(f"{g}: {v['pq_and_float32_vectors']}"
                                                                  for g, v in s["shards_per_node"].items()))
            for row in c["refresh"]:
                lines.append(f"    refresh {row['rate'][:34]:<34} on {row['devices']:>2} GPUs: "
                             f"{row['refresh_minutes']:.4g} min, every >= "
                             f"{row['min_training_hours_between_refreshes']:.3g} h of training")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> str | None:
    """Build seconds, build memory, ms/query and index bytes against N, log-log, with the fitted lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = ("build_cpu_seconds", "build_peak_rss_increase_mb", "search_cpu_ms_per_query", "index_bytes")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    grid = np.geomspace(min(x["vectors"] for x in r["sizes"]), 100_000_000, 50)
    for ax, key in zip(axes, keys):
        for kind, colour in (("ivfpq", "C0"), ("hnsw", "C1")):
            pts = [(x["vectors"], x[kind][key]) for x in r["sizes"] if kind in x]
            if not pts:
                continue
            ax.loglog(*zip(*pts), "o", color=colour, label=kind)
            f = r["fits"].get(kind, {}).get(key)
            if f:
                ax.loglog(grid, [predict(f, g) for g in grid], "--", color=colour, lw=1,
                          label=f"fit N^{f['b']:.2f}")
        for n in PLAN_CORPORA.values():
            ax.axvline(n, color="grey", lw=0.5)
        ax.set_xlabel("vectors")
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _sizes(text: str) -> list[int]:
    out = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1].lower(), 1)
        try:
            out.append(int(float(part[:-1] if mult > 1 else part) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {part!r} (e.g. 250k, 1M, 2000000)") from None
    if any(n < 1000 for n in out):
        raise argparse.ArgumentTypeError(f"sizes below 1000 vectors: {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_sizes, default=_sizes("1M,2M,5M"), help="IVF-PQ sizes (default 1M,2M,5M)")
    ap.add_argument("--hnsw-sizes", type=_sizes, default=_sizes("250k,500k,1M"),
                    help="HNSW sizes; IVF-PQ is built there too (default 250k,500k,1M; '' for none)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--search-batch", type=int, default=100, help="queries per search call (default 100)")
    ap.add_argument("--real-from", default=DEFAULT_REAL, help="index whose vectors are the real base")
    ap.add_argument("--gpu-results", default=DEFAULT_GPU_RATES, help="encode_gpu_check JSON with the H200 rates")
    ap.add_argument("--ivfpq-train-size", type=int, default=None,
                    help="IVF-PQ training sample (default: the project's, 100,000)")
    ap.add_argument("--work-dir", default=tempfile.gettempdir(), help="where a missing real index is built")
    ap.add_argument("--out", default="benchmarks/results/scale/scale_bench.json")
    ap.add_argument("--plot", default=None, help="plot path (default: next to --out, .png)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the sizes --out already holds (same --queries and real vectors), measure the rest, "
                         "then fit and plan again (with nothing left to measure: only the fits and the plan)")
    args = ap.parse_args(argv)
    if not Path(args.gpu_results).is_file():
        ap.error(f"--gpu-results {args.gpu_results}: no such file")
    if args.queries < 1 or args.search_batch < 1:
        ap.error("--queries and --search-batch must be >= 1")
    out = Path(args.out)
    t_start = time.perf_counter()
    real, source = real_vectors(args.real_from, Path(args.work_dir))
    params = {"train_size": args.ivfpq_train_size} if args.ivfpq_train_size else {}
    results = {"complete": False, "command": "python -m benchmarks.scale_bench " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "vectors_are": f"{len(real)} real all-MiniLM-L6-v2 embeddings from {source} + normalised convex "
                              f"mixes a*x_i+(1-a)*x_j (a~U(0.2,0.8)) of random pairs of them "
                              f"(encode_bench.index_vectors) up to N; queries: {args.queries} further such mixes "
                              f"(not indexed), the same at every size; truth: exact inner-product top-10",
               "real_vectors": len(real), "dim": int(real.shape[1]), "queries": args.queries,
               "search_batch": args.search_batch, "faiss_threads": 1, "cpu_count": os.cpu_count(),
               "machine_load_at_start": [round(v, 2) for v in os.getloadavg()], "sizes": []}
    if args.resume and out.is_file():
        before = json.loads(out.read_text())
        same = {k: before.get(k) for k in ("vectors_are", "queries", "search_batch")} == {
            k: results[k] for k in ("vectors_are", "queries", "search_batch")}
        if not same:
            ap.error(f"--resume: {out} was measured with other vectors, --queries or --search-batch")
        results["sizes"] = before["sizes"]
        results["command"] = before["command"] + " ; then " + results["command"]
        results["machine_load_at_start"] = before["machine_load_at_start"]
    run_sizes(real, args.sizes, args.hnsw_sizes, args.queries, args.search_batch, results, out, params)
    results["fits"] = fits(results["sizes"])
    if "ivfpq" in results["fits"]:
        results["plan"] = plan(results, args.gpu_results, int(real.shape[1]))
    results["plot"] = plot(results, Path(args.plot) if args.plot else out.with_suffix(".png"))
    if results["plot"] is None:
        _say("matplotlib is not installed: no plot")
    results["machine_load_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    results["complete"] = "stopped" not in results
    _save(results, out)
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(table(results))
    print(f"results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
