"""`exact`: the marginal over EVERY passage of the index, the ground truth for every other estimator.

    log p(y|x) = logsumexp_{z in index} [log p(z|x) + log p(y|x,z)],   p(z|x) = softmax over all N passages of s/tau

No candidate set and no sampling: the loss is -log p(y|x) and its gradient the true one, which by Fisher's identity
is -E_{p(z|x,y)}[grad log p(z|x) + grad log p(y|x,z)] with the posterior over the whole knowledge base. Every other
estimator approximates this (top-K truncates the sum, VRAG/JSA/DRO sample or bound it); benchmarks/estimator_bench.py
`--truth` measures their bias and variance against it.

Cost: the answer is scored under every passage, B x N generator rows per batch, so it is for evaluation and small
knowledge bases: an index above `estimator.exact_max_passages` is refused before any work. The generator runs over
the (question, passage) pairs in chunks of `estimator.exact_chunk_size` rows, each under activation checkpointing
(torch.utils.checkpoint): the forward keeps only each chunk's sequence log-likelihoods, the backward recomputes one
chunk at a time, so memory is one chunk's activations whatever N (at the price of one more forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from pipeline.config import ConfigError
from pipeline.estimators.base import Estimator, EstimatorOutput, entropy, sequence_scores
from pipeline.estimators.registry import EstimatorSettings, register


@dataclass
class ExactConfig(EstimatorSettings):
    prefix = "exact"
    max_passages: int = 4000           # refuse a larger index: B x N generator rows per batch
    chunk_size: int = 256              # (question, passage) generator rows per forward (and per recomputed backward)

    def validate(self, config=None) -> None:
        for name in ("max_passages", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.key(name)}: must be >= 1, got {getattr(self, name)}")


def check_index_size(model, cfg: ExactConfig) -> int:
    """The number of passages N of the model's index; a ValueError naming the setting when N is above the limit."""
    n = len(model.index.ids)
    if n > cfg.max_passages:
        raise ValueError(f"estimator exact: the index holds {n} passages, more than {cfg.key('max_passages')}="
                         f"{cfg.max_passages}; it scores the answer under every passage ({n} generator rows per "
                         f"question). Raise {cfg.key('max_passages')} to run it anyway, or use a top-K estimator")
    return n


def _chunk_logliks(generator, inputs, labels, mask) -> torch.Tensor:
    return sequence_scores(generator.token_logprobs(inputs, labels), mask.to(labels.device))


def passage_logliks(model, questions: list[str], answers: list[str], n: int, chunk_size: int) -> torch.Tensor:
    """[B, N] log p(y_b | x_b, z) for every passage z of the index, differentiable in the generator; computed in
    chunks of `chunk_size` (question, passage) rows, each checkpointed when gradients are on."""
    texts = [model.row_text(z) for z in range(n)]
    pairs = [(i, z) for i in range(len(questions)) for z in range(n)]
    parts = []
    for start in range(0, len(pairs), chunk_size):
        part = pairs[start:start + chunk_size]
        inputs = model.generator.encode_inputs([questions[i] for i, _ in part], [texts[z] for _, z in part])
        labels, mask = model.generator.encode_targets([answers[i] for i, _ in part])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logliks, model.generator, inputs, labels, mask, use_reentrant=False))
        else:
            parts.append(_chunk_logliks(model.generator, inputs, labels, mask))
    return torch.cat(parts).view(len(questions), n)


def exact_joint(model, questions: list[str], answers: list[str], cfg: ExactConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(z|x) [B, N] over every passage, log p(y|x,z) [B, N]), both with gradient."""
    n = check_index_size(model, cfg)
    q = model.query_encoder(questions)
    # rows [1, N] against query vectors [B, d]: score_rows broadcasts to [B, N] without repeating N per question
    scores = model.score_rows(q, np.arange(n, dtype=np.int64)[None, :])
    log_prior = torch.log_softmax(scores, -1)
    seq = passage_logliks(model, questions, answers, n, cfg.chunk_size).to(log_prior.dtype)
    return log_prior, seq


@register
class Exact(Estimator):
    name = "exact"
    config = ExactConfig
    decoder = "rag-sequence"

    def prepare(self, model) -> None:
        check_index_size(model, self.cfg)           # refuse a large index when training is set up, not mid-run

    def loss(self, model, questions, answers, rows=None):
        log_prior, seq = exact_joint(model, questions, answers, self.cfg)
        nll = -torch.logsumexp(log_prior + seq, -1)
        with torch.no_grad():
            post = torch.log_softmax(log_prior + seq, -1)                     # p(z|x,y) over the whole index
            top = log_prior.topk(min(self.k, log_prior.size(-1)), -1).indices
            diag = {"nll": float(nll.mean()),
                    "prior_entropy": float(entropy(log_prior).mean()),
                    "posterior_entropy": float(entropy(post).mean()),
                    "posterior_top1_mass": float(post.max(-1).values.exp().mean()),
                    # how much of the true posterior a top-K estimator's candidates hold (its truncation)
                    "posterior_mass_in_prior_topk": float(post.gather(-1, top).exp().sum(-1).mean()),
                    "gen_rows_per_example": float(log_prior.size(-1))}
        return EstimatorOutput(nll.mean(), diag)
