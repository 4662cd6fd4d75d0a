"""`latentrag encode`: encode a passage directory into embedding shards with Ray Data, resumably.

Recipe: the row groups of the passage shards not yet encoded, listed in the driver from the Parquet footers ->
Ray Data CPU tasks that read them and tokenize (map_batches over those items, each reserving read_cpus; not
read_parquet, whose listing task always takes a whole CPU): `--batch-size` rows at a time sorted by token count and
cut into forward-pass batches of at most `--encode-tokens` padded tokens (and `--encode-batch-size` rows) ->
map_batches(EncoderActor: an actor pool of --num-actors, each loading the encoder once and only running the model on
those token batches, on --threads-per-actor torch threads, on CPU or GPU, optionally bfloat16 and torch.compile on
GPU) -> the driver streams the encoded blocks (`iter_batches`) into one output file per input shard,
``emb-<input shard name>.parquet`` (id, embedding), written under a temporary name and renamed into place only when
every row of that input shard is in it. A crashed or interrupted encode therefore keeps the shards it finished, and a
rerun with the same settings skips them. Memory: a task holds one read block, an actor one token block at a time,
the driver one open Parquet writer per input shard in flight (a row group each); none holds the corpus.

Files under --out (encode.json, emb-<shard>.parquet, embeddings.json) and their readers (`load_embeddings`,
`iter_embedding_shards`): pipeline/embeddings.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import write_json
from pipeline.embeddings import (DTYPES, PATH_COL, SETTINGS_NAME, SUMMARY_NAME, ShardWriter,
                                 encode_settings, passage_files, prepare_out_dir, shard_output_name, shard_records,
                                 write_empty_shard)
# the embeddings-directory format moved to pipeline/embeddings.py; what callers imported from here stays importable
from pipeline.embeddings import EmbeddingsFormatError, load_embeddings  # noqa: F401
from pipeline.index import passage_text
from pipeline.token_batches import COMPUTE_DTYPES, encoder_max_length, load_tokenizer, pad_batch, tokenize_window

_RSS_COL = "__encoder_peak_rss_kb"
_ACTOR_COL = "__encoder_actor"          # the actor's pid
_BUSY_COL = "__encoder_busy_s"          # seconds the actor has spent in __call__ so far (cumulative)
_INIT_COL = "__encoder_init_s"          # seconds its __init__ took (imports + model load)
_STARTED_COL = "__encoder_started_at"   # time.time() when its __init__ began
_PROBE_COL = "__encoder_probe_cosine"   # bfloat16/float16 actors: min cosine to float32 on their first batch
_TB_COL = "__token_batch"               # forward-pass batch of a row, planned by the tokenize stage
_TOK_COL = "__tokenize_s"               # seconds the tokenize stage spent per row (its window's time / rows)
# padded tokens per forward pass, by actor device: on CPU 2048 (~26 passages of 77 tokens) ran 1.2x faster than
# 8192 in the actor (cache-sized matmuls, less padding; one thread, alternated runs); on a GPU about what 256
# rows of 128 tokens were before (not tuned yet: benchmarks/encode_gpu_check.py measures it)
DEFAULT_ENCODE_TOKENS = {"cpu": 2048, "cuda": 32768}
DEFAULT_ENCODE_BATCH_SIZE = 256         # and at most this many rows
# CPU actor pool when none is asked: one one-thread actor per logical CPU (two one-thread processes ran MiniLM 1.08x
# faster than one two-thread process on this 2-core machine: small matmuls split badly across threads), at most
# this many actors (each holds a model: ~0.9 GB RSS for MiniLM); past that, more threads per actor
MAX_AUTO_CPU_ACTORS = 8
# blocks per actor at least, when the corpus is small for `block_mb`, so the pool's tail (one actor still on its
# queued blocks while the others idle) stays short. 20k passages, 2 CPU actors: 8 left them idle 23% of the encode,
# 16 6% (start-up included); 32 (one block in flight) ran 8% more actor-seconds (shorter sort windows)
MIN_BLOCKS_PER_ACTOR = 16
MIN_AUTO_BLOCK_MB = 0.1                 # but not below ~200 passages a block: per-block overheads, shorter sort windows
_READ_RETRIES = 3                       # a read task (one row group) is retried this often
MIN_LOW_PRECISION_COSINE = 0.999        # bfloat16/float16 vectors must stay this close to float32's
_batch_numbers = itertools.count()      # per process: tokenize windows, so batch numbers never repeat in a block


def _tokenize_block(batch: pa.Table, tokenizer_path: str, max_length: int, window: int, max_tokens: int,
                    max_rows: int) -> Iterator[pa.Table]:
    """Ray Data tokenize stage (CPU tasks, fused with the reads): `window` rows at a time, passage texts -> token
    ids (list<int32>, unpadded), sorted by token count and numbered into forward-pass batches of at most
    `max_tokens` padded tokens and `max_rows` rows (pipeline/token_batches.py). Output columns: id, path,
    input_ids, the batch number and the tokenize seconds per row; rows are in token-length order, which the
    index build undoes (`gather_checked`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")    # parallelism comes from the tasks
    tokenizer = load_tokenizer(tokenizer_path)
    titles = batch.column("title").to_pylist() if "title" in batch.column_names else None
    texts = batch.column("text").to_pylist()
    for lo in range(0, batch.num_rows, window):
        t0 = time.perf_counter()
        hi = min(lo + window, batch.num_rows)
        strings = [passage_text(titles[i] if titles else "", texts[i] or "") for i in range(lo, hi)]
        order, ids, batches = tokenize_window(tokenizer, strings, max_length, max_tokens, max_rows)
        base = next(_batch_numbers) << 32               # unique across this process's windows
        take = pa.array(order + lo, pa.int64())
        cols = {"id": batch.column("id").take(take), PATH_COL: batch.column(PATH_COL).take(take),
                "input_ids": pa.array(ids, pa.list_(pa.int32())), _TB_COL: pa.array(batches.astype(np.int64) + base)}
        cols[_TOK_COL] = pa.array(np.full(hi - lo, (time.perf_counter() - t0) / (hi - lo)))
        yield pa.table(cols)


class EncoderActor:
    """Ray Data callable class: loads the passage encoder once per actor, then runs it on token batches.

    Input batch columns (the tokenize stage's output): id, path, input_ids (list<int32>, unpadded), the
    forward-pass batch number of each row (consecutive rows of one number are one forward pass) and the tokenize
    seconds. Output: id (string), embedding (fixed_size_list<dtype>[dim]), path, the tokenize seconds, and for the
    run summary the actor's pid, peak RSS so far (KiB), seconds spent in __call__ so far, the start time and
    duration of its __init__ (start-up and model load) and, for a low-precision actor, its probe cosine.
    `device`: "cpu", "cuda" or "auto" (cuda when torch sees a GPU). `compute_dtype`: the model's weights and
    activations; bfloat16/float16 on GPUs only, and only when the first batch's vectors stay within cosine
    MIN_LOW_PRECISION_COSINE of float32's (checked once per actor, else RuntimeError). `compile`: torch.compile the
    model (GPU only, needs triton).
    """

    def __init__(self, encoder: str | None = "minilm", threads: int = 2, dtype: str = "float32",
                 device: str = "auto", compute_dtype: str = "float32", compile: bool = False):
        self.started_at = time.time()
        t0 = time.perf_counter()
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_compute_settings(compute_dtype, compile, device)
        if device == "cuda" and compute_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"compute_dtype=bfloat16: {torch.cuda.get_device_name()} has no bfloat16 support "
                             "(use float16 or float32)")
        torch.set_num_threads(max(1, int(threads)))

        from pipeline.models.retriever import load_encoder, resolve_encoder_path

        self.torch = torch
        # a directory saved by save_encoder carries its pooling/normalisation; anything else gets TextEncoder's
        self.encoder = load_encoder(resolve_encoder_path(encoder))
        self.encoder.to(device)
        self.encoder.eval()
        self.device = device
        self.pad_id = self.encoder.tokenizer.pad_token_id or 0
        self.compute_dtype, self.compile = compute_dtype, compile
        self.model = self.encoder.model                 # fp32 until the first batch has been checked
        self.probe_cosine = float("nan")
        self.ready = False
        if compute_dtype == "float32":
            self._finish_setup()
        self.dtype = np.dtype(dtype)
        self.busy_s = 0.0
        self.init_s = time.perf_counter() - t0

    def _finish_setup(self) -> None:
        """The model the actor runs from now on: cast to compute_dtype, compiled when asked."""
        if self.compute_dtype != "float32":
            self.encoder.model.to(getattr(self.torch, self.compute_dtype))
        self.model = self.encoder.model
        if self.compile:
            # dynamic: every forward pass has another padded length
            self.model = self.torch.compile(self.encoder.model, dynamic=True)
        self.ready = True

    def _forward(self, ids: np.ndarray, mask: np.ndarray):
        torch = self.torch
        input_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
        attention = torch.from_numpy(mask).to(self.device, non_blocking=True)
        hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        return self.encoder.pool(hidden.float(), attention)      # pooled and normalised in float32

    def _first_low_precision(self, ids: np.ndarray, mask: np.ndarray):
        """First batch of a bfloat16/float16 actor: the same batch in float32, then cast the model, compare, and
        return the low-precision vectors."""
        reference = self._forward(ids, mask)
        self._finish_setup()
        low = self._forward(ids, mask)
        self.probe_cosine = float((reference * low).sum(-1).min())
        if self.probe_cosine < MIN_LOW_PRECISION_COSINE:
            raise RuntimeError(f"compute_dtype={self.compute_dtype}: this encoder's vectors drift from float32's "
                               f"(min cosine {self.probe_cosine:.5f} < {MIN_LOW_PRECISION_COSINE} on the first "
                               f"batch); encode it with compute_dtype=float32")
        return low

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        n = batch.num_rows
        col = batch.column("input_ids").combine_chunks()
        values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
        numbers = batch.column(_TB_COL).to_numpy()
        edges = np.concatenate([[0], np.flatnonzero(numbers[1:] != numbers[:-1]) + 1, [n]]) if n else [0]
        parts = []
        with self.torch.inference_mode():       # as sentence-transformers: no autograd bookkeeping at all
            for lo, hi in zip(edges[:-1], edges[1:]):
                ids, mask = pad_batch(values, offsets[lo:hi + 1], self.pad_id)
                parts.append(self._forward(ids, mask) if self.ready else self._first_low_precision(ids, mask))
            # one copy to the host per block: the GPU works through the queued batches meanwhile
            emb = (self.torch.cat(parts).cpu().numpy() if parts
                   else np.empty((0, self.encoder.dim), np.float32))
        out = np.ascontiguousarray(emb.astype(self.dtype, copy=False))
        cols = {"id": batch.column("id").cast(pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), out.shape[1]),
                PATH_COL: batch.column(PATH_COL), _TOK_COL: batch.column(_TOK_COL)}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.busy_s += time.perf_counter() - t0
        cols[_RSS_COL] = pa.array([rss] * n, pa.int64())
        cols[_ACTOR_COL] = pa.array([os.getpid()] * n, pa.int64())
        cols[_BUSY_COL] = pa.array([self.busy_s] * n, pa.float64())
        cols[_INIT_COL] = pa.array([self.init_s] * n, pa.float64())
        cols[_STARTED_COL] = pa.array([self.started_at] * n, pa.float64())
        cols[_PROBE_COL] = pa.array([self.probe_cosine] * n, pa.float64())
        return pa.table(cols)


def check_compute_settings(compute_dtype: str, compile: bool, device: str) -> None:
    """bfloat16/float16 and torch.compile are GPU settings: refused on CPU (bfloat16 matmuls are slower than
    float32 on most CPUs, and compile was not measured faster there), and compile needs triton."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if device == "cpu" and compute_dtype != "float32":
        raise ValueError(f"compute_dtype={compute_dtype} runs on GPU encoder actors only (gpus_per_actor > 0); "
                         "CPU actors encode in float32")
    if compile and device == "cpu":
        raise ValueError("compile=True (torch.compile) is offered on GPU encoder actors only (gpus_per_actor > 0): "
                         "it was not measured faster on CPU")
    if compile and importlib.util.find_spec("triton") is None:
        raise ValueError("compile=True needs triton (torch.compile's GPU code generator), which is not installed")


class _ActorStats:
    """Peak RSS and per-actor busy/init seconds, from the columns every EncoderActor batch carries."""

    def __init__(self):
        self.peak_rss_kb = 0
        self.tokenize_s = 0.0
        self.probe_cosine = None
        self.actors: dict[int, dict] = {}      # pid -> busy seconds, init seconds, start time (see EncoderActor)

    def add(self, batch: pa.Table) -> None:
        if batch.num_rows == 0:
            return
        self.peak_rss_kb = max(self.peak_rss_kb, int(pc.max(batch.column(_RSS_COL)).as_py()))
        self.tokenize_s += float(pc.sum(batch.column(_TOK_COL)).as_py())
        probe = pc.min(batch.column(_PROBE_COL)).as_py()        # NaN (float32 actors) is skipped by min
        if probe is not None and probe == probe:
            self.probe_cosine = probe if self.probe_cosine is None else min(self.probe_cosine, probe)
        if _ACTOR_COL in batch.column_names:
            for pid, busy, init, started in zip(*(batch.column(c).to_pylist()
                                                  for c in (_ACTOR_COL, _BUSY_COL, _INIT_COL, _STARTED_COL))):
                a = self.actors.setdefault(pid, {"busy_s": 0.0, "init_s": init, "started_at": started})
                a["busy_s"] = max(a["busy_s"], busy)


def actor_plan(cluster_cpus: float, gpus_per_actor: float = 0, num_actors: int | None = None,
               threads_per_actor: int | None = None, cpus_per_actor: float | None = None,
               read_cpus: float | None = None, node_cpus: float | None = None) -> tuple[int, int, float]:
    """(num_actors, threads_per_actor, cpus_per_actor) with every None filled in. GPU actors: 1 actor, 2 threads,
    1 CPU. CPU actors: one per logical CPU up to MAX_AUTO_CPU_ACTORS, the CPUs shared out as torch threads, each
    reserving its threads or an equal share of what is left after one tokenize task (`read_cpus`, default 1),
    whichever is less, so the tokenizer still runs; 2 CPUs give 2 one-thread actors reserving 0.5 CPU each.
    `node_cpus` (the largest node's CPUs, default the cluster's) caps the threads and the reservation: an actor
    lives on one node."""
    if gpus_per_actor:
        return num_actors or 1, threads_per_actor or 2, 1.0 if cpus_per_actor is None else cpus_per_actor
    cpus = max(1, int(cluster_cpus))
    node = max(1, int(cluster_cpus if node_cpus is None else node_cpus))
    actors = num_actors or min(cpus, MAX_AUTO_CPU_ACTORS)
    threads = threads_per_actor or min(node, max(1, cpus // actors))
    if cpus_per_actor is None:
        left = cluster_cpus - (1 if read_cpus is None else read_cpus)
        cpus_per_actor = max(0.01, min(threads, node, int(100 * left / actors) / 100))
    return actors, threads, cpus_per_actor


def actors_placeable(node_cpus: list[float], num_actors: int, cpus_per_actor: float) -> int:
    """How many of `num_actors` actors reserving `cpus_per_actor` each the nodes (their logical CPUs) can hold."""
    return min(num_actors, sum(int(c / cpus_per_actor + 1e-9) for c in node_cpus)) if cpus_per_actor > 0 \
        else num_actors


def encode_passages(passages_dir: str | os.PathLike, out_dir: str | os.PathLike, encoder: str | None = "minilm",
                    batch_size: int = 2048, num_actors: int | None = None, threads_per_actor: int | None = None,
                    dtype: str = "float32", encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
                    cpus_per_actor: float | None = None, gpus_per_actor: float = 0, overwrite: bool = False,
                    resume: bool = True, on_shard_done: Callable[[Path], None] | None = None,
                    read_cpus: float | None = None, block_mb: float = 1.0,
                    encode_tokens: int | None = None, compute_dtype: str = "float32",
                    compile: bool = False) -> dict:
    """Encode every passage under `passages_dir` into ``emb-<shard>.parquet`` files (id, embedding) in `out_dir`.

    Runs on the Ray the caller started (or starts a local one). Two stages: CPU tasks read the row groups and
    tokenize them (each reserving `read_cpus`, None: Ray Data's default, 1; Ray Data runs as many as the free CPUs
    allow), `batch_size` rows at a time sorted by token count and cut into forward-pass batches of at most
    `encode_tokens` padded tokens (None: DEFAULT_ENCODE_TOKENS for the actors' device) and `encode_batch_size`
    rows; the encoder actors then only run the model on those
    batches (the longer the sort window, the less each forward pass pads). `num_actors`, `cpus_per_actor` (the
    logical CPU reservation of each actor: keep room for the tokenize tasks) and `threads_per_actor` (torch's
    threads in it): None takes `actor_plan`'s (on CPU, one one-thread actor per logical CPU). `gpus_per_actor` > 0
    puts the actors on GPUs, where
    `compute_dtype` bfloat16/float16 and `compile` (torch.compile) may be asked (refused on CPU actors).
    There is no listing task: the driver reads the Parquet footers. `block_mb` is the largest block Ray Data makes
    (its `DataContext.target_max_block_size` for this dataset): an actor holds about two input blocks and one
    output block, so its memory is bounded by model + batch + blocks, whatever the corpus and shard sizes, and
    output streams to disk block by block; a corpus too small to give every actor MIN_BLOCKS_PER_ACTOR blocks of
    that size gets smaller blocks, so the actors finish together. An `out_dir` left by an interrupted encode with
    the same encoder, dtype, compute_dtype and passages is resumed (`resume`): finished shards are kept and
    skipped. Returns stats: count, dim, seconds, passages_per_s, shards_encoded, shards_skipped, peak RSS, and
    where the time went: actor_ready_after_seconds (actor start-up + model load), actor_busy_seconds (inside the
    encoder), actor_utilisation, passages_per_actor_busy_s, tokenize_seconds (CPU seconds of the tokenize stage), ...
    """
    import ray

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    encode_tokens = encode_tokens or DEFAULT_ENCODE_TOKENS["cuda" if gpus_per_actor else "cpu"]
    for key, value in (("batch_size", batch_size), ("num_actors", num_actors),
                       ("threads_per_actor", threads_per_actor), ("encode_batch_size", encode_batch_size),
                       ("encode_tokens", encode_tokens)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    check_compute_settings(compute_dtype, compile, "cuda" if gpus_per_actor else "cpu")
    # absolute: read tasks run on other nodes, whose working directory is their own copy of the job's working_dir
    passages_dir = Path(passages_dir).resolve()
    files = [str(Path(f).resolve()) for f in passage_files(passages_dir)]
    names = [Path(f).name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"{passages_dir}: passage shard names must be unique")
    _passage_columns(files[0])
    out_dir = Path(out_dir)
    settings = encode_settings(passages_dir, encoder, dtype, compute_dtype)   # resolves the encoder: fails early
    prepare_out_dir(out_dir, settings, overwrite, resume)

    footers = {f: pq.read_metadata(f) for f in files}        # read once: row counts here, row groups for the reads
    expected = {Path(f).name: footers[f].num_rows for f in files}
    todo = [f for f in files if not (out_dir / shard_output_name(f)).is_file()]
    skipped = len(files) - len(todo)
    start, start_wall = time.perf_counter(), time.time()
    first_output_s, output_blocks = None, 0
    for f in [f for f in todo if expected[Path(f).name] == 0]:   # empty input shard: an empty output shard
        write_empty_shard(out_dir, f)
    todo = [f for f in todo if expected[Path(f).name] > 0]
    writer = ShardWriter(out_dir, {Path(f).name: expected[Path(f).name] for f in todo}, on_shard_done)
    actor_stats = _ActorStats()
    if todo:
        from jobs.ray_env import ensure_ray      # here, not at the top: the GPU check runs the stages without Ray

        ensure_ray()
        total = ray.cluster_resources().get("CPU", 0)
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] or [total]
        num_actors, threads_per_actor, cpus_per_actor = actor_plan(total, gpus_per_actor, num_actors,
                                                                   threads_per_actor, cpus_per_actor, read_cpus,
                                                                   node_cpus=max(node_cpus))
        need = num_actors * cpus_per_actor + (1 if read_cpus is None else read_cpus)
        placeable = actors_placeable(node_cpus, num_actors, cpus_per_actor)
        if need > total or placeable < num_actors:
            raise ValueError(f"{num_actors} encoder actor(s) x cpus_per_actor={cpus_per_actor} plus a read task need "
                             f"{need:g} logical CPUs, the cluster has {total:g} on nodes of "
                             f"{', '.join(f'{c:g}' for c in node_cpus)} (room for {placeable} such actor(s)): the "
                             f"job would wait forever. Lower cpus_per_actor (an actor still runs "
                             f"threads_per_actor={threads_per_actor} threads) or num_actors")
        corpus_mb = sum(footers[f].row_group(i).total_byte_size
                        for f in todo for i in range(footers[f].num_row_groups)) / 2**20
        block_mb = min(block_mb, max(MIN_AUTO_BLOCK_MB, corpus_mb / (MIN_BLOCKS_PER_ACTOR * num_actors)))
        ctx = ray.data.DataContext.get_current()
        saved_block_size = ctx.target_max_block_size
        ctx.target_max_block_size = int(block_mb * 1024 * 1024)   # captured by the dataset created below
        try:
            # not read_parquet: in Ray 2.60 it first runs a listing (ListFiles) or sampling task that always
            # reserves 1 whole CPU whatever num_cpus says, so beside a train worker on a 2-CPU machine the encode
            # never started (issue #4). The driver lists the row groups from the Parquet footers instead and hands
            # Ray Data one small item per row group; read tasks reserve `read_cpus` and stream each row group
            # `rows_per_read` rows at a time, so no process holds more than a block of the corpus.
            pieces = _read_pieces({f: footers[f] for f in todo}, block_mb)
            ds = ray.data.from_items(pieces, override_num_blocks=len(pieces))
            # the reads and the tokenizer: one stage of CPU tasks (Ray Data fuses the two maps, whose remote args
            # are equal, so the text never leaves the task that read it); `max_retries`, which the actors do not
            # have, keeps them from fusing into the encoder actors, so they feed every actor of the pool
            task_args = {"max_retries": _READ_RETRIES, **({"num_cpus": read_cpus} if read_cpus is not None else {})}
            ds = ds.map_batches(_read_row_groups, fn_kwargs={"columns": _passage_columns(todo[0])},
                                batch_size=None, batch_format="pyarrow", **task_args)
            from pipeline.models.retriever import resolve_encoder_path

            path = resolve_encoder_path(encoder)
            ds = ds.map_batches(_tokenize_block, batch_size=None, batch_format="pyarrow",
                                fn_kwargs={"tokenizer_path": path, "max_length": encoder_max_length(path),
                                           "window": batch_size, "max_tokens": encode_tokens,
                                           "max_rows": encode_batch_size}, **task_args)
            ds = ds.map_batches(
                EncoderActor,
                fn_constructor_kwargs={"encoder": encoder, "threads": threads_per_actor, "dtype": dtype,
                                       "device": "cuda" if gpus_per_actor else "cpu",
                                       "compute_dtype": compute_dtype, "compile": compile},
                batch_size=None,                 # one tokenized block per call: its forward passes are planned
                batch_format="pyarrow",
                # a fixed pool; two blocks in flight per actor so the next one is fetched while this one encodes
                compute=ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=2),
                num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None,
            )
        finally:
            ctx.target_max_block_size = saved_block_size
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                output_blocks += 1
                if first_output_s is None:
                    first_output_s = time.perf_counter() - start
                actor_stats.add(batch)
                writer.add(batch)
        except BaseException:
            writer.abort()
            raise
        missing = writer.missing()
        if missing:
            writer.abort()
            raise RuntimeError(f"encode of {passages_dir} ended with unfinished shards (written, expected): {missing}")
    seconds = time.perf_counter() - start

    shards, dim = shard_records(out_dir, files)
    count = sum(s["rows"] for s in shards)
    encoded = sum(expected[Path(f).name] for f in todo)
    actors = list(actor_stats.actors.values())
    busy = sum(a["busy_s"] for a in actors)
    # where the wall time went: actor start-up (process + imports + model load), then time inside the encoder UDF;
    # the rest is Ray Data scheduling, reads, transfers and the driver's writes not overlapped with encoding
    timing = {"encoder_actors_seen": len(actors),
              "actor_ready_after_seconds": round(max(a["started_at"] + a["init_s"] for a in actors) - start_wall, 3)
              if actors else None,
              "actor_init_seconds": round(max(a["init_s"] for a in actors), 3) if actors else None,
              "actor_busy_seconds": round(busy, 3),
              "actor_utilisation": round(busy / (len(actors) * seconds), 4) if actors and seconds > 0 else None,
              "passages_per_actor_busy_s": round(encoded * len(actors) / busy, 2) if busy > 0 else None}
    stats = {"count": count, "dim": dim, "seconds": round(seconds, 3),
             "passages_per_s": round(encoded / seconds, 2) if seconds > 0 and encoded else None,
             "first_output_seconds": None if first_output_s is None else round(first_output_s, 3),
             "encoded": encoded, "shards_encoded": len(todo), "shards_skipped": skipped,
             "output_blocks": output_blocks, **timing,
             "tokenize_seconds": round(actor_stats.tokenize_s, 3),
             "low_precision_probe_cosine": actor_stats.probe_cosine,
             "encoder_peak_rss_mb": round(actor_stats.peak_rss_kb / 1024, 1) if actor_stats.peak_rss_kb else None,
             "num_actors": num_actors, "threads_per_actor": threads_per_actor, "batch_size": batch_size,
             "encode_batch_size": encode_batch_size, "encode_tokens": encode_tokens, "compile": compile,
             "cpus_per_actor": cpus_per_actor, "block_mb": block_mb,
             "gpus_per_actor": gpus_per_actor, **settings, "passages_dir": str(Path(passages_dir)),
             "out_dir": str(out_dir), "shards": shards}
    write_json(stats, out_dir / SUMMARY_NAME)
    return stats


def _read_pieces(footers: dict[str, pq.FileMetaData], block_mb: float) -> list[dict]:
    """One read item per non-empty row group of the files (file -> its Parquet footer): file, row_group, and
    rows_per_read, the rows that make about `block_mb` MiB uncompressed (from the footer's sizes), so a read task
    streams a row group block by block."""
    block_bytes = max(1.0, block_mb * 1024 * 1024)
    pieces = []
    for f, meta in footers.items():
        for rg in range(meta.num_row_groups):
            info = meta.row_group(rg)
            if info.num_rows == 0:
                continue
            per_row = max(1.0, info.total_byte_size / info.num_rows)
            pieces.append({"file": str(f), "row_group": rg,
                           "rows_per_read": max(1, min(info.num_rows, int(block_bytes / per_row)))})
    return pieces


def _read_row_groups(items: pa.Table, columns: list[str]) -> Iterator[pa.Table]:
    """Ray Data read task: the row groups named in `items` (file, row_group, rows_per_read), `columns` as strings
    (one schema whatever the shards stored, e.g. integer ids) plus the source file in a 'path' column, yielded
    rows_per_read rows at a time."""
    schema = pa.schema([(c, pa.string()) for c in columns])
    for path, rg, rows in zip(*(items.column(c).to_pylist() for c in ("file", "row_group", "rows_per_read"))):
        try:
            pf = pq.ParquetFile(path)
        except OSError as exc:
            from jobs.ray_env import node_name
            # the driver saw this file; a node that cannot is a storage problem: say which node and which file
            raise FileNotFoundError(f"{path}: not readable on {node_name()} ({exc}); the passages must be on storage "
                                    "every node sees (a shared filesystem path)") from exc
        try:
            for rb in pf.iter_batches(batch_size=int(rows), row_groups=[int(rg)], columns=columns):
                t = pa.Table.from_batches([rb]).select(columns).cast(schema)
                yield t.append_column(PATH_COL, pa.array([path] * t.num_rows, pa.string()))
        finally:
            pf.close()


def _passage_columns(first_file: str) -> list[str]:
    names = pq.read_schema(first_file).names
    missing = [c for c in ("id", "text") if c not in names]
    if missing:
        raise ValueError(f"{first_file}: passage shards need columns id, text (title optional); missing {missing}")
    return [c for c in ("id", "title", "text") if c in names]


def add_actor_flags(p: argparse.ArgumentParser) -> None:
    """--num-actors, --threads-per-actor, --cpus-per-actor (`latentrag encode` and `latentrag index`)."""
    auto = (f"on CPU one per logical CPU of the cluster, at most {MAX_AUTO_CPU_ACTORS}; on GPU 1")
    p.add_argument("--num-actors", type=int, default=None, help=f"encoder actors in the Ray Data pool (default: {auto})")
    p.add_argument("--threads-per-actor", type=int, default=None,
                   help="torch threads in each actor (default: on CPU the CPUs per actor, 1 up to "
                        f"{MAX_AUTO_CPU_ACTORS} CPUs; on GPU 2); tokenization runs in tasks of its own")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="logical CPUs Ray reserves per actor (default: on CPU an equal share of the CPUs left after "
                        "one tokenize task, 0.5 on 2 CPUs; on GPU 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", required=True, help="passage directory (passages-*.parquet shards: id, title, text)")
    p.add_argument("--out", required=True,
                   help="output directory for the embedding shards (absent, empty, or an interrupted encode to resume)")
    p.add_argument("--encoder", default="minilm",
                   help="encoder: 'minilm' (embedded all-MiniLM-L6-v2), a local model directory or a hub name")
    p.add_argument("--batch-size", type=int, default=2048,
                   help="passages the tokenize stage sorts by token count together: longer windows pad less "
                        "(default 2048)")
    p.add_argument("--encode-tokens", type=int, default=None,
                   help=f"padded tokens per forward pass (rows x longest row; default "
                        f"{DEFAULT_ENCODE_TOKENS['cpu']} on CPU actors, {DEFAULT_ENCODE_TOKENS['cuda']} on GPU ones)")
    p.add_argument("--encode-batch-size", type=int, default=DEFAULT_ENCODE_BATCH_SIZE,
                   help=f"at most this many passages per forward pass (default {DEFAULT_ENCODE_BATCH_SIZE})")
    add_actor_flags(p)
    p.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (0: CPU actors, the default)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of the shards (default float32)")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                   help="the model's precision on GPU actors (bfloat16: checked against float32 on each actor's "
                        "first batch, min cosine 0.999); CPU actors run float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (GPU actors only)")
    p.add_argument("--block-mb", type=float, default=1.0,
                   help="largest Ray Data block in MiB: bounds actor memory, sets how often output reaches disk")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embeddings directory at --out")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse a non-empty --out instead of resuming an interrupted encode there")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.models.retriever import resolve_encoder_path

    try:
        for flag in ("batch_size", "encode_batch_size", "encode_tokens", "num_actors", "threads_per_actor"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        check_compute_settings(args.compute_dtype, args.compile, "cuda" if args.gpus_per_actor else "cpu")
        passage_files(args.passages)
        resolve_encoder_path(args.encoder)
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite and not (out / SETTINGS_NAME).is_file():
            raise FileExistsError(f"output directory {out} is not empty (use --overwrite)")
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    from jobs.ray_env import ensure_ray

    started = ensure_ray(dashboard=False)
    try:
        stats = encode_passages(args.passages, args.out, encoder=args.encoder, batch_size=args.batch_size,
                                num_actors=args.num_actors, threads_per_actor=args.threads_per_actor,
                                dtype=args.dtype, encode_batch_size=args.encode_batch_size,
                                cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                overwrite=args.overwrite, resume=args.resume, block_mb=args.block_mb,
                                encode_tokens=args.encode_tokens, compute_dtype=args.compute_dtype,
                                compile=args.compile)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    print(json.dumps({k: v for k, v in stats.items() if k != "shards"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
