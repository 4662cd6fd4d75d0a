"""Shared by the in-process benchmarks: a cached flat index over a passage list (no Ray)."""
from __future__ import annotations

from pathlib import Path

from pipeline.index import load_index, passage_text, write_index_version
from pipeline.models.retriever import TextEncoder, encoder_fingerprint


def cached_index(tag: str, passages: list[dict], encoder: TextEncoder):
    """Encode the passages once per (tag, size) into /tmp and load the index."""
    root = Path(f"/tmp/latentrag-bench-index-{tag}-{len(passages)}")
    if not (root / "current").exists():
        texts = [passage_text(x.get("title", ""), x["text"]) for x in passages]
        write_index_version(root, encoder.encode(texts).numpy(), [str(x["id"]) for x in passages], "flat",
                            encoder_name="minilm", encoder_fingerprint=encoder_fingerprint("minilm"),
                            corpus_fingerprint=f"bench-{tag}", titles=[x.get("title", "") for x in passages],
                            texts=[x["text"] for x in passages])
    return load_index(root)


def synthetic_index(kb, encoder: TextEncoder, seed: int, templates: str):
    """The index over a synthetic knowledge base's passages."""
    return cached_index(f"{seed}-{templates}", kb.passages, encoder)
