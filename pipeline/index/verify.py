"""Verification of a version directory: counts and dims agree, embeddings.npy matches its checksum, and a sample of
index vectors matches embeddings.npy (`latentrag index --verify`)."""
from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline.index.build import _apply_search_params
from pipeline.index.errors import IndexVerificationError
from pipeline.index.store import (EMBEDDINGS_NAME, INDEX_NAME, MANIFEST_NAME, PASSAGES_NAME, resolve_version_dir,
                                  sha256_file)


def verify_index(version_dir: str | os.PathLike, sample: int | None = 100, checksum: bool = True,
                 seed: int = 0) -> dict:
    """Check a version directory: counts and dims agree, the embeddings file matches its checksum, and a sample of
    index vectors matches embeddings.npy (reconstructed exactly for flat/hnsw, re-encoded for ivfpq, and each
    sampled vector finds its own row). Raises `IndexVerificationError` naming what disagrees; returns a report."""
    version_dir = resolve_version_dir(version_dir)
    manifest = json.loads((version_dir / MANIFEST_NAME).read_text())
    problems: list[str] = []
    emb_path = version_dir / EMBEDDINGS_NAME
    try:
        emb = np.load(emb_path, mmap_mode="r")
    except Exception as exc:  # truncated or garbled header
        raise IndexVerificationError(f"{emb_path} is unreadable: {exc}") from exc
    index = faiss.read_index(str(version_dir / INDEX_NAME))
    _apply_search_params(index, manifest["type"], manifest.get("params", {}))
    n_ids = pq.read_metadata(version_dir / PASSAGES_NAME).num_rows
    n, d = int(manifest["count"]), int(manifest["dim"])
    if not (index.ntotal == n_ids == emb.shape[0] == n):
        problems.append(f"counts disagree: manifest {n}, index {index.ntotal}, ids {n_ids}, embeddings {emb.shape[0]}")
    if emb.ndim != 2 or emb.shape[1] != d or index.d != d:
        problems.append(f"dims disagree: manifest {d}, index {index.d}, embeddings {emb.shape}")
    if emb.dtype != np.float32:
        problems.append(f"embeddings dtype is {emb.dtype}, expected float32")
    checked_sum = False
    if checksum and manifest.get("embeddings_sha256"):
        checked_sum = True
        if sha256_file(emb_path) != manifest["embeddings_sha256"]:
            problems.append(f"{EMBEDDINGS_NAME} does not match the checksum in {MANIFEST_NAME} (file changed or corrupt)")
    if problems:
        raise IndexVerificationError(f"index {version_dir} failed verification: " + "; ".join(problems))

    rng = np.random.default_rng(seed)
    rows = np.arange(n) if sample is None or sample >= n else np.sort(rng.choice(n, int(sample), replace=False))
    vecs = np.ascontiguousarray(emb[rows], dtype=np.float32)
    index_type = manifest["type"]
    if index_type in ("flat", "hnsw"):
        stored = np.stack([index.reconstruct(int(r)) for r in rows])
        bad = rows[~np.isclose(stored, vecs, rtol=1e-5, atol=1e-6).all(axis=1)]
    else:  # ivfpq stores codes: re-encode the embedding and compare with the stored vector's decoding
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        stored = np.stack([index.reconstruct(int(r)) for r in rows])
        expected = index.sa_decode(index.sa_encode(vecs))
        bad = rows[~np.isclose(stored, expected, rtol=1e-4, atol=1e-5).all(axis=1)]
    if len(bad):
        raise IndexVerificationError(
            f"index {version_dir} failed verification: {len(bad)} of {len(rows)} sampled rows of {EMBEDDINGS_NAME} "
            f"do not match the vectors in {INDEX_NAME} (first bad row {int(bad[0])})")
    # the sampled vectors should find themselves (exact for flat; approximate indexes may miss a few)
    k = min(10, n)
    _, found = index.search(vecs, k)
    self_hit = float(np.mean([(found[i] == r).any() for i, r in enumerate(rows)]))
    if index_type == "flat" and self_hit < 1.0:
        raise IndexVerificationError(f"index {version_dir}: only {self_hit:.2%} of sampled rows find themselves "
                                     f"in the top {k} of an exact index")
    return {"version_dir": str(version_dir), "version": manifest.get("version"), "type": index_type,
            "count": n, "dim": d, "sampled_rows": int(len(rows)), "checksum_checked": checked_sum,
            f"self_recall@{k}": self_hit, "ok": True}
