"""The shared estimator interface.

An estimator turns one batch of questions and answers into a differentiable loss, given a `RagModel` that can
retrieve candidates, score them with gradient (p(z|x)) and score answers under each passage (p(y|x,z)).
It also returns diagnostics (floats) that are logged every step.

    est = build_estimator("jsa", k=5, cfg=run_config)   # a Config, its `estimator` section, or a JsaConfig
    est.prepare(model)                      # adds what the estimator needs (the posterior encoder for vrag/jsa)
    out = est.loss(model, questions, answers[, rows=batch_rows])   # rows only when est.needs_rows

What a subclass declares (and `@register` checks; see pipeline/estimators/registry.py):
`name`; `config`: its settings dataclass (`self.cfg` is one); `decoder`: rag-sequence or rag-token decoding;
`needs_posterior`: the estimator trains q(z|x,y) (`model.posterior_encoder`);
`needs_rows`: `loss` also takes the batch's QA rows (ids, gold_passage_ids), e.g. JSA's per-example cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.estimators.registry import EstimatorSettings, NoSettings


@dataclass
class EstimatorOutput:
    loss: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


class Estimator:
    name: str = ""
    config: type[EstimatorSettings] = NoSettings
    decoder: str | None = None
    needs_posterior: bool = False
    needs_rows: bool = False

    def __init__(self, k: int = 5, cfg=None):
        self.k = k
        self.cfg = own_settings(self.config, cfg)

    def prepare(self, model) -> None:
        """Called once before training: give the model the modules this estimator trains."""
        if self.needs_posterior:
            model.add_posterior_encoder()

    def loss(self, model, questions: list[str], answers: list[str], rows: list[dict] | None = None) -> EstimatorOutput:
        raise NotImplementedError

    # estimators with per-example state (JSA's caches) override these; the state goes into checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def own_settings(cls: type[EstimatorSettings], cfg) -> EstimatorSettings:
    """`cls` settings from None (defaults), a `cls` instance, a whole Config or its flat `estimator` section."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, EstimatorSettings):
        raise TypeError(f"expected {cls.__name__} settings, got {type(cfg).__name__}")
    if hasattr(cfg, cls.section) and not isinstance(getattr(cfg, cls.section), str):
        cfg = getattr(cfg, cls.section)             # a whole Config
    return cls.from_flat(cfg)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log-softmax over the entries where mask is True (the others get -inf)."""
    if mask is None:
        return torch.log_softmax(scores, -1)
    return torch.log_softmax(scores.masked_fill(~mask, float("-inf")), -1)


def sequence_scores(token_lp: torch.Tensor, mask: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of target log-probs over the last dimension."""
    m = mask.to(token_lp.dtype)
    total = (token_lp * m).sum(-1)
    return total / m.sum(-1).clamp_min(1.0) if normalized else total


def union_rows(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Per row, the distinct members of first ∪ second (first's order first), padded with the row's first member;
    returns (rows [B, M], mask [B, M])."""
    sets = [list(dict.fromkeys(int(r) for r in (*a, *b))) for a, b in zip(first, second)]
    m = max(len(s) for s in sets)
    rows = np.array([s + [s[0]] * (m - len(s)) for s in sets], dtype=np.int64)
    mask = torch.tensor([[j < len(s) for j in range(m)] for s in sets])
    return rows, mask
