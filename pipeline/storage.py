"""Input locations given as URIs, read through pyarrow's filesystems.

A corpus or QA file (or a directory of them) may be a plain path or a URI that pyarrow.fs understands:
``s3://bucket/corpus.jsonl``, ``gs://bucket/qa/``, ``hdfs://...``, ``file:///shared/data/corpus.jsonl``. The readers
in pipeline/data.py read local files, so a URI is copied once into a local directory (`fetch_input`), with its
file or directory name kept (formats are told from suffixes). The job reads inputs in its driver only, so only the
driver's node needs the credentials of the store.

Outputs are different: checkpoints, the index and MLflow's SQLite store are written by several processes on
several nodes, so an output location must be a path every node sees (a shared filesystem; `file://` URIs are
taken as that path). `shared_path` says so for anything else.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse


def is_uri(location: str | os.PathLike | None) -> bool:
    """`scheme://...` (s3, gs, hdfs, file, ...); a plain path, relative or absolute, is not."""
    return location is not None and "://" in str(location) and bool(urlparse(str(location)).scheme)


def fetch_input(location: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """A local path holding `location`: the path itself, or for a URI a copy under `cache_dir` made through
    pyarrow.fs (a file, or a directory with everything below it). Raises FileNotFoundError naming the URI when the
    store has nothing there, ValueError for a scheme pyarrow cannot open."""
    if not is_uri(location):
        return Path(location)
    import pyarrow.fs as pafs

    uri = str(location)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:         # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri}: pyarrow cannot open this location ({exc})") from exc
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: not found ({fs.type_name} filesystem)")
    name = Path(path.rstrip("/")).name or "input"
    dest = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:12] / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if info.type == pafs.FileType.Directory:
        dest.mkdir(exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def shared_path(location: str | os.PathLike) -> Path:
    """The local path of a location every node reads or writes (the output dir, an index): a path, or a
    `file://` URI's path; any other URI is refused, naming the location."""
    if not is_uri(location):
        return Path(location)
    parsed = urlparse(str(location))
    if parsed.scheme == "file":
        return Path(parsed.path)
    raise ValueError(f"{location}: outputs and indexes (checkpoints, the MLflow SQLite store, memory-mapped index "
                     "files) are used by several processes on several nodes and need a path every node sees: a "
                     "shared filesystem, or the bucket mounted as one (e.g. s3fs, gcsfuse); "
                     f"{parsed.scheme}:// locations are read for inputs only (corpus, QA files)")
