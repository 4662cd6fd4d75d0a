"""`latentrag encode`: encode a passage directory into embedding shards with Ray Data, resumably.

Recipe: the row groups of the passage shards not yet encoded, listed in the driver from the Parquet footers ->
Ray Data read tasks (map_batches over those items, each reserving read_cpus; not read_parquet, whose listing task
always takes a whole CPU) -> map_batches(EncoderActor: an actor pool of
--num-actors, each loading the encoder once and running torch on --threads-per-actor threads, on CPU or GPU) ->
the driver streams the encoded blocks (`iter_batches`) into one output file per input shard,
``emb-<input shard name>.parquet`` (id, embedding), written under a temporary name and renamed into place only when
every row of that input shard is in it. A crashed or interrupted encode therefore keeps the shards it finished, and a
rerun with the same settings skips them. Memory: an actor holds one batch at a time, the driver one open Parquet
writer per input shard in flight (a row group each); neither holds the corpus.

Files under --out (encode.json, emb-<shard>.parquet, embeddings.json) and their readers (`load_embeddings`,
`iter_embedding_shards`): pipeline/embeddings.py.
"""
from __future__ import annotations

import argparse
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

from jobs.ray_env import ensure_ray, node_name
from pipeline.data import write_json
from pipeline.embeddings import (DTYPES, PATH_COL, SETTINGS_NAME, SUMMARY_NAME, ShardWriter,
                                 encode_settings, passage_files, prepare_out_dir, shard_output_name, shard_records,
                                 write_empty_shard)
# the embeddings-directory format moved to pipeline/embeddings.py; what callers imported from here stays importable
from pipeline.embeddings import EmbeddingsFormatError, load_embeddings  # noqa: F401
from pipeline.index import passage_text

_RSS_COL = "__encoder_peak_rss_kb"
_ACTOR_COL = "__encoder_actor"          # the actor's pid
_BUSY_COL = "__encoder_busy_s"          # seconds the actor has spent in __call__ so far (cumulative)
_INIT_COL = "__encoder_init_s"          # seconds its __init__ took (imports + model load)
_STARTED_COL = "__encoder_started_at"   # time.time() when its __init__ began
_READ_RETRIES = 3                       # a read task (one row group) is retried this often


class EncoderActor:
    """Ray Data callable class: loads the passage encoder once per actor, then encodes pyarrow batches.

    Input batch columns: id, text, title (optional), path (optional, passed through). Output: id (string),
    embedding (fixed_size_list<dtype>[dim]), path, and for the run summary the actor's pid, peak RSS so far (KiB),
    seconds spent in __call__ so far, and the start time and duration of its __init__ (start-up and model load).
    `device`: "cpu", "cuda" or "auto" (cuda when torch sees a GPU).
    """

    def __init__(self, encoder: str | None = "minilm", threads: int = 2, encode_batch_size: int = 32,
                 dtype: str = "float32", device: str = "auto"):
        self.started_at = time.time()
        t0 = time.perf_counter()
        import torch

        threads = max(1, int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")     # torch has the threads
        else:
            # on a GPU the encoder waits for the tokenizer (one tokenizer thread was 68% of the actor's time on an
            # H200), so the actor's threads tokenize: 2.1x passages/s with 8 (benchmarks/results/gpu/). Set before
            # the tokenizer's thread pool first starts, which is the first batch
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)

        from pipeline.models.retriever import TextEncoder, load_encoder, resolve_encoder_path

        self.torch = torch
        path = resolve_encoder_path(encoder)
        # a directory saved by save_encoder carries its pooling/normalisation; anything else uses the defaults
        self.encoder = load_encoder(path) if (Path(path) / "latentrag_encoder.json").is_file() else TextEncoder(path)
        self.encoder.to(device)
        self.encoder.eval()
        self.encode_batch_size = int(encode_batch_size)
        self.dtype = np.dtype(dtype)
        self.busy_s = 0.0
        self.init_s = time.perf_counter() - t0

    def tokenize(self, texts: list[str]) -> dict[str, list[list[int]]]:
        """Unpadded token ids (and masks) per text, truncated to the encoder's max_length."""
        enc = self.encoder
        return dict(enc.tokenizer(texts, truncation=True, max_length=enc.max_length, padding=False))

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        titles = batch.column("title").to_pylist() if "title" in batch.column_names else [""] * len(texts)
        features = self.tokenize([passage_text(t, x or "") for t, x in zip(titles, texts)])
        # encode in token-length order so each sub-batch pads to a similar length, then restore the input order.
        # Sorting by characters, as sentence-transformers does, leaves about twice as much padding
        # (benchmarks/encode_bench.py). The texts are tokenized once: the sort and the model read the same ids,
        # which matters on a GPU, where the tokenizer is a large share of the encode (benchmarks/encode_gpu_check.py)
        order = np.argsort([len(x) for x in features["input_ids"]], kind="stable")
        pad, step, parts = self.encoder.tokenizer.pad, self.encode_batch_size, []
        with self.torch.inference_mode():       # as sentence-transformers: no autograd bookkeeping at all
            for lo in range(0, len(order), step):
                rows = order[lo:lo + step]
                sub = pad({k: [v[i] for i in rows] for k, v in features.items()}, return_tensors="pt")
                parts.append(self.encoder.embed(sub).float().cpu())
        emb = (self.torch.cat(parts).numpy() if parts
               else np.empty((0, self.encoder.dim), np.float32))
        out = np.empty_like(emb)
        out[order] = emb
        out = np.ascontiguousarray(out.astype(self.dtype, copy=False))
        values = pa.array(out.reshape(-1))
        cols = {"id": pa.array([str(i) for i in ids], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(values, out.shape[1])}
        if PATH_COL in batch.column_names:
            cols[PATH_COL] = batch.column(PATH_COL).combine_chunks()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.busy_s += time.perf_counter() - t0
        n = len(ids)
        cols[_RSS_COL] = pa.array([rss] * n, pa.int64())
        cols[_ACTOR_COL] = pa.array([os.getpid()] * n, pa.int64())
        cols[_BUSY_COL] = pa.array([self.busy_s] * n, pa.float64())
        cols[_INIT_COL] = pa.array([self.init_s] * n, pa.float64())
        cols[_STARTED_COL] = pa.array([self.started_at] * n, pa.float64())
        return pa.table(cols)


class _ActorStats:
    """Peak RSS and per-actor busy/init seconds, from the columns every EncoderActor batch carries."""

    def __init__(self):
        self.peak_rss_kb = 0
        self.actors: dict[int, dict] = {}      # pid -> busy seconds, init seconds, start time (see EncoderActor)

    def add(self, batch: pa.Table) -> None:
        if batch.num_rows == 0:
            return
        self.peak_rss_kb = max(self.peak_rss_kb, int(pc.max(batch.column(_RSS_COL)).as_py()))
        if _ACTOR_COL in batch.column_names:
            for pid, busy, init, started in zip(*(batch.column(c).to_pylist()
                                                  for c in (_ACTOR_COL, _BUSY_COL, _INIT_COL, _STARTED_COL))):
                a = self.actors.setdefault(pid, {"busy_s": 0.0, "init_s": init, "started_at": started})
                a["busy_s"] = max(a["busy_s"], busy)


def encode_passages(passages_dir: str | os.PathLike, out_dir: str | os.PathLike, encoder: str | None = "minilm",
                    batch_size: int = 2048, num_actors: int = 1, threads_per_actor: int = 2,
                    dtype: str = "float32", encode_batch_size: int = 32, cpus_per_actor: float = 1,
                    gpus_per_actor: float = 0, overwrite: bool = False, resume: bool = True,
                    on_shard_done: Callable[[Path], None] | None = None, read_cpus: float | None = None,
                    block_mb: float = 1.0) -> dict:
    """Encode every passage under `passages_dir` into ``emb-<shard>.parquet`` files (id, embedding) in `out_dir`.

    Runs on the Ray the caller started (or starts a local one). `batch_size` rows go to an actor per call, which
    sorts them by token count and encodes them `encode_batch_size` at a time (the larger the batch, the less each
    forward pass pads: 2048 rows pad less than sentence-transformers' sort of the whole corpus by characters).
    `cpus_per_actor` is the logical CPU reservation of each actor (keep it below the cluster's CPUs so read tasks
    can still run), `threads_per_actor` the threads it really uses (torch's on CPU; on a GPU the tokenizer's, which
    the GPU would otherwise wait for), `gpus_per_actor` > 0 puts the actors on GPUs, `read_cpus` is the reservation
    of each read task (None: Ray Data's default, 1; every task of the job honours it, there is no listing task: the
    driver reads the Parquet footers), `block_mb` the largest block Ray Data makes (its
    `DataContext.target_max_block_size` for this dataset): an actor holds about two input blocks and one output
    block, so its memory is bounded by model + batch + blocks, whatever the corpus and shard sizes, and output
    streams to disk block by block (with Ray's 128 MiB default, small shards are read into one block and nothing is
    written until it is all encoded). An `out_dir` left by an interrupted encode with the same encoder,
    dtype and passages is resumed (`resume`): finished shards are kept and skipped. Returns stats: count, dim,
    seconds, passages_per_s, shards_encoded, shards_skipped, peak RSS, and where the time went:
    actor_ready_after_seconds (actor start-up + model load), actor_busy_seconds (inside the encoder),
    actor_utilisation, passages_per_actor_busy_s, ...
    """
    import ray

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for key, value in (("batch_size", batch_size), ("num_actors", num_actors),
                       ("threads_per_actor", threads_per_actor), ("encode_batch_size", encode_batch_size)):
        if int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    # absolute: read tasks run on other nodes, whose working directory is their own copy of the job's working_dir
    passages_dir = Path(passages_dir).resolve()
    files = [str(Path(f).resolve()) for f in passage_files(passages_dir)]
    names = [Path(f).name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"{passages_dir}: passage shard names must be unique")
    _passage_columns(files[0])
    out_dir = Path(out_dir)
    settings = encode_settings(passages_dir, encoder, dtype)   # resolves the encoder: fails before any work
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
        ensure_ray()
        total = ray.cluster_resources().get("CPU", 0)
        need = num_actors * cpus_per_actor + (1 if read_cpus is None else read_cpus)
        if need > total:
            raise ValueError(f"{num_actors} encoder actor(s) x cpus_per_actor={cpus_per_actor} plus a read task need "
                             f"{need:g} logical CPUs, the cluster has {total:g}: the job would wait forever. Lower "
                             f"cpus_per_actor (an actor still runs threads_per_actor={threads_per_actor} threads) or "
                             f"num_actors")
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
            ds = ds.map_batches(
                _read_row_groups,
                fn_kwargs={"columns": _passage_columns(todo[0])},
                batch_size=None,
                batch_format="pyarrow",
                # retry a read that fails (transient I/O); this remote arg, which the actors do not have, also
                # keeps Ray Data from fusing the reads into the encoder actors (it fuses task -> actor maps whose
                # remote args are equal, and would then bundle batch_size row groups into one actor call): the
                # reads stay tasks of their own that feed every actor of the pool
                max_retries=_READ_RETRIES,
                **({"num_cpus": read_cpus} if read_cpus is not None else {}),
            )
            ds = ds.map_batches(
                EncoderActor,
                fn_constructor_kwargs={"encoder": encoder, "threads": threads_per_actor,
                                       "encode_batch_size": encode_batch_size, "dtype": dtype,
                                       "device": "cuda" if gpus_per_actor else "cpu"},
                batch_size=batch_size,
                batch_format="pyarrow",
                # a fixed pool; two batches in flight per actor so the next one is fetched while this one encodes
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
             "encoder_peak_rss_mb": round(actor_stats.peak_rss_kb / 1024, 1) if actor_stats.peak_rss_kb else None,
             "num_actors": num_actors, "threads_per_actor": threads_per_actor, "batch_size": batch_size,
             "encode_batch_size": encode_batch_size, "cpus_per_actor": cpus_per_actor, "block_mb": block_mb,
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", required=True, help="passage directory (passages-*.parquet shards: id, title, text)")
    p.add_argument("--out", required=True,
                   help="output directory for the embedding shards (absent, empty, or an interrupted encode to resume)")
    p.add_argument("--encoder", default="minilm",
                   help="encoder: 'minilm' (embedded all-MiniLM-L6-v2), a local model directory or a hub name")
    p.add_argument("--batch-size", type=int, default=2048,
                   help="passages per map_batches call, sorted by length inside the actor: bigger batches pad "
                        "less (default 2048)")
    p.add_argument("--encode-batch-size", type=int, default=32,
                   help="passages per forward pass inside an actor, after sorting by length (default 32)")
    p.add_argument("--num-actors", type=int, default=1, help="encoder actors in the Ray Data pool (default 1)")
    p.add_argument("--threads-per-actor", type=int, default=2,
                   help="threads in each actor (default 2): torch's on CPU actors, the tokenizer's on GPU actors")
    p.add_argument("--cpus-per-actor", type=float, default=1,
                   help="logical CPUs Ray reserves per actor; leave room for read tasks (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (0: CPU actors, the default)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of the shards (default float32)")
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
        passage_files(args.passages)
        resolve_encoder_path(args.encoder)
        for flag in ("batch_size", "encode_batch_size", "num_actors", "threads_per_actor"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite and not (out / SETTINGS_NAME).is_file():
            raise FileExistsError(f"output directory {out} is not empty (use --overwrite)")
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    started = not ray.is_initialized()
    try:
        stats = encode_passages(args.passages, args.out, encoder=args.encoder, batch_size=args.batch_size,
                                num_actors=args.num_actors, threads_per_actor=args.threads_per_actor,
                                dtype=args.dtype, encode_batch_size=args.encode_batch_size,
                                cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                overwrite=args.overwrite, resume=args.resume, block_mb=args.block_mb)
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
