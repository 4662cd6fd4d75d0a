"""Evaluation of a RagModel on QA rows: EM and F1 of decoded answers, recall@k of the retriever."""
from __future__ import annotations

import time

import torch

from pipeline.decoding import rag_sequence_decode, rag_token_decode
from pipeline.metrics import exact_match, f1_score, recall_at_k

RECALL_KS = (1, 5, 20)


@torch.no_grad()
def evaluate(model, rows: list[dict], k: int = 5, estimator: str = "rag-sequence", decode: str = "fast",
             num_beams: int = 1, batch_size: int = 32, max_questions: int = 0, progress=None) -> tuple[dict, list]:
    """Returns (metrics, predictions). Recall needs `gold_passage_ids`; questions without them are left out of it."""
    was_training = model.training
    model.eval()
    rows = rows[:max_questions] if max_questions else rows
    depth = min(max(max(RECALL_KS), k), len(model.index.ids))
    retrieved, gold, ems, f1s, predictions = [], [], [], [], []
    start = time.time()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        questions = [r["question"] for r in chunk]
        cand = model.retrieve(questions, depth)
        retrieved += cand.ids
        gold += [list(r.get("gold_passage_ids") or []) for r in chunk]
        if estimator == "rag-token":
            decoded = rag_token_decode(model, questions, k=k, num_beams=num_beams, candidates=cand)
        else:
            decoded = rag_sequence_decode(model, questions, k=k, num_beams=num_beams, thorough=decode == "thorough",
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
        "num_questions": n,
        "eval_seconds": round(time.time() - start, 2),
    }
    return metrics, predictions
