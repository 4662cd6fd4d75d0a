"""Index versions on disk: the directory layout, the manifest, the `current` pointer, writing a version and
reading its rows back.

    root/
      current              # text file holding the name of the current version, e.g. "v3" (replaced atomically)
      v1/ v2/ v3/          # one directory per version, each complete before it appears under its name
        index.faiss        # the FAISS index (flat | hnsw | ivfpq), row r <-> ids[r]
        embeddings.npy     # float32 [N, dim], the exact vectors (training gathers passage vectors by row)
        passages.parquet   # id, title, text per row (retrieval returns text)
        manifest.json      # version, type, dim, metric, count, corpus/encoder fingerprints, encoder, created, params

A version directory is written under a temporary name and renamed into place, and `current` is replaced with
`os.replace`, so a reader never sees a half-written index.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.build import _apply_search_params, build_faiss_index, check_embeddings, resolve_params
from pipeline.index.errors import IndexFormatError, IndexMismatchError, IndexVerificationError

CURRENT_NAME = "current"
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"
EMBEDDINGS_NAME = "embeddings.npy"
PASSAGES_NAME = "passages.parquet"
_VERSION_RE = re.compile(r"^v(\d+)$")


def _version_number(name: str) -> int | None:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def list_versions(root: str | os.PathLike) -> list[str]:
    """Version directory names under an index root, oldest first (``["v1", "v2", ...]``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(n, p.name) for p in root.iterdir() if p.is_dir() and (n := _version_number(p.name)) is not None]
    return [name for _, name in sorted(found)]


def current_version(root: str | os.PathLike) -> str | None:
    """The name the ``current`` pointer holds, or None when there is none."""
    f = Path(root) / CURRENT_NAME
    if not f.is_file():
        return None
    name = f.read_text().strip()
    return name or None


def set_current(root: str | os.PathLike, version: str) -> None:
    """Point ``root/current`` at `version` atomically (temp file + fsync + os.replace)."""
    root = Path(root)
    if not (root / version / MANIFEST_NAME).is_file():
        raise IndexFormatError(f"cannot point {root / CURRENT_NAME} at {version}: {root / version} is not an index version")
    tmp = root / f".{CURRENT_NAME}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / CURRENT_NAME)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _str_column(values: Any, name: str, n: int) -> list[str]:
    values = ["" if v is None else str(v) for v in values]
    if len(values) != n:
        raise IndexFormatError(f"{name}: {len(values)} values for {n} embeddings")
    return values


def write_index_version(root: str | os.PathLike, embeddings: np.ndarray, ids: Any, index_type: str = "flat",
                        encoder_name: str | None = None, encoder_fingerprint: str | None = None,
                        corpus_fingerprint: str | None = None, titles: Any = None, texts: Any = None,
                        metric: str = "ip", make_current: bool = True, extra: dict | None = None,
                        index: faiss.Index | None = None, **params: Any) -> Path:
    """Build an index over `embeddings` and write it as the next version ``root/v{N}``; returns that directory.

    Everything is validated and built in memory first, then written into ``root/.tmp-*`` and renamed into place, so
    bad input leaves nothing behind and a reader never sees a partial version. With `make_current` (the default)
    ``root/current`` then points at the new version. `extra` (JSON-able) is stored in the manifest under "build".
    `index`: an index already built over exactly these rows in this order (a shard-parallel build), else one is built.
    """
    emb = check_embeddings(embeddings)
    n, d = emb.shape
    ids = [str(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
    if len(ids) != n:
        raise IndexFormatError(f"{len(ids)} ids for {n} embeddings: every embedding row needs exactly one id")
    if len(set(ids)) != n:
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise IndexFormatError(f"passage ids must be unique; {dup!r} appears more than once")
    columns = {"id": pa.array(ids, pa.string())}
    if titles is not None:
        columns["title"] = pa.array(_str_column(titles, "titles", n), pa.string())
    if texts is not None:
        columns["text"] = pa.array(_str_column(texts, "texts", n), pa.string())
    threads = params.pop("threads", None)
    if index is None:
        index = build_faiss_index(emb, index_type, metric, threads=threads, **params)
    elif index.ntotal != n or index.d != d:
        raise IndexFormatError(f"the prebuilt index holds {index.ntotal} vectors of dim {index.d}, "
                               f"the embeddings {n} of dim {d}")
    resolved = resolve_params(index_type, n, d, **params)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        faiss.write_index(index, str(tmp / INDEX_NAME))
        np.save(tmp / EMBEDDINGS_NAME, emb)
        pq.write_table(pa.table(columns), tmp / PASSAGES_NAME)
        manifest = {"version": None, "type": index_type, "dim": d, "metric": metric, "count": n,
                    "corpus_fingerprint": corpus_fingerprint, "encoder_fingerprint": encoder_fingerprint,
                    "encoder": encoder_name,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "params": resolved, "has_text": "text" in columns,
                    "embeddings_sha256": sha256_file(tmp / EMBEDDINGS_NAME),
                    "files": {"index": INDEX_NAME, "embeddings": EMBEDDINGS_NAME, "passages": PASSAGES_NAME}}
        if extra:
            manifest["build"] = extra
        # claim the next free number; a concurrent writer that wins the same name makes the rename fail: retry
        for _ in range(1000):
            existing = [_version_number(v) for v in list_versions(root)]
            name = f"v{max(existing, default=0) + 1}"
            manifest["version"] = name
            with open(tmp / MANIFEST_NAME, "w") as fh:
                json.dump(manifest, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, root / name)
                break
            except OSError:
                if not (root / name).exists():
                    raise
        else:  # pragma: no cover
            raise IndexFormatError(f"could not claim a version name under {root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if make_current:
        set_current(root, name)
    return root / name


def resolve_version_dir(root_or_version: str | os.PathLike) -> Path:
    """A version directory itself, or the one an index root's ``current`` pointer names."""
    path = Path(root_or_version)
    if (path / MANIFEST_NAME).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"index not found: {path}")
    name = current_version(path)
    if name is None:
        versions = list_versions(path)
        hint = f" (versions present: {', '.join(versions)})" if versions else ""
        raise FileNotFoundError(f"{path} is neither an index version (no {MANIFEST_NAME}) nor an index root "
                                f"with a '{CURRENT_NAME}' pointer{hint}")
    version_dir = path / name
    if not (version_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{path / CURRENT_NAME} points at {name}, but {version_dir / MANIFEST_NAME} is missing")
    return version_dir


def read_manifest(root_or_version: str | os.PathLike) -> dict:
    return json.loads((resolve_version_dir(root_or_version) / MANIFEST_NAME).read_text())


def check_encoder(version_dir: Path, manifest: dict, expected_encoder_fingerprint: str | None) -> None:
    """Refuse (`IndexMismatchError`) an index built with another encoder than the one it will be queried with."""
    have = manifest.get("encoder_fingerprint")
    if expected_encoder_fingerprint is not None and have != expected_encoder_fingerprint:
        raise IndexMismatchError(
            f"index {version_dir} was built with encoder fingerprint {have} (encoder {manifest.get('encoder')!r}), "
            f"but it is being queried with an encoder whose fingerprint is {expected_encoder_fingerprint}; "
            f"rebuild the index with this encoder (`latentrag index`) or query it with the encoder it was built with")


def read_faiss(path: Path, mmap: bool) -> faiss.Index:
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # index types that cannot be memory-mapped are read into memory
            pass
    return faiss.read_index(str(path))


class IndexRows:
    """The rows of an index version as every `SearchIndex` over a version directory serves them: `path`,
    `manifest`, `ids`, `embeddings` (memory-mapped or read), passage texts; subclasses add `search`."""

    def __init__(self, path: Path, manifest: dict, ids: list[str], embeddings: np.ndarray, passages: pa.Table):
        self.path = Path(path)
        self.manifest = manifest
        self.ids = ids
        self.embeddings = embeddings
        self._passages = passages
        self._titles = passages.column("title").combine_chunks() if "title" in passages.column_names else None
        self._texts = passages.column("text").combine_chunks() if "text" in passages.column_names else None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return self.manifest.get("metric", "ip")

    def __len__(self) -> int:
        return len(self.ids)

    def passage(self, row: int) -> dict:
        row = int(row)
        if not 0 <= row < len(self.ids):
            raise IndexError(f"row {row} out of range for an index of {len(self.ids)} passages")
        if self._texts is None:
            raise ValueError(f"index {self.path} was written without passage texts")
        title = self._titles[row].as_py() if self._titles is not None else ""
        return {"id": self.ids[row], "title": title or "", "text": self._texts[row].as_py() or ""}


def read_rows(root_or_version_dir: str | os.PathLike, expected_encoder_fingerprint: str | None = None,
              mmap: bool = True, with_faiss: bool = True
              ) -> tuple[Path, dict, list[str], np.ndarray, pa.Table, faiss.Index | None]:
    """(version_dir, manifest, ids, embeddings, passages, FAISS index or None) of an index root's current version or
    a version directory: the encoder checked first, then the files' row counts against the manifest. With `mmap`,
    embeddings.npy (and the FAISS index where its type allows) are memory-mapped, not read."""
    version_dir = resolve_version_dir(root_or_version_dir)
    manifest = json.loads((version_dir / MANIFEST_NAME).read_text())
    check_encoder(version_dir, manifest, expected_encoder_fingerprint)
    for name in (INDEX_NAME, EMBEDDINGS_NAME, PASSAGES_NAME):
        if not (version_dir / name).is_file():
            raise FileNotFoundError(f"index version {version_dir} is missing {name}")
    index = None
    if with_faiss:
        index = read_faiss(version_dir / INDEX_NAME, mmap)
        _apply_search_params(index, manifest["type"], manifest.get("params", {}))
    embeddings = np.load(version_dir / EMBEDDINGS_NAME, mmap_mode="r" if mmap else None)
    passages = pq.read_table(version_dir / PASSAGES_NAME, memory_map=mmap)
    ids = passages.column("id").to_pylist()
    n = int(manifest["count"])
    ntotal = n if index is None else index.ntotal
    if not (ntotal == len(ids) == embeddings.shape[0] == n):
        vectors = f"index {index.ntotal} vectors, " if index is not None else ""
        raise IndexVerificationError(
            f"index version {version_dir} is inconsistent: manifest count {n}, {vectors}"
            f"{len(ids)} ids, {embeddings.shape[0]} embedding rows")
    return version_dir, manifest, ids, embeddings, passages, index
