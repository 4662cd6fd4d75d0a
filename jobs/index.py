"""`latentrag index`: encode passages with Ray Data and write a new FAISS index version.

Recipe: passage shards -> jobs.encode (Ray Data actor pool) -> embedding shards in a scratch directory under the
index root -> pipeline.index.write_index_version (FAISS build, root/v{N} written under a temporary name and renamed,
then `current` replaced atomically) -> print the version directory and its manifest.
`latentrag index --verify --out ROOT_OR_VERSION` checks an existing index instead of building one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index import INDEX_PARAMS, INDEX_TYPES, IndexFormatError, verify_index, write_index_version


def build_index(passages_dir: str | os.PathLike, index_root: str | os.PathLike, encoder: str | None = "minilm",
                index_type: str = "flat", num_actors: int = 1, batch_size: int = 128, threads_per_actor: int = 2,
                encode_batch_size: int = 32, cpus_per_actor: float = 1, verify: bool = False,
                **index_params) -> Path:
    """Encode `passages_dir` on the running Ray (or a local one) and write the next index version under
    `index_root`; returns the version directory (also made `current`). Raises FileNotFoundError for a missing
    passage directory or encoder path before anything is written."""
    from jobs.encode import encode_passages, load_embeddings, passage_files

    from pipeline.models.retriever import resolve_encoder_path

    files = passage_files(passages_dir)
    resolve_encoder_path(encoder)
    _check_index_params(index_type, index_params)

    index_root = Path(index_root)
    index_root.mkdir(parents=True, exist_ok=True)
    scratch = index_root / f".embeddings-{uuid.uuid4().hex}"
    try:
        stats = encode_passages(passages_dir, scratch, encoder=encoder, batch_size=batch_size,
                                num_actors=num_actors, threads_per_actor=threads_per_actor,
                                encode_batch_size=encode_batch_size, cpus_per_actor=cpus_per_actor)
        ids, embeddings = load_embeddings(scratch)
        passages = _read_passages_sorted(files)
        if passages.num_rows != len(ids) or passages.column("id").to_pylist() != ids:
            raise IndexFormatError(f"encoded {len(ids)} passages but {passages_dir} holds {passages.num_rows}, "
                                   f"or their ids differ: the passage directory changed while it was encoded?")
        titles = passages.column("title").to_pylist() if "title" in passages.column_names else None
        version_dir = write_index_version(
            index_root, embeddings, ids, index_type, encoder_name=encoder,
            encoder_fingerprint=stats["encoder_fingerprint"], corpus_fingerprint=stats["corpus_fingerprint"],
            titles=titles, texts=passages.column("text").to_pylist(),
            extra={"encode": {k: stats[k] for k in ("seconds", "passages_per_s", "num_actors", "threads_per_actor",
                                                     "batch_size", "dtype")},
                   "passages_dir": str(Path(passages_dir).resolve())},
            **index_params)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if verify:
        verify_index(version_dir)
    return version_dir


def _check_index_params(index_type: str, params: dict) -> None:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    unknown = sorted(set(params) - set(INDEX_PARAMS[index_type]) - {"threads"})
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for a {index_type} index; "
                         f"it takes {', '.join(INDEX_PARAMS[index_type]) or 'none'}")


def _read_passages_sorted(files: list[str]) -> pa.Table:
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        t = pq.read_table(f, columns=[c for c in ("id", "title", "text") if c in names])
        if "title" not in t.column_names:
            t = t.append_column("title", pa.array([""] * t.num_rows, pa.string()))
        tables.append(t.select(["id", "title", "text"]).cast(pa.schema(
            [("id", pa.string()), ("title", pa.string()), ("text", pa.string())])))
    return pa.concat_tables(tables).sort_by("id")


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
    p.add_argument("--num-actors", type=int, default=1, help="encoder actors in the Ray Data pool (default 1)")
    p.add_argument("--batch-size", type=int, default=128, help="passages per map_batches call (default 128)")
    p.add_argument("--threads-per-actor", type=int, default=2, help="torch threads in each encoder actor (default 2)")
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

    from jobs.encode import passage_files
    from pipeline.models.retriever import resolve_encoder_path

    try:
        passage_files(args.passages)
        resolve_encoder_path(args.encoder)
        _check_index_params(args.index_type, dict(args.param))
        for flag in ("num_actors", "batch_size", "threads_per_actor"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                           "TOKENIZERS_PARALLELISM": "false"}})
    try:
        version_dir = build_index(args.passages, args.out, encoder=args.encoder, index_type=args.index_type,
                                  num_actors=args.num_actors, batch_size=args.batch_size,
                                  threads_per_actor=args.threads_per_actor, **dict(args.param))
        report = verify_index(version_dir) if args.verify else None
    except (IndexFormatError, FileNotFoundError) as exc:
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
