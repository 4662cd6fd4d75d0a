"""`rag-token`: loss = -sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y_<t)."""
from __future__ import annotations

from pipeline.estimators.marginals import rag_token_nll
from pipeline.estimators.rag_sequence import RagSequence
from pipeline.estimators.registry import register


@register
class RagToken(RagSequence):
    name = "rag-token"
    decoder = "rag-token"                 # beam search over the per-token marginal
    marginal = staticmethod(rag_token_nll)
