"""BM25 over an index version's passages (bm25s), for hybrid candidates (`retriever.hybrid_k`).

Built once per index version from the same passage texts the dense index holds (`passage_text(title, text)`, row
for row) and saved beside the FAISS index with bm25s's own save/load:

    vN/bm25/            params.index.json, vocab.index.json, data/indices/indptr.csc.index.npy (bm25s)
    vN/bm25/latentrag.json   what it was built with (k1, b, stopwords) and over which rows (count, ids SHA-256)

Rows are the index's row numbers, so BM25's hits and the dense hits name passages alike. k1 0.9, b 0.4 and English
stopwords measured best on cmu_qa_wiki (DESIGN.md, "Measured leads"). A version directory without `bm25/` gets
one the first time a hybrid model opens it (the train driver does it before any worker starts); the directory is
written aside and renamed, so a reader never sees half of it. No Ray here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import bm25s
import numpy as np

from pipeline.index.errors import IndexFormatError
from pipeline.index.protocol import passage_text
from pipeline.index.store import MANIFEST_NAME

BM25_DIR = "bm25"
BM25_META = "latentrag.json"
K1, B, STOPWORDS = 0.9, 0.4, "en"

logger = logging.getLogger(__name__)


def ids_digest(ids) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\n")
    return h.hexdigest()


def _tokenize(texts: list[str], return_ids: bool):
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=return_ids, show_progress=False)


class Bm25Index:
    """BM25 over the rows of one index version. `search(questions, k)` -> (scores [B, k], rows [B, k]) best
    first; rows whose BM25 score is 0 (no query term in the passage: no evidence at all) are -1 unless
    `with_zero_scores` (then BM25's plain top-k, as a baseline ranks)."""

    def __init__(self, retriever, meta: dict, path: Path | None = None):
        self.retriever, self.meta, self.path = retriever, meta, path

    def __len__(self) -> int:
        return int(self.meta["count"])

    @classmethod
    def build(cls, texts: list[str], ids) -> "Bm25Index":
        if not texts:
            raise IndexFormatError("cannot build BM25 over an empty index")
        retriever = bm25s.BM25(k1=K1, b=B)
        retriever.index(_tokenize(list(texts), return_ids=True), show_progress=False)
        meta = {"k1": K1, "b": B, "stopwords": STOPWORDS, "count": len(texts), "ids_sha256": ids_digest(ids),
                "bm25s": bm25s.__version__}
        return cls(retriever, meta)

    def search(self, questions: list[str], k: int, with_zero_scores: bool = False) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), len(self))
        docs, scores = self.retriever.retrieve(_tokenize(list(questions), return_ids=False), k=k,
                                               show_progress=False, n_threads=0)
        rows = docs.astype(np.int64) if with_zero_scores else np.where(scores > 0, docs, -1).astype(np.int64)
        return scores.astype(np.float32), rows

    def scores(self, questions: list[str], rows: np.ndarray) -> np.ndarray:
        """[B, M] BM25 scores of the given index rows [B, M] (-1 rows score 0): what a fused prior adds to the
        dense scores. bm25s scores every passage of a query at once, as its own top-k search does."""
        rows = np.asarray(rows)
        out = np.zeros(rows.shape, dtype=np.float32)
        for i, tokens in enumerate(_tokenize(list(questions), return_ids=False)):
            ids = self.retriever.get_tokens_ids(list(tokens))
            if ids:       # a question of stopwords only scores 0 everywhere
                full = self.retriever.get_scores_from_ids(ids)
                out[i] = np.where(rows[i] >= 0, full[np.clip(rows[i], 0, None)], 0.0)
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write into `directory` (must not exist yet) atomically: aside, then renamed."""
        directory = Path(directory)
        tmp = directory.parent / f".{directory.name}-{uuid.uuid4().hex}.tmp"
        try:
            self.retriever.save(str(tmp), show_progress=False)
            (tmp / BM25_META).write_text(json.dumps(self.meta, indent=2))
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Bm25Index":
        directory = Path(directory)
        meta_file = directory / BM25_META
        if not meta_file.is_file():
            raise IndexFormatError(f"{directory} is not a BM25 index written by latentrag (no {BM25_META})")
        meta = json.loads(meta_file.read_text())
        retriever = bm25s.BM25.load(str(directory), mmap=True, show_progress=False)
        if int(retriever.scores["num_docs"]) != int(meta["count"]):
            raise IndexFormatError(f"BM25 index {directory} holds {retriever.scores['num_docs']} passages, its "
                                   f"{BM25_META} says {meta['count']}")
        return cls(retriever, meta, directory)


def _texts(index) -> list[str]:
    out = []
    for row in range(len(index.ids)):
        p = index.passage(row)
        out.append(passage_text(p.get("title", ""), p["text"]))
    return out


def open_bm25(index) -> Bm25Index:
    """The BM25 index of `index` (a `SearchIndex`): loaded from its version directory's `bm25/`, else built from
    its passages and saved there (kept in memory only when the index has no version directory, e.g. an
    `ArrayIndex`, or the directory is read-only). One that does not match the index's rows is refused."""
    version_dir = Path(index.path)
    on_disk = (version_dir / MANIFEST_NAME).is_file()
    target = version_dir / BM25_DIR
    if on_disk and target.is_dir():
        bm25 = Bm25Index.load(target)
        _check_rows(bm25, index, target)
        return bm25
    bm25 = Bm25Index.build(_texts(index), index.ids)
    if on_disk:
        try:
            bm25.save(target)
        except OSError as exc:
            if target.is_dir():                      # another process saved it first: use theirs
                bm25 = Bm25Index.load(target)
                _check_rows(bm25, index, target)
            else:
                logger.warning("BM25 index for %s kept in memory: cannot write %s (%s)", version_dir, target, exc)
    return bm25


def _check_rows(bm25: Bm25Index, index, where: Path) -> None:
    if len(bm25) != len(index.ids) or bm25.meta.get("ids_sha256") != ids_digest(index.ids):
        raise IndexFormatError(f"BM25 index {where} was built over other passages than index {index.path} "
                               f"({len(bm25)} vs {len(index.ids)} rows, or other ids); remove {where} to rebuild it")
