"""jobs.prepare_qa: document-level gold ids after re-chunking, train/dev/test splits with no document in two."""
import json

from jobs import prepare_qa
from pipeline.data import read_qa


def test_prepare_rechunks_and_splits_by_document(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    docs = {f"d{i}": " ".join(f"w{i}_{j}" for j in range(30 if i % 2 else 8)) for i in range(8)}
    corpus.write_text("".join(json.dumps({"id": f"{d}_000", "doc_id": d, "title": d, "text": t}) + "\n"
                              for d, t in docs.items()))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": f"q about d{i % 8}?", "answers": ["yes"],
                                      "doc_id": f"d{i % 8}", "split": "train" if i < 16 else "dev"}) + "\n"
                          for i in range(40)))
    s = prepare_qa.prepare(str(corpus), str(qa), tmp_path / "out", chunk_words=10, chunk_overlap=2)
    assert s["documents"] == 8 and s["passages"] > 8                    # long documents were re-chunked
    train, dev, test = (read_qa(tmp_path / "out" / f"{n}.jsonl") for n in ("train", "dev", "test"))
    assert len(train) == 16 and len(dev) + len(test) == 24
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in dev + test})
    doc_of = {r["id"]: r["gold_passage_ids"][0].split("_")[0] for r in train + dev + test}
    assert not {doc_of[r["id"]] for r in dev} & {doc_of[r["id"]] for r in test}   # no document in both
    long = next(r for r in train if doc_of[r["id"]] == "d1")
    assert len(long["gold_passage_ids"]) > 1 and all(g.startswith("d1_000#") for g in long["gold_passage_ids"])
    assert (tmp_path / "out" / "passages" / "passages.json").exists()

