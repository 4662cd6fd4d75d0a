"""`dro`: direct retrieval-augmented optimisation (arXiv 2505.03075), with a Plackett-Luce selection model.

The latent variable is an ordered list of L passages (`estimator.dro_list_length`) drawn from the prior top-K.
Selection model: Plackett-Luce over the retriever scores s (= score / tau),
    p_sel(list | x) = prod_j exp(s_{i_j}) / sum_{i not in i_<j} exp(s_i)
(the paper uses an LLM selector; here the bi-encoder's scores play that role).
Generator: p(y | x, list) = the generator reading the list's passages concatenated in list order (" | " between
them) as ONE context, as the paper's generator reads the selected documents in its prompt. One generator row per
list, so n lists cost n generator rows (rag-sequence's K passages cost K).

E-step: n lists sampled from p_sel (Gumbel top-L, exact PL samples); self-normalised importance weights
    w_i = p(y|x,list_i) / sum_j p(y|x,list_j)
(the proposal is the prior itself, so the importance ratio p_sel * p(y|..) / p_sel reduces to the likelihood).
M-step: loss = -sum_i w_i [log p_sel(list_i | x) + log p(y | x, list_i)], weights held constant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError
from pipeline.estimators.base import Estimator, EstimatorOutput, entropy, sequence_scores
from pipeline.estimators.registry import EstimatorSettings, register

LIST_SEP = " | "


def plackett_luce_sample(scores: torch.Tensor, n: int, length: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, K] logits -> [B, n, length] ordered lists (indices into K), exact Plackett-Luce draws (Gumbel top-L)."""
    b, k = scores.shape
    u = torch.rand(b, n, k, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12).to(scores.device)
    keys = scores.detach().double().unsqueeze(1) - torch.log(-torch.log(u))
    return keys.topk(length, dim=-1).indices


def plackett_luce_logprob(scores: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """log p_sel(list | x): scores [B, K], lists [B, n, L] -> [B, n], differentiable in scores."""
    b, n, length = lists.shape
    s = scores.unsqueeze(1).expand(b, n, scores.size(-1))
    removed = torch.zeros_like(s, dtype=torch.bool)
    total = scores.new_zeros(b, n)
    for j in range(length):
        idx = lists[..., j:j + 1]
        total = total + s.gather(-1, idx).squeeze(-1) - torch.logsumexp(s.masked_fill(removed, float("-inf")), -1)
        removed = removed.scatter(-1, idx, True)
    return total


def dro_weights(list_loglik: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance weights [B, n] ∝ p(y | x, list_i); rows sum to one. No gradient."""
    return torch.softmax(list_loglik.detach(), -1)


def dro_loss(sel_logprobs: torch.Tensor, list_loglik: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per example [B]: -sum_i w_i [log p_sel(list_i) + log p(y|x,list_i)]."""
    w = dro_weights(list_loglik) if weights is None else weights.detach()
    return -(w * (sel_logprobs + list_loglik)).sum(-1)


@dataclass
class DroConfig(EstimatorSettings):
    prefix = "dro"
    num_lists: int = 5                 # n ordered lists sampled per example
    list_length: int = 2               # passages per list (the generator reads them concatenated)

    def validate(self, config=None) -> None:
        for name in ("num_lists", "list_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.key(name)}: must be >= 1, got {getattr(self, name)}")
        if config is not None and self.list_length > config.train.k:
            raise ConfigError(f"{self.key('list_length')}: {self.list_length} > train.k={config.train.k} "
                              "(lists are drawn from the top-k candidates)")


@register
class Dro(Estimator):
    name = "dro"
    config = DroConfig
    decoder = "rag-sequence"

    def loss(self, model, questions, answers, rows=None, generator: torch.Generator | None = None):
        n, length = self.cfg.num_lists, self.cfg.list_length
        if length > self.k:
            raise ValueError(f"estimator.dro_list_length={length} > k={self.k}")
        cand = model.retrieve(questions, self.k)
        scores = model.doc_scores(questions, cand)                                # [B, K], grad -> retriever
        lists = plackett_luce_sample(scores, n, length, generator)               # [B, n, L]
        sel = plackett_luce_logprob(scores, lists)                               # [B, n]
        b = len(questions)
        flat_q = [q for q in questions for _ in range(n)]
        flat_a = [a for a in answers for _ in range(n)]
        flat_p = [LIST_SEP.join(cand.texts[i][j] for j in lists[i, t].tolist()) for i in range(b) for t in range(n)]
        token_lp, mask = model.pair_logprobs(flat_q, flat_p, flat_a)             # grad -> generator
        ll = sequence_scores(token_lp, mask).view(b, n)
        w = dro_weights(ll)
        per_example = dro_loss(sel, ll, w)
        with torch.no_grad():
            distinct = sum(len({tuple(x) for x in lists[i].tolist()}) for i in range(b)) / b
            diag = {"nll": float(-(w * ll).sum(-1).mean()),
                    "ess": float((1.0 / (w ** 2).sum(-1)).mean()),
                    "distinct_lists": distinct,
                    "prior_entropy": float(entropy(torch.log_softmax(scores, -1)).mean()),
                    "weight_max": float(w.max(-1).values.mean())}
        return EstimatorOutput(per_example.mean(), diag)
