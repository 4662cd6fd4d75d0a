"""Estimators, selected by name (`train.estimator` / `--estimator`); hyperparameters in `estimator:` of the config."""
from __future__ import annotations

from pipeline.estimators.base import Estimator, EstimatorOutput
from pipeline.estimators.distill import Emdr2, Pdist, ReplugLsr
from pipeline.estimators.dro import Dro
from pipeline.estimators.jsa import Jsa
from pipeline.estimators.rag_sequence import RagSequence
from pipeline.estimators.rag_token import RagToken
from pipeline.estimators.vrag import Vrag

REGISTRY: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (RagSequence, RagToken, Vrag, Jsa, Dro, Pdist, Emdr2, ReplugLsr)}


def build_estimator(name: str, k: int = 5, cfg=None) -> Estimator:
    """`cfg`: a pipeline.config.EstimatorConfig (or a whole Config, whose `estimator` section is used)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    if cfg is not None and hasattr(cfg, "estimator") and not isinstance(cfg.estimator, str):
        cfg = cfg.estimator
    return REGISTRY[name](k=k, cfg=cfg)


__all__ = ["Estimator", "EstimatorOutput", "REGISTRY", "build_estimator"]
