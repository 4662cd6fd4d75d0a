"""`vrag`: variational RAG. A posterior retriever q(z|x,y) (its own query encoder over "question [SEP] answer")
proposes C = its top-K; the ELBO is enumerated exactly over C:

    loss = sum_{k in C} q_k * NLL(y | x, z_k) + beta * KL(q || p),

with q = softmax(posterior scores / tau) and p = softmax(prior scores / tau), both normalised over C.
Gradients: generator through the q-weighted NLL; prior through the KL; posterior through both
(d/dq of sum_k q_k [NLL_k + beta log(q_k / p_k)]: exact, no sampling).
"""
from __future__ import annotations

import torch

from pipeline.estimators.base import Estimator, EstimatorOutput, entropy
from pipeline.estimators.marginals import sequence_logprobs


def vrag_loss(post_logits: torch.Tensor, prior_logits: torch.Tensor, seq_logprobs: torch.Tensor,
              beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example [B]: (loss, expected NLL, KL). Inputs [B, K]: posterior and prior scores over the same C and
    log p(y|x,z_k)."""
    log_q = torch.log_softmax(post_logits, -1)
    log_p = torch.log_softmax(prior_logits, -1)
    q = log_q.exp()
    nll = -(q * seq_logprobs).sum(-1)
    kl = (q * (log_q - log_p)).sum(-1)
    return nll + beta * kl, nll, kl


class Vrag(Estimator):
    name = "vrag"
    needs_posterior = True

    def loss(self, model, questions, answers, rows=None):
        cand = model.retrieve_posterior(questions, answers, self.k)          # C = posterior top-K (no grad search)
        post_scores = model.score_rows(cand.query_vectors, cand.rows)         # grad -> posterior encoder
        prior_scores = model.score_rows(model.query_encoder(questions), cand.rows)   # grad -> prior encoder
        token_lp, mask = model.answer_token_logprobs(questions, cand, answers)      # grad -> generator
        seq = sequence_logprobs(token_lp, mask)
        loss, nll, kl = vrag_loss(post_scores, prior_scores, seq, self.cfg.vrag_beta)
        with torch.no_grad():
            log_q = torch.log_softmax(post_scores, -1)
            log_p = torch.log_softmax(prior_scores, -1)
            diag = {"nll": float(nll.mean()), "kl": float(kl.mean()),
                    "posterior_entropy": float(entropy(log_q).mean()),
                    "prior_entropy": float(entropy(log_p).mean()),
                    "posterior_top1_agree": float((log_q.argmax(-1) == log_p.argmax(-1)).float().mean())}
        return EstimatorOutput(loss.mean(), diag)
