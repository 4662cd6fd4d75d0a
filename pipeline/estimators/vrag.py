"""`vrag`: variational RAG. A posterior retriever q(z|x,y) (its own query encoder over "question [SEP] answer")
proposes the candidate set C; the ELBO is enumerated exactly over C:

    loss = sum_{k in C} q_k * NLL(y | x, z_k) + beta * KL(q || p),

with q = softmax(posterior scores / tau) and p = softmax(prior scores / tau), both normalised over C.
Gradients: generator through the q-weighted NLL; prior through the KL; posterior through both
(d/dq of sum_k q_k [NLL_k + beta log(q_k / p_k)]: exact, no sampling).

`estimator.vrag_candidates`: `posterior` = C is the posterior's top-K (VRAG as published); `union` = C is the
prior's top-K (with `retriever.hybrid_k`, its hybrid K + H) ∪ the posterior's top-K (as JSA's C), so q can choose
the passages the prior ranks first and the prior is pushed down on its own wrong candidates; it scores up to 2K
passages per example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError
from pipeline.estimators.base import Estimator, EstimatorOutput, entropy, masked_log_softmax, union_rows
from pipeline.estimators.marginals import sequence_logprobs
from pipeline.estimators.registry import EstimatorSettings, register


@dataclass
class VragConfig(EstimatorSettings):
    prefix = "vrag"
    beta: float = 1.0                  # weight of KL(q || p) in the ELBO
    candidates: str = "posterior"      # C = posterior top-K, or union (prior top-K ∪ posterior top-K)

    def validate(self, config=None) -> None:
        if self.candidates not in ("posterior", "union"):
            raise ConfigError(f"{self.key('candidates')}: {self.candidates!r}; choose posterior or union")
        if self.beta < 0:
            raise ConfigError(f"{self.key('beta')}: must be >= 0, got {self.beta}")


def vrag_loss(post_logits: torch.Tensor, prior_logits: torch.Tensor, seq_logprobs: torch.Tensor,
              beta: float = 1.0, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example [B]: (loss, expected NLL, KL). Inputs [B, K]: posterior and prior scores over the same C and
    log p(y|x,z_k); `mask` [B, K] marks the real members of a padded C."""
    log_q = masked_log_softmax(post_logits, mask)
    log_p = masked_log_softmax(prior_logits, mask)
    q = log_q.exp()
    keep = torch.ones_like(q, dtype=torch.bool) if mask is None else mask
    nll = -(q * seq_logprobs.masked_fill(~keep, 0.0)).sum(-1)
    kl = (q * (log_q - log_p).masked_fill(~keep, 0.0)).sum(-1)
    return nll + beta * kl, nll, kl


@register
class Vrag(Estimator):
    name = "vrag"
    config = VragConfig
    decoder = "rag-sequence"
    needs_posterior = True

    def loss(self, model, questions, answers, rows=None):
        cand = model.retrieve_posterior(questions, answers, self.k)          # posterior top-K (no grad search)
        prior_q = model.query_encoder(questions)
        mask = None
        if self.cfg.candidates == "union":
            c_rows, mask = union_rows(model.prior_rows(questions, prior_q, self.k), cand.rows)
            cand = model.candidates(c_rows, cand.query_vectors)
            mask = mask.to(prior_q.device)
        post_scores = model.score_rows(cand.query_vectors, cand.rows)         # grad -> posterior encoder
        prior_scores = model.score_rows(prior_q, cand.rows)                   # grad -> prior encoder
        token_lp, tmask = model.answer_token_logprobs(questions, cand, answers)     # grad -> generator
        seq = sequence_logprobs(token_lp, tmask)
        loss, nll, kl = vrag_loss(post_scores, prior_scores, seq, self.cfg.beta, mask)
        with torch.no_grad():
            log_q = masked_log_softmax(post_scores, mask)
            log_p = masked_log_softmax(prior_scores, mask)
            diag = {"nll": float(nll.mean()), "kl": float(kl.mean()),
                    "posterior_entropy": float(entropy(log_q).mean()),
                    "prior_entropy": float(entropy(log_p).mean()),
                    "posterior_top1_agree": float((log_q.argmax(-1) == log_p.argmax(-1)).float().mean()),
                    "candidates": float(mask.sum(-1).float().mean()) if mask is not None else float(self.k)}
        return EstimatorOutput(loss.mean(), diag)
