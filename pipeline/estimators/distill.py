"""Retriever-distillation estimators: the generator's per-passage scores teach the retriever.

All three use the prior top-K, one generator pass over the K passages, and train the generator on the
rag-sequence marginal with the retriever's probabilities held constant, -log sum_k sg(p_k) p(y|x,z_k)
(our generator reads one passage at a time, so the marginal stands in for Atlas' Fusion-in-Decoder reader loss).
They differ in the retriever's loss, with l_k = log p(y|x,z_k) held constant and T = estimator.distill_temperature:

- `pdist` (Atlas, Izacard et al. 2022): KL(softmax(lbar / T) || p), lbar_k = per-token mean log-likelihood.
- `emdr2` (Sachan et al. 2021): -log sum_k p_k exp(l_k)  (EM: the retriever's gradient is p - posterior).
- `replug-lsr` (Shi et al. 2023): KL(p || Q), Q = softmax(l / T), the LM-supervised retrieval loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError
from pipeline.estimators.base import Estimator, EstimatorOutput, entropy, sequence_scores
from pipeline.estimators.marginals import rag_sequence_nll
from pipeline.estimators.registry import EstimatorSettings, NoSettings, register


@dataclass
class DistillConfig(EstimatorSettings):
    prefix = "distill"
    temperature: float = 1.0           # pdist / replug-lsr: target = softmax(generator score / temperature)

    def validate(self, config=None) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{self.key('temperature')}: must be > 0, got {self.temperature}")


def pdist_loss(scores: torch.Tensor, target_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B]: KL(softmax(target / T) || softmax(scores)), target held constant."""
    t = torch.log_softmax(target_scores.detach() / temperature, -1)
    return (t.exp() * (t - torch.log_softmax(scores, -1))).sum(-1)


def emdr2_loss(scores: torch.Tensor, seq_logprobs: torch.Tensor) -> torch.Tensor:
    """[B]: -log sum_k p_k exp(l_k), l held constant."""
    return -torch.logsumexp(torch.log_softmax(scores, -1) + seq_logprobs.detach(), -1)


def replug_lsr_loss(scores: torch.Tensor, seq_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B]: KL(softmax(scores) || softmax(l / T)), l held constant."""
    log_p = torch.log_softmax(scores, -1)
    log_q = torch.log_softmax(seq_logprobs.detach() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class _Distill(Estimator):
    config = DistillConfig             # one setting shared by the three: estimator.distill_temperature
    decoder = "rag-sequence"

    def retriever_loss(self, scores, token_lp, mask):
        raise NotImplementedError

    def loss(self, model, questions, answers, rows=None):
        cand = model.retrieve(questions, self.k)
        scores = model.doc_scores(questions, cand)                                 # grad -> retriever
        token_lp, mask = model.answer_token_logprobs(questions, cand, answers)     # grad -> generator
        log_p = torch.log_softmax(scores, -1)
        gen_loss = rag_sequence_nll(token_lp, log_p.detach(), mask)
        ret_loss = self.retriever_loss(scores, token_lp.detach(), mask)
        with torch.no_grad():
            diag = {"nll": float(gen_loss.mean()), "retriever_loss": float(ret_loss.mean()),
                    "prior_entropy": float(entropy(log_p).mean())}
        return EstimatorOutput((gen_loss + ret_loss).mean(), diag)


@register
class Pdist(_Distill):
    name = "pdist"

    def retriever_loss(self, scores, token_lp, mask):
        mean_ll = sequence_scores(token_lp, mask.unsqueeze(1).expand_as(token_lp), normalized=True)
        return pdist_loss(scores, mean_ll, self.cfg.temperature)


@register
class Emdr2(_Distill):
    name = "emdr2"
    config = NoSettings                # no temperature in its loss

    def retriever_loss(self, scores, token_lp, mask):
        return emdr2_loss(scores, sequence_scores(token_lp, mask.unsqueeze(1).expand_as(token_lp)))


@register
class ReplugLsr(_Distill):
    name = "replug-lsr"

    def retriever_loss(self, scores, token_lp, mask):
        return replug_lsr_loss(scores, sequence_scores(token_lp, mask.unsqueeze(1).expand_as(token_lp)),
                               self.cfg.temperature)
