"""Versioned FAISS indexes over passage embeddings, one module per job:

    protocol.py  SearchIndex (what every caller needs from an index), passage_text, as_queries
    build.py     FAISS builds: in one process, or shard-parallel (empty_index / add_vectors / merge_indexes)
    store.py     version directories on disk: layout, manifest, `current` pointer, write_index_version, read_rows
    mapped.py    LoadedIndex / load_index: a version memory-mapped in this process
    shard.py     shard_bounds, merge_topk, IndexShard (jobs/sharded_index.py runs one per Ray actor)
    memory.py    ArrayIndex: exact, in memory, no files
    verify.py    verify_index
    errors.py    IndexFormatError and its subclasses

`load_index` refuses an index whose encoder fingerprint differs from the one the caller queries with
(`IndexMismatchError`). No Ray here: `jobs/index.py` does the encoding and the parallel build.
Everything below was importable from `pipeline.index` when it was one module, and still is.
"""
from pipeline.index.build import (INDEX_PARAMS, INDEX_TYPES, MERGEABLE_TYPES, METRICS, _apply_search_params,
                                  add_vectors, build_faiss_index, check_embeddings, deserialize_index, empty_index,
                                  merge_indexes, resolve_params, serialize_index)
from pipeline.index.errors import IndexFormatError, IndexMismatchError, IndexVerificationError
from pipeline.index.mapped import LoadedIndex, load_index
from pipeline.index.memory import ArrayIndex
from pipeline.index.protocol import SearchIndex, as_queries, passage_text
from pipeline.index.shard import IndexShard, merge_topk, shard_bounds
from pipeline.index.store import (CURRENT_NAME, EMBEDDINGS_NAME, INDEX_NAME, MANIFEST_NAME, PASSAGES_NAME,
                                  IndexRows, check_encoder, current_version, list_versions, read_faiss,
                                  read_manifest, read_rows, resolve_version_dir, set_current, write_index_version)
from pipeline.index.verify import verify_index

__all__ = [
    "ArrayIndex", "CURRENT_NAME", "EMBEDDINGS_NAME", "INDEX_NAME", "INDEX_PARAMS", "INDEX_TYPES", "IndexFormatError",
    "IndexMismatchError", "IndexRows", "IndexShard", "IndexVerificationError", "LoadedIndex", "MANIFEST_NAME",
    "MERGEABLE_TYPES", "METRICS", "PASSAGES_NAME", "SearchIndex", "add_vectors", "as_queries", "build_faiss_index",
    "check_embeddings", "check_encoder", "current_version", "deserialize_index", "empty_index", "list_versions",
    "load_index", "merge_indexes", "merge_topk", "passage_text", "read_faiss", "read_manifest", "read_rows",
    "resolve_params", "resolve_version_dir", "serialize_index", "set_current", "shard_bounds", "verify_index",
    "write_index_version", "_apply_search_params",
]
