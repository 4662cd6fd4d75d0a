"""Estimators, selected by name (`train.estimator` / `--estimator`); their settings in `estimator:` of the config.

Every module of this package is imported here, and each estimator class registers itself (`@register`, see
registry.py): adding an estimator is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from pipeline.estimators.base import Estimator, EstimatorOutput
from pipeline.estimators.registry import (DECODERS, REGISTRY, STRATEGIES, EstimatorSettings, Objective,
                                          build_objective, estimator_help, objective_for, register,
                                          register_strategy, resolve_objective)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_estimator(name: str, k: int = 5, cfg=None) -> Estimator:
    """`cfg`: a pipeline.config.EstimatorConfig, a whole Config (whose `estimator` section is used), the
    estimator's own settings dataclass, or None (defaults)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](k=k, cfg=cfg)


__all__ = ["DECODERS", "Estimator", "EstimatorOutput", "EstimatorSettings", "Objective", "REGISTRY", "STRATEGIES",
           "build_estimator", "build_objective", "estimator_help", "objective_for", "register", "register_strategy",
           "resolve_objective"]
