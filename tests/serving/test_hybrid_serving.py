"""A checkpoint trained with hybrid candidates (retriever.hybrid_k) is evaluated and served with them: the Retriever
deployment's share loads the index version's BM25 index and returns the k + H passages evaluation reads (no Ray)."""
from serve_testlib_ckpt import tiny_model

from serving.app import _decode_group, _retrieve_group
from serving.batching import AnswerItem, RetrieveItem
from serving.loading import load_generator_part, load_retriever_part, resolve_model_ref

QUESTIONS = ["Who plays the zumbrel at festivals?", "Where does Tamsin Vey keep bees?"]


def test_serving_loads_bm25_and_answers_from_the_candidates_evaluation_used(tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.config import from_dict
    from pipeline.index.bm25 import BM25_DIR

    model = tiny_model(tmp_path / "index")
    cfg = from_dict({"retriever": {"hybrid_k": 2}, "eval": {"k": 2}}).validate()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, step=3)

    evaluated, _, _ = load_checkpoint(ckpt)                  # what eval and the train driver's evaluation load
    assert evaluated.hybrid_k == 2 and (evaluated.index.path / BM25_DIR).is_dir()   # built once, beside FAISS
    expected = evaluated.retrieve(QUESTIONS, 2)
    _, bm25_rows = evaluated.bm25.search(QUESTIONS, 2)

    ref = resolve_model_ref(str(ckpt))
    assert ref.hybrid_k == 2
    retriever = load_retriever_part(ref)
    assert retriever.bm25 is not None and retriever.bm25.path == evaluated.index.path / BM25_DIR   # loaded
    found = _retrieve_group(retriever, [RetrieveItem({}, q, 2, f"r{i}") for i, q in enumerate(QUESTIONS)]
                            + [RetrieveItem({}, QUESTIONS[0], 1, "r-k1")])     # another k in the same batch
    for i in range(2):
        rows = [p["row"] for p in found[i].passages]
        assert rows == expected.rows[i].tolist() and len(rows) == 4      # k + H, the evaluation's candidates
        assert {int(r) for r in bm25_rows[i] if r >= 0} <= set(rows)
    assert [p["row"] for p in found[2].passages] == evaluated.retrieve(QUESTIONS[:1], 1).rows[0].tolist()

    gen = load_generator_part(ref)
    items = [AnswerItem({}, q, "rag-sequence", 2, 1, 4, f"r{i}", r) for i, (q, r) in enumerate(zip(QUESTIONS, found))]
    answers = _decode_group(gen, items, thorough=False)
    assert all(len(a.posterior) == 4 for a in answers)                   # the generator read all k + H
