"""The one registration point of estimators and strategies.

An estimator is one file in pipeline/estimators/ (the package imports every module in it) whose class declares
everything the rest of the system derives from it:

    @dataclass
    class JsaConfig(EstimatorSettings):
        prefix = "jsa"                        # its keys in the config file: estimator.jsa_<field>
        num_proposals: int = 20
        def validate(self, config=None): ...  # raise ConfigError naming self.key("num_proposals")

    @register
    class Jsa(Estimator):
        name = "jsa"                          # train.estimator / --estimator
        config = JsaConfig                    # self.cfg is a JsaConfig
        needs_posterior = True                # the model gets q(z|x,y)
        needs_rows = True                     # loss(..., rows=batch rows)
        decoder = "rag-sequence"              # how a model trained with it answers (pipeline.evaluation)

Derived from the registry: the `estimator:` section of the config (pipeline.config.EstimatorConfig, one flat
dataclass over every settings class, so `estimator.jsa_num_proposals` keeps its name), its validation, the names
`train.estimator` accepts, `--estimator`'s help (`estimator_help`), decoding, and the tests' estimator lists.

Strategies (`train.strategy`) decide which objective trains and when each module trains (`objective_for`):
  joint        the objective is train.estimator's loss; every module trains from the start (the retrievers after
               train.generator_warmup_steps);
  two-phase    the objective is train.estimator's loss; phase 1 trains the generator only, phase 2 the retrievers;
  independent  the objective is `independent` (a strategy objective, registered with `register_strategy`): retriever
               contrastive on gold_passage_ids + generator NLL on the gold passage. train.estimator's loss does not
               run (nor its posterior encoder); it still chooses the decoder.
Decoding follows train.estimator in every strategy.

This module imports neither torch nor pipeline.config: pipeline.config imports it (lazily) to build its estimator
section, and the estimator modules import pipeline.config only for ConfigError.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

DECODERS = ("rag-sequence", "rag-token")
_SCALARS = (str, int, float, bool)

REGISTRY: dict[str, type] = {}          # name -> estimator class (what train.estimator accepts)


class EstimatorSettings:
    """Base of an estimator's own settings dataclass. Its fields are the config keys
    `<section>.<prefix>_<field>`; `validate(config)` checks them (`config`: the whole run Config when there is one,
    for checks across sections, e.g. dro_list_length <= train.k)."""
    prefix: ClassVar[str] = ""
    section: ClassVar[str] = "estimator"

    @classmethod
    def flat_name(cls, name: str) -> str:
        return f"{cls.prefix}_{name}"

    @classmethod
    def key(cls, name: str) -> str:
        """The config key of field `name`, as error messages name it: estimator.jsa_num_proposals."""
        return f"{cls.section}.{cls.flat_name(name)}"

    @classmethod
    def from_flat(cls, section: Any) -> "EstimatorSettings":
        """Own settings from a flat section (EstimatorConfig, TrainConfig); keys it lacks keep their defaults."""
        values = {f.name: getattr(section, cls.flat_name(f.name)) for f in dataclasses.fields(cls)
                  if hasattr(section, cls.flat_name(f.name))}
        return cls(**values)

    def validate(self, config: Any = None) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # the flat key still reads (est.cfg.jsa_num_proposals == est.cfg.num_proposals), as before the split
        p = type(self).prefix + "_"
        if p != "_" and name.startswith(p) and name[len(p):] in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, name[len(p):])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass
class NoSettings(EstimatorSettings):
    """For estimators without settings of their own."""


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    objective: type | None = None       # None: train.estimator's loss; else the strategy's own objective class


STRATEGIES: dict[str, Strategy] = {
    "joint": Strategy("joint", "train.estimator's loss, every module from the start (the retrievers after "
                               "train.generator_warmup_steps)"),
    "two-phase": Strategy("two-phase", "train.estimator's loss; first train.two_phase_split of the steps the generator "
                                       "only, then the retrievers only"),
}


@dataclass(frozen=True)
class Objective:
    """What a run trains, resolved from (train.estimator, train.strategy): see the module docstring."""
    name: str                # the loss that runs: the estimator's name, or the strategy objective's
    estimator: str
    strategy: str
    cls: type
    decoder: str             # train.estimator's decoder, in every strategy

    @property
    def needs_posterior(self) -> bool:
        return bool(self.cls.needs_posterior)

    @property
    def needs_rows(self) -> bool:
        return bool(self.cls.needs_rows)

    def record(self) -> dict[str, str]:
        """For metrics.json and MLflow tags: which estimator, strategy, objective and decoder the run used."""
        return {"estimator": self.estimator, "strategy": self.strategy, "objective": self.name,
                "decoder": self.decoder}


# ------------------------------------------------------------------------------------------------ registration
def _check_settings(cls: type, owner: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, EstimatorSettings) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{owner}.config must be a dataclass subclassing EstimatorSettings, got {cls!r}")
    fields = dataclasses.fields(cls)
    if fields and not cls.prefix:
        raise TypeError(f"{cls.__name__}: settings with fields need a prefix (their keys are "
                        f"{cls.section}.<prefix>_<field>)")
    hints = typing.get_type_hints(cls)
    for f in fields:
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] \
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
        if len(options) != 1 or options[0] not in _SCALARS:
            raise TypeError(f"{cls.key(f.name)}: config values are str, int, float or bool (optionally | None), "
                            f"got {hint!r}")
    taken = {(c.section, c.flat_name(f.name)): c for c in settings_classes(None) if c is not cls
             for f in dataclasses.fields(c)}
    for f in fields:
        other = taken.get((cls.section, cls.flat_name(f.name)))
        if other is not None:
            raise TypeError(f"{cls.key(f.name)}: declared by both {cls.__name__} and {other.__name__}")


def _check_class(cls: type, kind: str) -> None:
    name = vars(cls).get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a registered {kind} declares its own `name`")
    if kind == "estimator" and getattr(cls, "decoder", None) not in DECODERS:
        raise TypeError(f"{cls.__name__}: declare `decoder` = one of {', '.join(DECODERS)}, "
                        f"got {getattr(cls, 'decoder', None)!r}")
    for attr in ("needs_posterior", "needs_rows"):
        if not isinstance(getattr(cls, attr, None), bool):
            raise TypeError(f"{cls.__name__}.{attr} must be a bool")
    _check_settings(getattr(cls, "config", None), cls.__name__)


def register(cls: type) -> type:
    """Class decorator: makes an estimator selectable as train.estimator / --estimator."""
    _check_class(cls, "estimator")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"estimator {cls.name!r} is already registered ({REGISTRY[cls.name].__qualname__})")
    if cls.name in STRATEGIES:
        raise ValueError(f"{cls.name!r} is a strategy name")
    REGISTRY[cls.name] = cls
    return cls


def register_strategy(name: str, summary: str):
    """Class decorator: a strategy (`train.strategy=name`) whose own objective trains instead of train.estimator's.
    The class provides `for_strategy(estimator, train_cfg, rows, data_source)` -> the objective object."""
    def wrap(cls: type) -> type:
        _check_class(cls, "strategy objective")
        if not hasattr(cls, "for_strategy"):
            raise TypeError(f"{cls.__name__}: a strategy objective needs a for_strategy(...) classmethod")
        if name in STRATEGIES and STRATEGIES[name].objective is not cls:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, summary, cls)
        return cls
    return wrap


def unregister(name: str) -> None:
    """Remove an estimator (tests that register their own)."""
    REGISTRY.pop(name, None)


# ------------------------------------------------------------------------------------------------ lookups
def load() -> None:
    """Import every estimator module (the package does it once); registration happens on import."""
    importlib.import_module("pipeline.estimators")


def estimator_names() -> tuple[str, ...]:
    load()
    return tuple(sorted(REGISTRY))


def strategy_names() -> tuple[str, ...]:
    load()
    return tuple(STRATEGIES)


def get(name: str) -> type:
    load()
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def settings_classes(section: str | None = "estimator") -> tuple[type, ...]:
    """The distinct settings classes of every registered estimator (and strategy objective) of `section` (None:
    all), in a stable order (by prefix)."""
    owners = [*REGISTRY.values(), *(s.objective for s in STRATEGIES.values() if s.objective is not None)]
    out = []
    for owner in owners:
        cls = getattr(owner, "config", None)
        if cls is not None and cls not in out and (section is None or cls.section == section):
            out.append(cls)
    return tuple(sorted(out, key=lambda c: (c.section, c.prefix, c.__qualname__)))


def settings_of(section_values: Any, section: str = "estimator") -> list[EstimatorSettings]:
    """Every settings class of `section` read from that flat section (a Config's `estimator` or `train`)."""
    load()
    return [cls.from_flat(section_values) for cls in settings_classes(section)]


def resolve_objective(estimator: str, strategy: str = "joint") -> Objective:
    est = get(estimator)
    if strategy not in strategy_names():
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    own = STRATEGIES[strategy].objective
    if own is None:
        return Objective(estimator, estimator, strategy, est, est.decoder)
    return Objective(own.name, estimator, strategy, own, est.decoder)


def objective_for(cfg: Any) -> Objective:
    """The objective a run trains: from a Config (or its TrainConfig): train.estimator and train.strategy."""
    train = getattr(cfg, "train", cfg)
    return resolve_objective(train.estimator, getattr(train, "strategy", "joint"))


def build_objective(estimator: Any, strategy: str, train_cfg: Any, rows: list[dict],
                    data_source: str = "the training data") -> Any:
    """The object whose loss a trainer minimises under `strategy`: `estimator` itself, or the strategy's own
    objective built from it (which checks the rows it needs, naming `data_source`)."""
    load()
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    own = STRATEGIES[strategy].objective
    return estimator if own is None else own.for_strategy(estimator, train_cfg, rows, data_source)


def estimator_help() -> str:
    """`--estimator`'s help: every registered estimator with its settings keys."""
    load()
    parts = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        keys = [cls.config.flat_name(f.name) for f in dataclasses.fields(cls.config)]
        parts.append(f"{name} ({', '.join(keys)})" if keys else name)
    return (" | ".join(parts) + " (overrides train.estimator; settings in the estimator: section; "
            f"train.strategy: {' | '.join(STRATEGIES)})")
