"""`rag-sequence`: loss = -log sum_{k in top-K} p(z_k|x) p(y|x,z_k)."""
from __future__ import annotations

import torch

from pipeline.estimators.base import Estimator, EstimatorOutput, entropy
from pipeline.estimators.marginals import passage_posterior, rag_sequence_nll
from pipeline.estimators.registry import register


@register
class RagSequence(Estimator):
    name = "rag-sequence"
    decoder = "rag-sequence"
    marginal = staticmethod(rag_sequence_nll)

    def loss(self, model, questions, answers, rows=None):
        cand = model.retrieve(questions, self.k)                       # no-grad top-K from the index
        doc_logprobs = torch.log_softmax(model.doc_scores(questions, cand), dim=-1)   # [B, K], grad -> retriever
        token_lp, mask = model.answer_token_logprobs(questions, cand, answers)        # [B, K, T], grad -> generator
        nll = self.marginal(token_lp, doc_logprobs, mask)
        with torch.no_grad():
            post = passage_posterior(token_lp, doc_logprobs, mask)
            diag = {
                "nll": float(nll.mean()),
                "prior_entropy": float(entropy(doc_logprobs).mean()),
                "posterior_entropy": float(entropy(post.clamp_min(1e-12).log()).mean()),
                "prior_top1_mass": float(doc_logprobs.exp()[:, 0].mean()),
                "posterior_top1_agree": float((post.argmax(-1) == doc_logprobs.argmax(-1)).float().mean()),
            }
        return EstimatorOutput(nll.mean(), diag)
