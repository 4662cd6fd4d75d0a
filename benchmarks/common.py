"""Shared by the in-process benchmarks: a cached flat index over a synthetic knowledge base (no Ray)."""
from __future__ import annotations

from pathlib import Path

from pipeline.index import load_index, passage_text, write_index_version
from pipeline.models.retriever import TextEncoder, encoder_fingerprint


def synthetic_index(kb, encoder: TextEncoder, seed: int, templates: str):
    """Encode the KB's passages once per (seed, templates, size) into /tmp and load the index."""
    root = Path(f"/tmp/latentrag-bench-index-{seed}-{templates}-{len(kb.passages)}")
    if not (root / "current").exists():
        texts = [passage_text(x.get("title", ""), x["text"]) for x in kb.passages]
        write_index_version(root, encoder.encode(texts).numpy(), [x["id"] for x in kb.passages], "flat",
                            encoder_name="minilm", encoder_fingerprint=encoder_fingerprint("minilm"),
                            corpus_fingerprint="bench", titles=[x["title"] for x in kb.passages],
                            texts=[x["text"] for x in kb.passages])
    return load_index(root)
