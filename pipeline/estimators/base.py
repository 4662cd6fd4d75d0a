"""The shared estimator interface.

An estimator turns one batch of questions and answers into a differentiable loss, given a `RagModel` that can
retrieve candidates, score them with gradient (p(z|x)) and score answers under each passage (p(y|x,z)).
It also returns diagnostics (floats) that are logged every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EstimatorOutput:
    loss: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


class Estimator:
    name: str = ""

    def __init__(self, k: int = 5):
        self.k = k

    def loss(self, model, questions: list[str], answers: list[str]) -> EstimatorOutput:
        raise NotImplementedError

    # estimators with per-example state (JSA's caches) override these; the state goes into checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    return -(logprobs.exp() * logprobs).sum(-1)
