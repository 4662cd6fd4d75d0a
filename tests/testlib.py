"""What many tests share: the six-passage fixture corpus and a real MiniLM index written without Ray."""
from pathlib import Path

from pipeline.index import passage_text, write_index_version
from pipeline.models.retriever import TextEncoder, encoder_fingerprint

PASSAGES = [
    {"id": "a", "title": "Varnel Ostrik", "text": "Varnel Ostrik was born in the town of Meridale."},
    {"id": "b", "title": "Varnel Ostrik", "text": "Varnel Ostrik worked for the Quendle Guild."},
    {"id": "c", "title": "Kela Dorn", "text": "Kela Dorn plays the zumbrel at festivals."},
    {"id": "d", "title": "Kela Dorn", "text": "Kela Dorn grew up beside the river Ashvane."},
    {"id": "e", "title": "Tamsin Vey", "text": "Tamsin Vey sails a boat called the Gullwing."},
    {"id": "f", "title": "Tamsin Vey", "text": "Tamsin Vey keeps bees on the hill of Orrin."},
]
ANSWERS = ["Meridale", "Quendle Guild", "zumbrel", "Ashvane", "Gullwing", "Orrin"]


def minilm_index(root: str | Path, passages: list[dict] = PASSAGES, encoder: TextEncoder | None = None) -> Path:
    """A flat index version of `passages` ({id, title?, text}) encoded with the embedded MiniLM; its directory."""
    encoder = encoder or TextEncoder("minilm")
    emb = encoder.encode([passage_text(p.get("title", ""), p["text"]) for p in passages]).numpy()
    return write_index_version(root, emb, [p["id"] for p in passages], "flat", encoder_name="minilm",
                               encoder_fingerprint=encoder_fingerprint("minilm"), corpus_fingerprint="test",
                               titles=[p.get("title", "") for p in passages], texts=[p["text"] for p in passages])
