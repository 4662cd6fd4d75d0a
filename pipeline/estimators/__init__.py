"""Estimators, selected by name (`train.estimator` / `--estimator`)."""
from __future__ import annotations

from pipeline.estimators.base import Estimator, EstimatorOutput
from pipeline.estimators.rag_sequence import RagSequence
from pipeline.estimators.rag_token import RagToken

REGISTRY: dict[str, type[Estimator]] = {cls.name: cls for cls in (RagSequence, RagToken)}


def build_estimator(name: str, k: int = 5) -> Estimator:
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](k=k)


__all__ = ["Estimator", "EstimatorOutput", "REGISTRY", "build_estimator"]
