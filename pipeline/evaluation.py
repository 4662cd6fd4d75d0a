"""Evaluation of a RagModel on QA rows: EM and F1 of decoded answers, recall@k of the retriever."""
from __future__ import annotations

import time

import torch

from pipeline.data import GoldPassages
from pipeline.decoding import rag_sequence_decode, rag_token_decode
from pipeline.estimators.registry import DECODERS, get, objective_for
from pipeline.metrics import exact_match, f1_by_answer_type, f1_score, recall_at_k

RECALL_KS = (1, 5, 20)
_GOLD_CACHE: list = [None, None]          # [the index ids resolved last, their GoldPassages]


def gold_passages(index) -> GoldPassages:
    """The gold-id resolver of `index` (its passage ids), kept while the same ids are evaluated again (dev
    evaluations every eval_every steps)."""
    if _GOLD_CACHE[0] is not index.ids:
        _GOLD_CACHE[:] = [index.ids, GoldPassages(index.ids)]
    return _GOLD_CACHE[1]


def decoder_for(estimator) -> str:
    """How a model trained with `estimator` answers: "rag-sequence" or "rag-token", the registered estimator's
    `decoder`. `estimator`: a registered name, or a run Config (train.estimator's decoder, in every strategy)."""
    if isinstance(estimator, str):
        return get(estimator).decoder
    return objective_for(estimator).decoder


def decode_answers(model, questions: list[str], decoder: str, k: int = 5, num_beams: int = 1,
                   decode: str = "fast", candidates=None) -> list:
    """Answers of `questions` with `decoder` (`decoder_for(...)`); `decode`: fast | thorough (rag-sequence)."""
    if decoder == "rag-token":
        return rag_token_decode(model, questions, k=k, num_beams=num_beams, candidates=candidates)
    if decoder == "rag-sequence":
        return rag_sequence_decode(model, questions, k=k, num_beams=num_beams, thorough=decode == "thorough",
                                   candidates=candidates)
    raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")


@torch.no_grad()
def evaluate(model, rows: list[dict], k: int = 5, estimator: str = "rag-sequence", decode: str = "fast",
             num_beams: int = 1, batch_size: int = 32, max_questions: int = 0, progress=None,
             retrieve=None) -> tuple[dict, list]:
    """Returns (metrics, predictions). `estimator` (a registered name, or a run Config) chooses the decoder
    (`decoder_for`). The reader reads `model.retrieve(questions, k)`: the top k, or with hybrid candidates the
    k + H of `RagModel.prior_rows`; recall@1/5/20 are the retriever's ranking's (dense, or with a fused prior the
    dense top-20 and BM25's top-H ranked by the fused score), recall@candidates the read set's.
    `retrieve(questions, depth) -> Candidates` replaces the model's own retrieval (a baseline such as BM25
    candidates read by the model's generator; its top k are read). F1 is also reported per answer type
    (`f1_yes_no`, `f1_other`: `pipeline.metrics.answer_type`).
    Recall needs `gold_passage_ids`; questions without them are left out of it. A gold id names a corpus row:
    every window of a split row counts (`GoldPassages`); an id that names no row is refused before decoding."""
    decoder = decoder_for(estimator)
    rows = rows[:max_questions] if max_questions else rows
    gold_of = gold_passages(model.index)
    gold_of.check(rows, "the evaluation questions")
    was_training = model.training
    model.eval()
    depth = min(max(max(RECALL_KS), k), len(model.index.ids))
    width = model.width(k) if hasattr(model, "width") and retrieve is None else k
    retrieved, read, gold, ems, f1s, predictions = [], [], [], [], [], []
    start = time.time()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        questions = [r["question"] for r in chunk]
        if retrieve is not None or width == k:
            ranked = cand = (retrieve or model.retrieve)(questions, depth)
        else:   # hybrid: the retriever's ranking (recall@1/5/20) and the k + H candidates the reader reads
            q = model.query_encoder(questions)
            # a fused prior ranks the dense top-depth and BM25's top-H by its own score; else the dense order
            ranked_rows = (model.prior_rows(questions, q, min(depth, len(model.index.ids) - model.hybrid_k))
                           if model.bm25_weight else model.search_rows(q, depth))
            ranked = model.candidates(ranked_rows, q)
            cand = model.candidates(model.prior_rows(questions, q, k), q)
        retrieved += ranked.ids
        read += cand.ids
        gold += [gold_of.passages(r.get("gold_passage_ids")) for r in chunk]
        decoded = decode_answers(model, questions, decoder, k=width, num_beams=num_beams, decode=decode,
                                 candidates=cand)
        for r, d in zip(chunk, decoded):
            ems.append(exact_match(d.answer, r["answers"]))
            f1s.append(f1_score(d.answer, r["answers"]))
            predictions.append({"id": r.get("id"), "question": r["question"], "answers": r["answers"],
                                "prediction": d.answer, "score": d.score,
                                "top_passage": d.passages[0]["id"] if d.passages else None})
        if progress:
            progress(min(i + batch_size, len(rows)), len(rows))
    model.train(was_training)
    n = len(rows)
    metrics = {
        "em": sum(ems) / n if n else 0.0,
        "f1": sum(f1s) / n if n else 0.0,
        **{f"recall@{kk}": recall_at_k(retrieved, gold, kk) for kk in RECALL_KS},
        **f1_by_answer_type(f1s, [r["answers"] for r in rows]),
        "recall@candidates": recall_at_k(read, gold, width),      # does the set the reader reads hold a gold one
        "candidates": width,
        "num_questions": n,
        "eval_seconds": round(time.time() - start, 2),
    }
    return metrics, predictions
