"""A KL anchor that keeps the trained retriever near the one training started from.

While the generator cannot read yet, every estimator's retriever gradient is noise, and noise can walk the query
encoder away from a good start (measured: answers-only rag-sequence with a random generator took recall@1 from 0.58 to
0.00). The anchor adds

    weight * KL(p_0(z|x) || p(z|x)),   both normalised over C = current top-K ∪ starting top-K,

to the loss, with p_0 from a frozen copy of the starting query encoder. The forward KL is mass-covering: passages the
starting retriever liked keep some probability, so recall@K is protected, while the top-1 can still move.
`train.retriever_anchor_kl` sets the weight (0 = off).
"""
from __future__ import annotations

import copy

import torch

from pipeline.estimators.base import masked_log_softmax, union_rows


class RetrieverAnchor:
    def __init__(self, query_encoder, weight: float, k: int):
        self.weight, self.k = float(weight), int(k)
        self.encoder = copy.deepcopy(query_encoder).eval().requires_grad_(False)

    def kl(self, model, questions: list[str]) -> torch.Tensor:
        """[B] KL(p_0 || p) over C, differentiable in the current query encoder."""
        q = model.query_encoder(questions)
        with torch.no_grad():
            q0 = self.encoder(questions)
        rows_now, rows_start = model.search_rows(q, self.k), model.search_rows(q0, self.k)
        rows, mask = union_rows(rows_now, rows_start)
        mask = mask.to(q.device)
        log_p = masked_log_softmax(model.score_rows(q, rows), mask)
        with torch.no_grad():
            log_p0 = masked_log_softmax(model.score_rows(q0, rows), mask)
        p0 = log_p0.exp()
        return (p0 * (log_p0 - log_p).masked_fill(~mask, 0.0)).sum(-1)

    def state_dict(self) -> dict:
        return {"weight": self.weight, "k": self.k, "encoder": self.encoder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])


class AnchoredObjective:
    """An estimator (or strategy objective) plus `anchor.weight * KL` while the query encoder trains."""

    def __init__(self, objective, anchor: RetrieverAnchor):
        self.objective, self.anchor = objective, anchor
        self.needs_rows = getattr(objective, "needs_rows", False)

    def loss(self, model, questions, answers, rows=None):
        from pipeline.estimators.base import EstimatorOutput

        if self.needs_rows:
            out = self.objective.loss(model, questions, answers, rows=rows)
        else:
            out = self.objective.loss(model, questions, answers)
        if not any(p.requires_grad for p in model.query_encoder.parameters()):
            return out                                   # retriever frozen (warm-up, phase 1): nothing to anchor
        kl = self.anchor.kl(model, questions).mean()
        return EstimatorOutput(out.loss + self.anchor.weight * kl, {**out.diagnostics, "anchor_kl": float(kl.detach())})
