"""`latentrag index`: encode passages with Ray Data and write a new FAISS index version.

Recipe: passage shards -> jobs.encode (Ray Data actor pool, resumable) -> embedding shards in a scratch directory
under the index root -> each shard checked (dim, rows, ids against its passage shard) -> FAISS build: flat and
ivfpq shard-parallel (ivfpq trained once on a sample, one Ray task per shard adds its vectors, parts merged in
order), hnsw in one process -> pipeline.index.write_index_version (root/v{N} written under a temporary name and
renamed, then `current` replaced atomically) -> with --bm25, the version's BM25 index (pipeline.index.bm25) -> print
the version directory and its manifest.
`latentrag index --verify --out ROOT_OR_VERSION` checks an existing index instead of building one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import ray

from jobs.encode import (DEFAULT_ENCODE_BATCH_SIZE, DEFAULT_ENCODE_TOKENS, add_actor_flags, check_compute_settings,
                         encode_passages)
from jobs.ray_env import ensure_ray
from pipeline.embeddings import corpus_fingerprint, gather_checked, passage_files
from pipeline.index import (INDEX_PARAMS, INDEX_TYPES, MERGEABLE_TYPES, IndexFormatError, add_vectors,
                            deserialize_index, empty_index, merge_indexes, serialize_index, verify_index,
                            load_index, write_index_version)
from pipeline.index.bm25 import open_bm25
from pipeline.models.retriever import encoder_fingerprint, resolve_encoder_path
from pipeline.token_batches import COMPUTE_DTYPES


def build_index(passages_dir: str | os.PathLike, index_root: str | os.PathLike, encoder: str | None = "minilm",
                index_type: str = "flat", num_actors: int | None = None, batch_size: int = 2048,
                threads_per_actor: int | None = None,
                encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE, cpus_per_actor: float | None = None,
                verify: bool = False,
                gpus_per_actor: float = 0, build_parallel: bool = True, build_cpus: float = 1,
                encoder_name: str | None = None, extra: dict | None = None, make_current: bool = True,
                dtype: str = "float32", read_cpus: float | None = None, parallel_min_vectors: int = 20_000,
                encode_tokens: int | None = None, compute_dtype: str = "float32", compile: bool = False,
                bm25: bool = False, **index_params) -> Path:
    """Encode `passages_dir` on the running Ray (or a local one) and write the next index version under
    `index_root`; returns the version directory (made `current` unless `make_current=False`).

    The encode goes to ``index_root/.embeddings-<encoder>-<corpus>`` and is resumed from there when an earlier
    build crashed; it is removed once the version is written. Every embedding shard is checked against the encode
    summary (dim, rows) and against its passage shard (same ids), else `EmbeddingsFormatError` names the file and no
    version is written. flat and ivfpq indexes of at least `parallel_min_vectors` vectors are built shard-parallel
    (`build_parallel`): ivfpq is trained once on a sample, one Ray task per embedding shard adds that shard's
    vectors, and the parts are merged in shard order (below that size task overhead outweighs the work); hnsw is
    built in one process (FAISS's OpenMP threads: HNSW graphs do not merge). `encoder_name` (default: `encoder`) is
    what the manifest records. `bm25`: also build the version's BM25 index (`bm25/`, hybrid candidates).
    Raises FileNotFoundError for a missing passage directory or encoder path before anything is written."""
    passages_dir = Path(passages_dir).resolve()      # read by Ray tasks on other nodes (see encode_passages)
    files = passage_files(passages_dir)
    resolve_encoder_path(encoder)
    _check_index_params(index_type, index_params)
    check_compute_settings(compute_dtype, compile, "cuda" if gpus_per_actor else "cpu")

    index_root = Path(index_root)
    index_root.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir(index_root, passages_dir, encoder, dtype, compute_dtype)
    stats = encode_passages(passages_dir, scratch, encoder=encoder, batch_size=batch_size,
                            num_actors=num_actors, threads_per_actor=threads_per_actor,
                            encode_batch_size=encode_batch_size, cpus_per_actor=cpus_per_actor,
                            gpus_per_actor=gpus_per_actor, dtype=dtype, resume=True, read_cpus=read_cpus,
                            encode_tokens=encode_tokens, compute_dtype=compute_dtype, compile=compile)
    t0 = time.perf_counter()
    ids, embeddings, titles, texts, shard_rows = gather_checked(scratch, files)
    params = dict(index_params)
    threads = params.pop("threads", None)
    index = None
    parallel = (build_parallel and index_type in MERGEABLE_TYPES and len(shard_rows) > 1
                and len(ids) >= parallel_min_vectors)
    if parallel:
        index = _build_shard_parallel(embeddings, shard_rows, index_type, build_cpus, threads, params)
    build_seconds = time.perf_counter() - t0
    version_dir = write_index_version(
        index_root, embeddings, ids, index_type, encoder_name=encoder_name or encoder,
        encoder_fingerprint=stats["encoder_fingerprint"], corpus_fingerprint=stats["corpus_fingerprint"],
        titles=titles, texts=texts, make_current=make_current, index=index, threads=threads,
        extra={"encode": {k: stats[k] for k in ("seconds", "passages_per_s", "num_actors", "threads_per_actor",
                                                 "batch_size", "encode_tokens", "dtype", "compute_dtype",
                                                 "shards_encoded", "shards_skipped", "encoder_peak_rss_mb",
                                                 "actor_ready_after_seconds", "actor_busy_seconds",
                                                 "tokenize_seconds")},
               "build": {"shard_parallel": parallel, "shards": len(shard_rows),
                         "gather_and_parallel_build_seconds": round(build_seconds, 3)},
               "passages_dir": str(Path(passages_dir).resolve()), **(extra or {})},
        **params)
    shutil.rmtree(scratch, ignore_errors=True)
    if bm25:
        open_bm25(load_index(version_dir))
    if verify:
        verify_index(version_dir)
    return version_dir


def scratch_dir(index_root: str | os.PathLike, passages_dir: str | os.PathLike, encoder: str | None,
                dtype: str = "float32", compute_dtype: str = "float32") -> Path:
    """Where `build_index` encodes (and, after a crash, resumes encoding) this corpus with this encoder."""
    compute = "" if compute_dtype == "float32" else f"{compute_dtype}-"
    return Path(index_root) / (f".embeddings-{encoder_fingerprint(encoder)}-{dtype}-{compute}"
                               f"{_slug(corpus_fingerprint(passages_dir))}")


def _slug(text: str | None) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:40]


def _build_shard_parallel(embeddings: np.ndarray, shard_rows: list[int], index_type: str, build_cpus: float,
                          threads: int | None, params: dict):
    """ivfpq: train on a sample in the driver; then one Ray task per shard adds its rows; merge in shard order."""
    n = len(embeddings)
    empty, _ = empty_index(index_type, n, embeddings, threads=threads, **params)
    empty_ref = ray.put(serialize_index(empty))
    edges = np.cumsum([0] + shard_rows)
    add_shard = ray.remote(_add_shard).options(num_cpus=build_cpus)
    refs = [add_shard.remote(empty_ref, ray.put(embeddings[lo:hi]), threads)
            for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    return merge_indexes([deserialize_index(b) for b in ray.get(refs)])


def _add_shard(empty_bytes, embeddings, threads):
    """Ray task body: a copy of the empty (trained) index holding one shard's vectors, serialized."""
    return serialize_index(add_vectors(empty_bytes, embeddings, threads=threads if threads else 1))


def _check_index_params(index_type: str, params: dict) -> None:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    unknown = sorted(set(params) - set(INDEX_PARAMS[index_type]) - {"threads"})
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for a {index_type} index; "
                         f"it takes {', '.join(INDEX_PARAMS[index_type]) or 'none'}")


def _parse_param(item: str) -> tuple[str, int | float | str]:
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"--param wants KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", help="passage directory (passages-*.parquet: id, title, text); "
                                      "required unless --verify is given alone")
    p.add_argument("--out", required=True, help="index root: versions v1, v2, ... and a `current` pointer go here "
                                                "(with --verify alone: an index root or a version directory)")
    p.add_argument("--encoder", default="minilm",
                   help="passage encoder: 'minilm' (embedded all-MiniLM-L6-v2), a local model directory or a hub name")
    p.add_argument("--index-type", choices=INDEX_TYPES, default="flat",
                   help="flat (exact), hnsw (graph) or ivfpq (compressed, exact re-scoring of candidates)")
    p.add_argument("--param", action="append", type=_parse_param, default=[], metavar="KEY=VALUE",
                   help="index parameter, repeatable: hnsw M, efConstruction, efSearch; ivfpq nlist, m, nbits, "
                        "nprobe, refine_factor, train_size")
    p.add_argument("--batch-size", type=int, default=2048, help="passages per map_batches call (default 2048)")
    p.add_argument("--encode-tokens", type=int, default=None,
                   help=f"padded tokens per forward pass (default {DEFAULT_ENCODE_TOKENS['cpu']} on CPU actors, "
                        f"{DEFAULT_ENCODE_TOKENS['cuda']} on GPU ones)")
    p.add_argument("--encode-batch-size", type=int, default=DEFAULT_ENCODE_BATCH_SIZE,
                   help=f"at most this many passages per forward pass (default {DEFAULT_ENCODE_BATCH_SIZE})")
    add_actor_flags(p)
    p.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per encoder actor (default 0: CPU)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of the intermediate embedding shards (the index holds float32)")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                   help="the encoder's precision on GPU actors (bfloat16 checked against float32: min cosine "
                        "0.999); CPU actors run float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (GPU actors only)")
    p.add_argument("--no-parallel-build", dest="build_parallel", action="store_false",
                   help="build flat/ivfpq in one process instead of one Ray task per embedding shard + merge")
    p.add_argument("--bm25", action="store_true",
                   help="also build the version's BM25 index (bm25/, for retriever.hybrid_k); otherwise the first "
                        "hybrid run over this version builds it")
    p.add_argument("--verify", action="store_true",
                   help="check the index (counts, checksum, sampled vectors); alone, checks --out without building")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.passages is None:
        if not args.verify:
            parser.error("--passages is required (or give --verify alone to check an existing index)")
        try:
            report = verify_index(args.out)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (IndexFormatError, OSError, RuntimeError) as exc:
            print(f"error: verification failed: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=2))
        return 0

    try:
        passage_files(args.passages)
        resolve_encoder_path(args.encoder)
        _check_index_params(args.index_type, dict(args.param))
        for flag in ("num_actors", "batch_size", "threads_per_actor", "encode_batch_size", "encode_tokens"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        check_compute_settings(args.compute_dtype, args.compile, "cuda" if args.gpus_per_actor else "cpu")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    started = ensure_ray(dashboard=False)
    try:
        version_dir = build_index(args.passages, args.out, encoder=args.encoder, index_type=args.index_type,
                                  num_actors=args.num_actors, batch_size=args.batch_size,
                                  threads_per_actor=args.threads_per_actor,
                                  encode_batch_size=args.encode_batch_size, cpus_per_actor=args.cpus_per_actor,
                                  gpus_per_actor=args.gpus_per_actor, dtype=args.dtype,
                                  encode_tokens=args.encode_tokens, compute_dtype=args.compute_dtype,
                                  compile=args.compile, build_parallel=args.build_parallel, bm25=args.bm25,
                                  **dict(args.param))
        report = verify_index(version_dir) if args.verify else None
    except (IndexFormatError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    print(f"index version: {version_dir}")
    print(json.dumps(json.loads((version_dir / "manifest.json").read_text()), indent=2))
    if report is not None:
        print(json.dumps({"verify": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
