"""`latentrag encode`: encode a passage directory into embedding shards with Ray Data.

Recipe: read_parquet(passage shards) -> map_batches(EncoderActor, actor pool of --num-actors, each loading the
encoder once and running torch on --threads-per-actor threads) -> write_parquet(id, embedding) shards + an
embeddings.json summary. `load_embeddings(out_dir)` reads them back as (ids, float32 [N, dim]) sorted by id.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUMMARY_NAME = "embeddings.json"
DTYPES = ("float32", "float16")


def passage_files(passages_dir: str | os.PathLike) -> list[str]:
    """The Parquet shards of a passage directory (``passages-*.parquet``); raises FileNotFoundError if none."""
    d = Path(passages_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"passages directory not found: {d}")
    files = sorted(glob.glob(str(d / "passages-*.parquet"))) or sorted(glob.glob(str(d / "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no passage shards (passages-*.parquet) in {d}")
    return files


class EncoderActor:
    """Ray Data callable class: loads the passage encoder once per actor, then encodes pyarrow batches.

    Input batch columns: id, text, title (optional). Output: id (string), embedding (fixed_size_list<dtype>[dim]).
    """

    def __init__(self, encoder: str | None = "minilm", threads: int = 2, encode_batch_size: int = 32,
                 dtype: str = "float32"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        from pipeline.models.retriever import TextEncoder, load_encoder, resolve_encoder_path

        torch.set_num_threads(max(1, int(threads)))
        path = resolve_encoder_path(encoder)
        # a directory saved by save_encoder carries its pooling/normalisation; anything else uses the defaults
        self.encoder = load_encoder(path) if (Path(path) / "latentrag_encoder.json").is_file() else TextEncoder(path)
        self.encoder.eval()
        self.encode_batch_size = int(encode_batch_size)
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.index import passage_text

        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        titles = batch.column("title").to_pylist() if "title" in batch.column_names else [""] * len(texts)
        inputs = [passage_text(t, x or "") for t, x in zip(titles, texts)]
        # encode in length order so each sub-batch pads to a similar length, then restore the input order
        order = np.argsort([len(s) for s in inputs], kind="stable")
        emb = self.encoder.encode([inputs[i] for i in order], batch_size=self.encode_batch_size).numpy()
        out = np.empty_like(emb)
        out[order] = emb
        out = np.ascontiguousarray(out.astype(self.dtype, copy=False))
        values = pa.array(out.reshape(-1))
        return pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                         "embedding": pa.FixedSizeListArray.from_arrays(values, out.shape[1])})


def encode_passages(passages_dir: str | os.PathLike, out_dir: str | os.PathLike, encoder: str | None = "minilm",
                    batch_size: int = 128, num_actors: int = 1, threads_per_actor: int = 2,
                    dtype: str = "float32", encode_batch_size: int = 32, cpus_per_actor: float = 1,
                    overwrite: bool = False) -> dict:
    """Encode every passage under `passages_dir` into Parquet shards (id, embedding) under `out_dir`.

    Runs on the Ray the caller started (or starts a local one). `batch_size` rows go to an actor per call, which
    encodes them `encode_batch_size` at a time. `cpus_per_actor` is the logical CPU reservation of each actor (keep
    it below the cluster's CPUs so read and write tasks can still run); `threads_per_actor` the torch threads it
    really uses. Returns stats: count, dim, seconds, passages_per_s, ...
    """
    import ray

    from pipeline.models.retriever import encoder_fingerprint, resolve_encoder_path

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    files = passage_files(passages_dir)
    resolve_encoder_path(encoder)  # fail before any work when a local encoder path is missing
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out_dir} is not empty (pass overwrite=True / --overwrite)")
        if not (out_dir / SUMMARY_NAME).is_file() and not list(out_dir.glob("*.parquet")):
            raise FileExistsError(f"refusing to overwrite {out_dir}: it does not look like an embeddings directory")
        shutil.rmtree(out_dir)
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                           "TOKENIZERS_PARALLELISM": "false"}})

    start = time.perf_counter()
    ds = ray.data.read_parquet(files).select_columns(_passage_columns(files[0]))
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={"encoder": encoder, "threads": threads_per_actor,
                               "encode_batch_size": encode_batch_size, "dtype": dtype},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=num_actors,
        num_cpus=cpus_per_actor,
    )
    ds.write_parquet(str(out_dir))
    seconds = time.perf_counter() - start

    shards = sorted(out_dir.glob("*.parquet"))
    count = sum(pq.read_metadata(f).num_rows for f in shards)
    dim = int(pq.read_schema(shards[0]).field("embedding").type.list_size) if shards else 0
    stats = {"count": count, "dim": dim, "seconds": round(seconds, 3),
             "passages_per_s": round(count / seconds, 2) if seconds > 0 else None,
             "num_actors": num_actors, "threads_per_actor": threads_per_actor, "batch_size": batch_size,
             "dtype": dtype, "encoder": encoder, "encoder_fingerprint": encoder_fingerprint(encoder),
             "corpus_fingerprint": corpus_fingerprint(passages_dir), "passages_dir": str(Path(passages_dir)),
             "out_dir": str(out_dir), "shards": len(shards)}
    (out_dir / SUMMARY_NAME).write_text(json.dumps(stats, indent=2))
    return stats


def _passage_columns(first_file: str) -> list[str]:
    names = pq.read_schema(first_file).names
    missing = [c for c in ("id", "text") if c not in names]
    if missing:
        raise ValueError(f"{first_file}: passage shards need columns id, text (title optional); missing {missing}")
    return [c for c in ("id", "title", "text") if c in names]


def corpus_fingerprint(passages_dir: str | os.PathLike) -> str | None:
    """The fingerprint recorded in ``passages.json`` (written by ingest), else a hash of the shards' names+sizes."""
    manifest = Path(passages_dir) / "passages.json"
    if manifest.is_file():
        try:
            fp = json.loads(manifest.read_text()).get("fingerprint")
        except (OSError, ValueError):
            fp = None
        if fp:
            return str(fp)
    import hashlib

    h = hashlib.sha256()
    for f in passage_files(passages_dir):
        h.update(Path(f).name.encode())
        h.update(str(Path(f).stat().st_size).encode())
    return "files-" + h.hexdigest()[:16]


def load_embeddings(out_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All embedding shards of `out_dir` as (ids, float32 [N, dim]), sorted by id (a deterministic order that does not
    depend on how Ray scheduled the blocks). Raises ValueError on duplicate ids or a ragged embedding column."""
    shards = sorted(Path(out_dir).glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no embedding shards (*.parquet) in {out_dir}")
    table = pa.concat_tables([pq.read_table(f, columns=["id", "embedding"]) for f in shards])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    table = table.sort_by("id")
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if dim is None:  # variable-size lists (written by another tool): every row must have the same length
        lengths = np.diff(col.offsets.to_numpy())
        if len(set(lengths.tolist())) != 1:
            raise ValueError(f"{out_dir}: embeddings have different lengths {sorted(set(lengths.tolist()))[:5]}")
        dim = int(lengths[0])
    emb = np.ascontiguousarray(flat.reshape(table.num_rows, dim), dtype=np.float32)
    ids = table.column("id").to_pylist()
    dup = np.flatnonzero(np.asarray(ids[1:], dtype=object) == np.asarray(ids[:-1], dtype=object))
    if len(dup):
        raise ValueError(f"{out_dir}: passage id {ids[int(dup[0])]!r} appears more than once")
    return ids, emb


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", required=True, help="passage directory (passages-*.parquet shards: id, title, text)")
    p.add_argument("--out", required=True, help="output directory for the embedding shards (must be empty or absent)")
    p.add_argument("--encoder", default="minilm",
                   help="encoder: 'minilm' (embedded all-MiniLM-L6-v2), a local model directory or a hub name")
    p.add_argument("--batch-size", type=int, default=128, help="passages per map_batches call (default 128)")
    p.add_argument("--encode-batch-size", type=int, default=32,
                   help="passages per forward pass inside an actor, after sorting by length (default 32)")
    p.add_argument("--num-actors", type=int, default=1, help="encoder actors in the Ray Data pool (default 1)")
    p.add_argument("--threads-per-actor", type=int, default=2, help="torch threads in each actor (default 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1,
                   help="logical CPUs Ray reserves per actor; leave room for read/write tasks (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of the shards (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embeddings directory at --out")
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
        if out.exists() and any(out.iterdir()) and not args.overwrite:
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
                                cpus_per_actor=args.cpus_per_actor, overwrite=args.overwrite)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
