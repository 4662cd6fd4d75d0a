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

`estimator.vrag_mode`: `enumerated` (the default, above) scores every member of C; `sampled` is the score-function
VRAG the JSA paper compares against: S = `estimator.vrag_num_samples` passages z_1..z_S ~ q over C (with replacement,
each distinct one scored once), and

    loss = (1/S) sum_i [NLL(y|x,z_i) + sg(NLL_i - b_i) * log q(z_i)]   (the second term's value is held at 0)
           + beta * KL(q || p) over C,

b_i = the mean NLL of the other S-1 samples (leave-one-out baseline: it does not depend on z_i, so the estimate stays
unbiased). Its gradient is an unbiased estimate of the enumerated ELBO's: the generator's and (through the KL, which
needs no generator rows and stays exact) the prior's by sampling, the posterior's by REINFORCE. It costs S generator
rows per example instead of |C|.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError
from pipeline.estimators.base import (Estimator, EstimatorOutput, entropy, masked_log_softmax, sequence_scores,
                                     union_rows)
from pipeline.estimators.marginals import sequence_logprobs
from pipeline.estimators.registry import EstimatorSettings, register


@dataclass
class VragConfig(EstimatorSettings):
    prefix = "vrag"
    beta: float = 1.0                  # weight of KL(q || p) in the ELBO
    candidates: str = "posterior"      # C = posterior top-K, or union (prior top-K ∪ posterior top-K)
    mode: str = "enumerated"           # enumerated (every member of C) | sampled (score-function, vrag_num_samples)
    num_samples: int = 5               # sampled mode: passages drawn from q per example (generator rows <= this)

    def validate(self, config=None) -> None:
        if self.candidates not in ("posterior", "union"):
            raise ConfigError(f"{self.key('candidates')}: {self.candidates!r}; choose posterior or union")
        if self.mode not in ("enumerated", "sampled"):
            raise ConfigError(f"{self.key('mode')}: {self.mode!r}; choose enumerated or sampled")
        if self.num_samples < 1:
            raise ConfigError(f"{self.key('num_samples')}: must be >= 1, got {self.num_samples}")
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


def sampled_vrag_loss(log_q: torch.Tensor, log_p: torch.Tensor, samples: torch.Tensor, sample_logliks: torch.Tensor,
                      beta: float = 1.0, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example [B]: (surrogate loss, sampled NLL, KL). log_q, log_p [B, M] normalised over C; samples [B, S]
    indices into C drawn from q; sample_logliks [B, S] log p(y|x,z_i) with gradient to the generator.
    The surrogate's value is the sampled ELBO loss; its gradient the score-function estimate (module docstring)."""
    s = samples.size(1)
    nll = -sample_logliks                                                        # [B, S]
    with torch.no_grad():
        baseline = (nll.sum(-1, keepdim=True) - nll) / (s - 1) if s > 1 else torch.zeros_like(nll)
        advantage = nll - baseline
    log_q_s = log_q.gather(1, samples)
    score_function = (advantage * (log_q_s - log_q_s.detach())).mean(-1)          # value 0, gradient REINFORCE
    keep = torch.ones_like(log_q, dtype=torch.bool) if mask is None else mask
    kl = (log_q.exp() * (log_q - log_p).masked_fill(~keep, 0.0)).sum(-1)
    sampled_nll = nll.mean(-1)
    return sampled_nll + score_function + beta * kl, sampled_nll, kl


@register
class Vrag(Estimator):
    name = "vrag"
    config = VragConfig
    decoder = "rag-sequence"
    needs_posterior = True

    def loss(self, model, questions, answers, rows=None, generator: torch.Generator | None = None):
        cand = model.retrieve_posterior(questions, answers, self.k)          # posterior top-K (no grad search)
        prior_q = model.query_encoder(questions)
        mask = None
        if self.cfg.candidates == "union":
            c_rows, mask = union_rows(model.prior_rows(questions, prior_q, self.k), cand.rows)
            cand = model.candidates(c_rows, cand.query_vectors)
            mask = mask.to(prior_q.device)
        post_scores = model.score_rows(cand.query_vectors, cand.rows)         # grad -> posterior encoder
        prior_scores = model.prior_scores(questions, prior_q, cand.rows)      # grad -> prior encoder
        extra = {}
        if self.cfg.mode == "sampled":
            log_q, log_p = masked_log_softmax(post_scores, mask), masked_log_softmax(prior_scores, mask)
            samples, seq_s, scored = self._sample_and_score(model, questions, answers, cand, log_q, generator)
            loss, nll, kl = sampled_vrag_loss(log_q, log_p, samples, seq_s, self.cfg.beta, mask)
            extra = {"distinct_samples": scored / len(questions)}
        else:
            token_lp, tmask = model.answer_token_logprobs(questions, cand, answers)     # grad -> generator
            seq = sequence_logprobs(token_lp, tmask)
            loss, nll, kl = vrag_loss(post_scores, prior_scores, seq, self.cfg.beta, mask)
        with torch.no_grad():
            log_q = masked_log_softmax(post_scores, mask)
            log_p = masked_log_softmax(prior_scores, mask)
            diag = {**extra, "nll": float(nll.mean()), "kl": float(kl.mean()),
                    "posterior_entropy": float(entropy(log_q).mean()),
                    "prior_entropy": float(entropy(log_p).mean()),
                    "posterior_top1_agree": float((log_q.argmax(-1) == log_p.argmax(-1)).float().mean()),
                    "candidates": float(mask.sum(-1).float().mean()) if mask is not None else float(self.k)}
        return EstimatorOutput(loss.mean(), diag)

    def _sample_and_score(self, model, questions, answers, cand, log_q, generator):
        """S draws from q per example ([B, S] indices into C) and their log p(y|x,z) [B, S] with gradient to the
        generator: each distinct (example, passage) scored once, in one generator pass."""
        b = len(questions)
        with torch.no_grad():
            samples = torch.multinomial(log_q.detach().exp().float(), self.cfg.num_samples, replacement=True,
                                        generator=generator).to(log_q.device)
        pairs = sorted({(i, j) for i in range(b) for j in samples[i].tolist()})
        token_lp, tmask = model.pair_logprobs([questions[i] for i, _ in pairs], [cand.texts[i][j] for i, j in pairs],
                                              [answers[i] for i, _ in pairs])           # grad -> generator
        seq = sequence_scores(token_lp, tmask)
        at = {pair: n for n, pair in enumerate(pairs)}
        where = torch.tensor([[at[(i, j)] for j in samples[i].tolist()] for i in range(b)], device=seq.device)
        return samples, seq[where], len(pairs)
