"""Learning-rate sweeps, without Ray: the `sweep:` section of a tune config, the per-trial config, the score
ASHA ranks trials by, the results table, the heatmap and the best config. `jobs/tune.py` wires this into Ray Tune.

A tune config is a train config (pipeline.config) plus a `sweep:` section:

    sweep:
      mode: grid                 # grid | two-phase
      retriever_lr: [1.0e-5, 3.0e-5]            # a grid, one value, or {loguniform: [lo, hi]}
      generator_lr: {loguniform: [3.0e-4, 3.0e-3]}
      num_samples: 4             # samples of the log-uniform dimensions (a grid is repeated num_samples times)
      estimator: [rag-sequence, jsa]            # optional grids over train.estimator, train.k, retriever.tau
      metric: dev_em             # ASHA ranks trials by `score` = metric, ties broken by tie_break
      tie_break: dev_nll

Search dimensions are returned as plain tuples (("grid", [values]) or ("loguniform", lo, hi)); the job turns
them into `tune.grid_search` / `tune.loguniform`.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (Config, ConfigError, apply_override, from_dict, load_config, read_yaml_mapping,
                             save_config)

MODES = ("grid", "two-phase")
# dev metrics a trial reports; `score` is built from two of them
METRICS = {"dev_em": "max", "dev_f1": "max", "dev_recall@1": "max", "dev_recall@5": "max", "dev_nll": "min"}
# trial parameter -> the config key it sets
PARAM_KEYS = {"retriever_lr": "retriever.lr", "generator_lr": "generator.lr", "estimator": "train.estimator",
              "k": "train.k", "tau": "retriever.tau"}


@dataclass
class SweepSpec:
    mode: str = "grid"
    retriever_lr: Any = field(default_factory=lambda: [1e-5, 3e-5])
    generator_lr: Any = field(default_factory=lambda: [1e-3, 3e-3])
    estimator: Any = None              # optional grid over train.estimator
    k: Any = None                      # optional grid over train.k
    tau: Any = None                    # optional grid over retriever.tau
    num_samples: int = 1
    metric: str = "dev_em"
    tie_break: str | None = "dev_nll"
    scheduler: str = "asha"            # asha | fifo
    grace_period: int = 0              # ASHA: steps before a trial can be stopped (0 = one eval interval)
    reduction_factor: float = 2.0
    eval_every: int = 0                # steps between dev evaluations/reports (0 = train.eval_every or max_steps/4)
    max_concurrent: int = 0            # 0 = as many as the cluster's CPUs allow
    phase1_steps: int = 0              # two-phase: generator-only steps (0 = train.max_steps)
    phase2_steps: int = 0              # two-phase: joint steps after it (0 = train.max_steps)
    max_failures: int = 0              # trial retries

    def validate(self) -> "SweepSpec":
        if self.mode not in MODES:
            raise ConfigError(f"sweep.mode: unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.metric not in METRICS:
            raise ConfigError(f"sweep.metric: {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.tie_break is not None and self.tie_break not in METRICS:
            raise ConfigError(f"sweep.tie_break: {self.tie_break!r}; choose one of {', '.join(METRICS)} or null")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"sweep.scheduler: {self.scheduler!r}; choose asha or fifo")
        if self.num_samples < 1:
            raise ConfigError("sweep.num_samples: must be >= 1")
        if self.reduction_factor <= 1:
            raise ConfigError("sweep.reduction_factor: must be > 1")
        for key in ("grace_period", "eval_every", "max_concurrent", "phase1_steps", "phase2_steps", "max_failures"):
            if getattr(self, key) < 0:
                raise ConfigError(f"sweep.{key}: must be >= 0")
        self.dimensions()               # parses every dimension, raising ConfigError on a bad one
        return self

    def dimensions(self) -> dict[str, tuple]:
        """Trial parameter -> ("grid", [values]) | ("loguniform", lo, hi), for the parameters that are set."""
        dims = {"retriever_lr": parse_dimension(self.retriever_lr, "sweep.retriever_lr", lr=True),
                "generator_lr": parse_dimension(self.generator_lr, "sweep.generator_lr", lr=True)}
        for key in ("estimator", "k", "tau"):
            value = getattr(self, key)
            if value is not None:
                dims[key] = parse_dimension(value, f"sweep.{key}", lr=False)
                if dims[key][0] != "grid":
                    raise ConfigError(f"sweep.{key}: only a list (grid) is supported")
        return dims


def parse_dimension(value, where: str, lr: bool = True) -> tuple:
    """A list (grid), one value, `{grid: [...]}` or `{loguniform: [lo, hi]}`."""
    def number(v):
        if isinstance(v, str):              # YAML 1.1 reads 1e-3 as a string
            try:
                return float(v)
            except ValueError:
                raise ConfigError(f"{where}: {v!r} is not a number") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {v!r} is not a number")
        return float(v)

    if isinstance(value, dict):
        if len(value) != 1:
            raise ConfigError(f"{where}: expected one of {{grid: [...]}} or {{loguniform: [lo, hi]}}, got {value}")
        (kind, arg), = value.items()
        if kind == "grid":
            value = arg
        elif kind == "loguniform":
            if not lr or not isinstance(arg, (list, tuple)) or len(arg) != 2:
                raise ConfigError(f"{where}: loguniform takes [lo, hi]")
            lo, hi = number(arg[0]), number(arg[1])
            if not 0 < lo < hi:
                raise ConfigError(f"{where}: loguniform needs 0 < lo < hi, got [{lo}, {hi}]")
            return ("loguniform", lo, hi)
        else:
            raise ConfigError(f"{where}: unknown kind {kind!r}; use grid or loguniform")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(f"{where}: empty grid")
    if lr:
        values = [number(v) for v in values]
        if any(v < 0 for v in values):
            raise ConfigError(f"{where}: learning rates must be >= 0")
    return ("grid", values)


# --------------------------------------------------------------------------------------------- configs
def load_sweep_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, SweepSpec]:
    """A tune YAML (train config + `sweep:`), with `--set` overrides for either part (`sweep.key=value`)."""
    values = read_yaml_mapping(path)
    sweep_values = values.pop("sweep", None) or {}
    if not isinstance(sweep_values, dict):
        raise ConfigError("sweep: expected a mapping")
    cfg = from_dict(values, source=path)
    for item in overrides or []:
        if item.strip().startswith("sweep."):
            key, _, raw = item.partition("=")
            if not _:
                raise ConfigError(f"--set {item!r}: expected key=value")
            sweep_values[key.strip()[len("sweep."):]] = yaml.safe_load(raw) if raw.strip() else None
        else:
            cfg = apply_override(cfg, item)
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(sweep_values) - names)
    if unknown:
        raise ConfigError(f"sweep: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cfg.validate(), SweepSpec(**sweep_values).validate()


def eval_interval(cfg: Config, spec: SweepSpec) -> int:
    return spec.eval_every or cfg.train.eval_every or max(1, cfg.train.max_steps // 4)


def phase_plan(cfg: Config, spec: SweepSpec) -> list[dict]:
    """The Tune runs of a sweep: name, search dimensions, config overrides, steps and ASHA grace period.
    two-phase phase 2 needs `best_generator_lr` from phase 1 and is completed by `second_phase`."""
    dims = spec.dimensions()
    every = eval_interval(cfg, spec)
    grace = spec.grace_period or every
    if spec.mode == "grid":
        steps = cfg.train.max_steps
        return [{"name": "sweep", "dims": dims, "set": {}, "max_t": steps, "grace": min(grace, steps)}]
    p1 = spec.phase1_steps or cfg.train.max_steps
    phase1 = {k: v for k, v in dims.items() if k != "retriever_lr"}
    phase1["retriever_lr"] = ("grid", [0.0])          # retriever frozen: RagTrainer trains no retriever at lr 0
    return [{"name": "phase1", "dims": phase1, "set": {"train.max_steps": p1, "train.generator_warmup_steps": 0},
             "max_t": p1, "grace": min(grace, p1)}]


def second_phase(cfg: Config, spec: SweepSpec, best_generator_lr: float) -> dict:
    """Phase 2 of two-phase: the retriever LR sweeps with the best phase-1 generator LR. Each trial repeats the
    phase-1 recipe as a generator warm-up (retriever frozen for phase1_steps, `train.generator_warmup_steps`),
    then trains jointly for phase2_steps, so the winner is one ordinary `latentrag train` config."""
    dims = spec.dimensions()
    p1 = spec.phase1_steps or cfg.train.max_steps
    p2 = spec.phase2_steps or cfg.train.max_steps
    every = eval_interval(cfg, spec)
    phase2 = {k: v for k, v in dims.items() if k != "generator_lr"}
    phase2["generator_lr"] = ("grid", [float(best_generator_lr)])
    # ASHA compares trials only after the warm-up: before it they are the same run
    grace = p1 + (spec.grace_period or every)
    return {"name": "phase2", "dims": phase2,
            "set": {"train.max_steps": p1 + p2, "train.generator_warmup_steps": p1},
            "max_t": p1 + p2, "grace": min(grace, p1 + p2)}


def num_trials(dims: dict, num_samples: int) -> int:
    """Trials Tune generates: every grid combination, num_samples times (log-uniform dimensions are sampled)."""
    n = num_samples
    for d in dims.values():
        if d[0] == "grid":
            n *= len(d[1])
    return n


def trial_config(base: Config, params: dict, settings: dict | None = None) -> Config:
    """The run config of one trial: the base config, the phase's fixed settings, then the trial's parameters."""
    cfg = copy.deepcopy(base)
    for key, value in (settings or {}).items():
        _set(cfg, key, value)
    for name, value in params.items():
        if name in PARAM_KEYS:
            _set(cfg, PARAM_KEYS[name], value)
    if "k" in params:
        cfg.eval.k = int(params["k"])
    return cfg.validate()


def _set(cfg: Config, dotted: str, value) -> None:
    section, key = dotted.split(".")
    target = getattr(cfg, section)
    current = getattr(target, key)
    if isinstance(current, float) and isinstance(value, (int, float)):
        value = float(value)
    setattr(target, key, value)


# --------------------------------------------------------------------------------------------- scoring
def combined_score(dev: dict, metric: str = "dev_em", tie_break: str | None = "dev_nll",
                   num_questions: int | None = None) -> float:
    """`metric` (made larger-is-better), plus a tie-break term too small to reorder different values of it.

    EM and recall over n questions move in steps of 1/n; the tie-break term t in [0, 1) (1/(1+nll) for a loss,
    the value itself for a rate) is scaled by 1/(n+1), so it only orders trials with equal `metric`."""
    value = dev.get(metric)
    if value is None or value != value:
        return float("nan")
    score = float(value) if METRICS[metric] == "max" else -float(value)
    t = dev.get(tie_break) if tie_break else None
    if t is not None and t == t:
        t = 1.0 / (1.0 + max(float(t), 0.0)) if METRICS[tie_break] == "min" else min(max(float(t), 0.0), 1.0) * 0.999
        n = num_questions or dev.get("dev_num_questions") or 1000
        score += t / (n + 1)
    return score


# --------------------------------------------------------------------------------------------- results
RESULT_COLUMNS = ("phase", "trial_id", "status", "retriever_lr", "generator_lr", "estimator", "k", "tau", "step",
                  "score", "dev_em", "dev_f1", "dev_recall@1", "dev_recall@5", "dev_nll", "mlflow_run_id")


def write_results_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in RESULT_COLUMNS})
    tmp.replace(path)
    return path


def best_row(rows: list[dict]) -> dict:
    scored = [r for r in rows if r.get("score") is not None and r["score"] == r["score"]]
    if not scored:
        raise ValueError("no trial reported a dev score")
    # a trial that ran all its steps wins a tie against one ASHA stopped early
    return max(scored, key=lambda r: (r["score"], r.get("step") or 0))


def plot_heatmap(rows: list[dict], path: str | Path, value: str = "score", title: str | None = None) -> Path:
    """The dev metric over (retriever_lr, generator_lr): a grid of cells when the LRs form a small grid (best value
    per cell over other parameters), else a scatter on log axes. Matplotlib with the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(float(r["retriever_lr"]), float(r["generator_lr"]), float(r[value])) for r in rows
           if r.get(value) is not None and r[value] == r[value]]
    rs = sorted({p[0] for p in pts})
    gs = sorted({p[1] for p in pts})
    fig, ax = plt.subplots(figsize=(1.4 * max(len(rs), 3) + 2, 1.0 * max(len(gs), 3) + 1.5))
    if pts and len(rs) <= 12 and len(gs) <= 12:
        grid = [[math.nan] * len(rs) for _ in gs]
        for r, g, v in pts:
            i, j = gs.index(g), rs.index(r)
            grid[i][j] = v if grid[i][j] != grid[i][j] else max(grid[i][j], v)
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(rs)), [f"{v:.1e}" for v in rs], rotation=30)
        ax.set_yticks(range(len(gs)), [f"{v:.1e}" for v in gs])
        for i in range(len(gs)):
            for j in range(len(rs)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    else:
        im = ax.scatter([p[0] or 1e-12 for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis",
                        s=60)
        ax.set_xscale("log")
        ax.set_yscale("log")
    fig.colorbar(im, ax=ax, label=value)
    ax.set_xlabel("retriever lr")
    ax.set_ylabel("generator lr")
    ax.set_title(title or f"dev {value} over learning rates")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_best_config(base: Config, best_params: dict, path: str | Path, settings: dict | None = None,
                      data: dict | None = None, output_dir: str | None = None) -> Config:
    """`best_config.yaml`: the trial config of the winner with data paths filled in (`latentrag train --config`
    needs corpus/train_qa/eval_qa), checked by loading it back with pipeline.config.load_config."""
    cfg = trial_config(base, best_params, settings)
    for key, value in (data or {}).items():
        setattr(cfg.data, key, value)
    if output_dir:
        cfg.output_dir = str(output_dir)
    cfg.mlflow.run_name = None
    save_config(cfg, path)
    loaded = load_config(path)
    if loaded.to_dict() != cfg.to_dict():
        raise ValueError(f"{path}: does not load back to the same config")
    return loaded
