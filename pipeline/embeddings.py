"""The embeddings directory: what `latentrag encode` writes and the index build reads (no Ray here; jobs/encode.py
runs the encode on Ray Data and streams its output through `ShardWriter`).

    out_dir/
      encode.json           settings of the run (encoder + fingerprint, dtype, passages dir); a rerun must match them
      emb-<shard>.parquet   one per passage shard: id (string), embedding (fixed_size_list<float32|float16>[dim]),
                            written under a temporary name and renamed into place once every row of its shard is in it
      embeddings.json       written last: count, dim, dtype, fingerprints, per-shard rows, timings, actor peak RSS

`load_embeddings(out_dir)` reads them back as (ids, float32 [N, dim]) sorted by id; `iter_embedding_shards` yields
them shard by shard, checked against embeddings.json; `gather_checked` lines them up with their passage shards
for an index build (rows in passage-shard order).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import write_json
from pipeline.index.errors import IndexFormatError

SUMMARY_NAME = "embeddings.json"
SETTINGS_NAME = "encode.json"
SHARD_PREFIX = "emb-"
DTYPES = ("float32", "float16")
PATH_COL = "path"      # the passage shard a row came from: which emb-<shard>.parquet it goes to


class EmbeddingsFormatError(IndexFormatError):
    """An embeddings directory whose shards disagree with its embeddings.json (dim, rows, ids) or with the passages."""


# ---------------------------------------------------------------------------------------------------- passages side
def passage_files(passages_dir: str | os.PathLike) -> list[str]:
    """The Parquet shards of a passage directory (``passages-*.parquet``); raises FileNotFoundError if none."""
    d = Path(passages_dir)
    if d.is_file():
        raise FileNotFoundError(f"{d} is a file, not a passage directory; `latentrag ingest --corpus {d} --out DIR` "
                                "makes one (passages-*.parquet + passages.json), then pass --passages DIR")
    if not d.is_dir():
        raise FileNotFoundError(f"passages directory not found: {d} (`latentrag ingest --corpus FILE --out {d}` "
                                "makes it)")
    files = sorted(glob.glob(str(d / "passages-*.parquet"))) or sorted(glob.glob(str(d / "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no passage shards (passages-*.parquet) in {d}; `latentrag ingest --corpus FILE "
                                f"--out {d}` writes them")
    return files


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
    h = hashlib.sha256()
    for f in passage_files(passages_dir):
        h.update(Path(f).name.encode())
        h.update(str(Path(f).stat().st_size).encode())
    return "files-" + h.hexdigest()[:16]


def shard_output_name(passage_file: str | os.PathLike) -> str:
    """The embedding shard written for one input passage shard: ``emb-<input file name>``."""
    return SHARD_PREFIX + Path(passage_file).name


def read_passage_shard(f: str) -> pa.Table:
    """id, title ("" when the shard has none), text of one passage shard, as strings."""
    names = pq.read_schema(f).names
    t = pq.read_table(f, columns=[c for c in ("id", "title", "text") if c in names])
    if "title" not in t.column_names:
        t = t.append_column("title", pa.array([""] * t.num_rows, pa.string()))
    return t.select(["id", "title", "text"]).cast(pa.schema(
        [("id", pa.string()), ("title", pa.string()), ("text", pa.string())])).combine_chunks()


# ---------------------------------------------------------------------------------------------------- writing
def encode_settings(passages_dir: str | os.PathLike, encoder: str | None, dtype: str,
                    compute_dtype: str = "float32") -> dict:
    """What encode.json records, and what a resumed encode must match (`compute_dtype`: the model's precision,
    bfloat16 vectors are close to float32's but not the same)."""
    # heavy (torch + transformers), and only needed once an encode really starts
    from pipeline.models.retriever import encoder_fingerprint

    return {"encoder": encoder, "encoder_fingerprint": encoder_fingerprint(encoder), "dtype": dtype,
            "compute_dtype": compute_dtype, "passages_dir": str(Path(passages_dir).resolve()),
            "corpus_fingerprint": corpus_fingerprint(passages_dir)}


def prepare_out_dir(out_dir: Path, settings: dict, overwrite: bool, resume: bool) -> None:
    """Create `out_dir`, or check that an existing one is a resumable run of the same settings."""
    settings_file = out_dir / SETTINGS_NAME
    if out_dir.exists() and any(out_dir.iterdir()):
        looks_ours = settings_file.is_file() or (out_dir / SUMMARY_NAME).is_file() or list(out_dir.glob("*.parquet"))
        if overwrite:
            if not looks_ours:
                raise FileExistsError(f"refusing to overwrite {out_dir}: it does not look like an embeddings directory")
            shutil.rmtree(out_dir)
        elif not settings_file.is_file():
            raise FileExistsError(f"output directory {out_dir} is not empty and holds no {SETTINGS_NAME} of an "
                                  f"earlier encode to resume (pass overwrite=True / --overwrite)")
        elif not resume:
            raise FileExistsError(f"output directory {out_dir} is not empty (pass overwrite=True / --overwrite, or "
                                  f"resume=True / --resume to finish an interrupted encode)")
        else:
            before = json.loads(settings_file.read_text())
            before.setdefault("compute_dtype", "float32")     # written before the setting existed
            for key in ("encoder_fingerprint", "dtype", "compute_dtype", "passages_dir"):
                if before.get(key) != settings[key]:
                    raise FileExistsError(
                        f"cannot resume the encode in {out_dir}: {SETTINGS_NAME} has {key}={before.get(key)!r} but "
                        f"this run has {settings[key]!r} (use --overwrite to start over)")
            for tmp in out_dir.glob(".tmp-*"):       # partial shards of the interrupted run
                tmp.unlink(missing_ok=True)
            (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
            return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings, settings_file)


def write_empty_shard(out_dir: Path, passage_file: str | os.PathLike) -> None:
    """The output of an empty passage shard: an embedding shard with no rows."""
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}),
                   out_dir / shard_output_name(passage_file))


class ShardWriter:
    """Streams encoded rows (id, embedding, path: the passage shard they came from) into ``emb-<shard>.parquet``
    files, one per passage shard, each renamed into place when all of its rows are written (`expected`: rows per
    shard name, known from the passage shards' Parquet metadata)."""

    def __init__(self, out_dir: Path, expected: dict[str, int], on_shard_done: Callable[[Path], None] | None):
        self.out_dir, self.expected, self.on_shard_done = out_dir, expected, on_shard_done
        self.writers: dict[str, tuple[pq.ParquetWriter, Path]] = {}
        self.written: dict[str, int] = {name: 0 for name in expected}
        self.done: list[str] = []

    def add(self, batch: pa.Table) -> None:
        if batch.num_rows == 0:
            return
        names = [Path(p).name for p in batch.column(PATH_COL).to_pylist()]
        data = batch.select(["id", "embedding"])
        for name in dict.fromkeys(names):      # distinct names in first-seen order
            if name not in self.expected:
                raise RuntimeError(f"encoder returned rows of {name!r}, which is not an input shard of this run")
            part = data.filter(pa.array([n == name for n in names])) if len(set(names)) > 1 else data
            if name not in self.writers:
                tmp = self.out_dir / f".tmp-{uuid.uuid4().hex}-{name}"
                self.writers[name] = (pq.ParquetWriter(tmp, part.schema), tmp)
            self.writers[name][0].write_table(part)
            self.written[name] += part.num_rows
            if self.written[name] > self.expected[name]:
                raise RuntimeError(f"{name}: encoded {self.written[name]} rows, the shard holds {self.expected[name]}")
            if self.written[name] == self.expected[name]:
                self._commit(name)

    def missing(self) -> dict[str, tuple[int, int]]:
        """Shards not committed yet: name -> (rows written, rows expected)."""
        return {n: (self.written[n], self.expected[n]) for n in self.expected if n not in self.done}

    def _commit(self, name: str) -> None:
        writer, tmp = self.writers.pop(name)
        writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        final = self.out_dir / shard_output_name(name)
        os.replace(tmp, final)
        self.done.append(name)
        if self.on_shard_done is not None:
            self.on_shard_done(final)
        delay = float(os.environ.get("LATENTRAG_ENCODE_TEST_PAUSE_S", "0") or 0)  # test hook: widen the crash window
        if delay:
            time.sleep(delay)

    def abort(self) -> None:
        for writer, tmp in self.writers.values():
            try:
                writer.close()
            finally:
                tmp.unlink(missing_ok=True)
        self.writers.clear()


def shard_records(out_dir: Path, passage_files_: list[str]) -> tuple[list[dict], int]:
    """embeddings.json's per-shard records (file, source, rows), in passage-shard order, and the dimension."""
    shards, dim = [], 0
    for f in passage_files_:
        out = out_dir / shard_output_name(f)
        meta = pq.read_metadata(out)
        field = pq.read_schema(out).field("embedding")
        if meta.num_rows:
            dim = int(field.type.list_size)
        shards.append({"file": out.name, "source": Path(f).name, "rows": meta.num_rows})
    return shards, dim


# ---------------------------------------------------------------------------------------------------- reading
def read_summary(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / SUMMARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the encode of {out_dir} did not finish (rerun it to resume)")
    return json.loads(path.read_text())


def _shard_arrays(path: Path, dim: int | None) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path, columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    if table.num_rows == 0:
        return ids, np.zeros((0, dim or 0), np.float32)
    col = table.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        have = int(col.type.list_size)
    else:  # variable-size lists (written by another tool): every row must have the same length
        lengths = set(np.diff(col.offsets.to_numpy()).tolist())
        if len(lengths) != 1:
            raise EmbeddingsFormatError(f"{path}: embeddings have different lengths {sorted(lengths)[:5]}")
        have = lengths.pop()
    if dim is not None and have != dim:
        raise EmbeddingsFormatError(f"{path}: embedding dimension {have} disagrees with dim {dim} in {SUMMARY_NAME}")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return ids, np.ascontiguousarray(flat.reshape(table.num_rows, have), dtype=np.float32)


def iter_embedding_shards(out_dir: str | os.PathLike) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """(source passage shard name, ids, float32 [n, dim]) per shard, in input-shard order, each checked against
    embeddings.json: its dimension and row count must match (`EmbeddingsFormatError` names the file)."""
    out_dir = Path(out_dir)
    summary = read_summary(out_dir)
    dim = int(summary["dim"])
    for shard in summary["shards"]:
        path = out_dir / shard["file"]
        if not path.is_file():
            raise EmbeddingsFormatError(f"{path} is listed in {out_dir / SUMMARY_NAME} but missing")
        ids, emb = _shard_arrays(path, dim)
        if len(ids) != int(shard["rows"]):
            raise EmbeddingsFormatError(f"{path}: {len(ids)} rows, {SUMMARY_NAME} says {shard['rows']}")
        yield shard["source"], ids, emb


def load_embeddings(out_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All embedding shards of `out_dir` as (ids, float32 [N, dim]), sorted by id (a deterministic order that does not
    depend on how Ray scheduled the blocks). Raises ValueError on duplicate ids or a ragged embedding column."""
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no embedding shards (*.parquet) in {out_dir}")
    all_ids: list[str] = []
    parts = []
    dim = None
    for f in shards:
        ids, emb = _shard_arrays(f, dim)
        if len(ids):
            dim = emb.shape[1]
            all_ids += ids
            parts.append(emb)
    if not all_ids:
        return [], np.zeros((0, 0), np.float32)
    emb = np.concatenate(parts)
    order = np.argsort(np.asarray(all_ids, dtype=object), kind="stable")
    ids = [all_ids[i] for i in order]
    emb = np.ascontiguousarray(emb[order])
    dup = [a for a, b in zip(ids[1:], ids[:-1]) if a == b]
    if dup:
        raise ValueError(f"{out_dir}: passage id {dup[0]!r} appears more than once")
    return ids, emb


def gather_checked(emb_dir: Path, passage_files_: list[str]):
    """Rows in shard order (input shards, then the passage shard's order inside each): ids, float32 embeddings,
    titles, texts, and the row count of each shard. Each embedding shard must hold exactly the ids of its passage
    shard."""
    by_name = {Path(f).name: f for f in passage_files_}
    ids, parts, titles, texts, shard_rows = [], [], [], [], []
    seen = set()
    for source, shard_ids, emb in iter_embedding_shards(emb_dir):
        if source not in by_name:
            raise EmbeddingsFormatError(f"{emb_dir}: embeddings of {source!r}, which is not a passage shard any more")
        passages = read_passage_shard(by_name.pop(source))
        pid = passages.column("id").to_pylist()
        pos = {p: i for i, p in enumerate(pid)}
        if len(shard_ids) != len(pid) or set(shard_ids) != set(pos):
            extra = sorted(set(shard_ids) - set(pos))[:3]
            lacking = sorted(set(pos) - set(shard_ids))[:3]
            raise EmbeddingsFormatError(
                f"{emb_dir / (SHARD_PREFIX + source)}: its ids disagree with passage shard {source} "
                f"({len(shard_ids)} vs {len(pid)} rows; not in the passages: {extra}; not encoded: {lacking})")
        dup = seen.intersection(shard_ids)
        if dup:
            raise EmbeddingsFormatError(f"passage id {sorted(dup)[0]!r} appears in more than one shard "
                                        f"(again in {source})")
        seen.update(shard_ids)
        # rows in passage-shard order, whatever order the encode wrote them in (its tokenize stage sorts by length)
        order = np.argsort(np.fromiter((pos[i] for i in shard_ids), np.int64, len(shard_ids)), kind="stable")
        ids += pid
        titles += passages.column("title").to_pylist()
        texts += passages.column("text").to_pylist()
        parts.append(emb[order])
        shard_rows.append(len(shard_ids))
    if by_name:
        raise EmbeddingsFormatError(f"{emb_dir}: no embeddings for passage shard(s) {sorted(by_name)[:5]}")
    nonempty = [p for p in parts if len(p)]
    if not nonempty:
        raise IndexFormatError(f"{emb_dir}: no passages to index")
    return ids, np.concatenate(nonempty), titles, texts, shard_rows
