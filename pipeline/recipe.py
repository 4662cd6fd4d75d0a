"""The training recipe: one run's lifecycle, the one training loop of the project.

The Ray Train worker (jobs/train.py), a Tune trial (jobs/tune.py) and the quality benchmark
(benchmarks/quality.py) all drive it the same way:

    recipe = TrainRecipe(cfg, train_rows, dev_rows, events=MyEvents(), rank=r, world_size=w)
    recipe.setup(index)                  # build the model from the config ...
    recipe.setup(checkpoint_dir=d)       # ... or restore it, its trainer state and step from a checkpoint
    recipe.train()                       # the loop: step, log, evaluate on dev, checkpoint
    recipe.evaluate(rows)                # EM / F1 / recall@k and the marginal NLL, the same for every driver
    recipe.save_checkpoint(out_dir)      # weights + trainer state (a collective with several ranks)
    recipe.cleanup()

No Ray here: what differs between drivers (Ray Train's report with a checkpoint, Tune's report, MLflow, the
index refresh, printing) comes in through `Events`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from pipeline.config import Config
from pipeline.estimators import build_estimator
from pipeline.evaluation import evaluate
from pipeline.models.assembly import build_model
from pipeline.training import RagTrainer, seed_everything


class Events:
    """What a driver does around the loop; every method is optional (the default does nothing)."""

    #: ask the loop for trainer state at checkpoint steps (a collective: every rank must agree)
    wants_checkpoints = False

    def after_step(self, recipe: "TrainRecipe", metrics: dict) -> None:
        """After every optimiser step, on every rank (a trace, an index refresh switch)."""

    def log(self, recipe: "TrainRecipe", step: int, metrics: dict) -> None:
        """Every `train.log_every` steps and at the last: the step's metrics plus the window's mean loss,
        steps_per_s and examples_per_s."""

    def report(self, recipe: "TrainRecipe", report: dict,
               write_checkpoint: Callable[[Path], Path | None] | None) -> None:
        """At dev-evaluation and checkpoint steps: {step, loss, train_examples_per_s, dev_*, dev_score}. At
        checkpoint steps (when `wants_checkpoints`) `write_checkpoint(dir)` is given on every rank: rank 0 writes
        the checkpoint there and gets its path, the other ranks get None."""

    def close(self) -> None:
        """At cleanup."""


def dev_score(dev: dict, metric: str) -> float:
    """The checkpoint-selection score: one metric (`f1`, `recall@5`, ...) or a sum of them (`em+recall@1`), read
    from `dev` with or without the `dev_` prefix."""
    return float(sum(dev.get(k.strip(), dev.get(f"dev_{k.strip()}")) or 0.0 for k in metric.split("+")))


@torch.no_grad()
def evaluate_run(model, rows: list[dict], cfg: Config, nll: bool = True, batch_size: int = 32,
                 progress=None) -> tuple[dict, list]:
    """(metrics, predictions) with the run's eval settings (eval.k, decode, beams, max_questions). `nll` adds the
    rag-sequence marginal NLL of the gold answer over the top eval.k: the same quantity for every estimator, so
    runs (and Tune trials) with different estimators compare."""
    rows = rows[:cfg.eval.max_questions] if cfg.eval.max_questions else rows
    metrics, predictions = evaluate(model, rows, k=cfg.eval.k, estimator=cfg.train.estimator, decode=cfg.eval.decode,
                                    num_beams=cfg.eval.num_beams, progress=progress)
    if nll and rows:
        was_training = model.training
        model.eval()
        marginal = build_estimator("rag-sequence", k=cfg.eval.k)
        total = 0.0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            out = marginal.loss(model, [r["question"] for r in chunk], [r["answers"][0] for r in chunk])
            total += float(out.loss) * len(chunk)
        model.train(was_training)
        metrics["nll"] = total / len(rows)
    return metrics, predictions


class _Window:
    """Loss and throughput between two log lines, and examples/s since the first step (which pays warm-up)."""

    def __init__(self):
        self.t0, self.steps, self.losses = time.time(), 0, []
        self.t_first, self.examples_since_first, self.steps_since_first = None, 0.0, 0

    def add(self, metrics: dict) -> None:
        if self.t_first is None:
            self.t_first = time.time()
        else:
            self.examples_since_first += metrics["examples"]
            self.steps_since_first += 1
        self.steps += 1
        self.losses.append(metrics["loss"])

    def flush(self, metrics: dict) -> dict:
        elapsed = max(time.time() - self.t0, 1e-9)
        out = {"loss_mean": sum(self.losses) / len(self.losses), "steps_per_s": self.steps / elapsed,
               "examples_per_s": self.steps * metrics["examples"] / elapsed}
        self.t0, self.steps, self.losses = time.time(), 0, []
        return out

    def examples_per_s(self) -> dict:
        if not self.steps_since_first:
            return {}
        return {"train_examples_per_s": self.examples_since_first / max(time.time() - self.t_first, 1e-9)}


class TrainRecipe:
    """One training run. `wrap` makes the loss module distributed (Ray Train's prepare_model); `autocast` is a
    device type for bf16 autocast or None; `open_index(version_dir, expected_encoder_fingerprint=None)` opens a
    checkpoint's index the way this driver searches it (e.g. through index-shard actors) instead of `load_index`."""

    def __init__(self, cfg: Config, train_rows: list[dict], dev_rows: list[dict] | None = None,
                 events: Events | None = None, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", wrap=None, autocast: str | None = None,
                 open_index: Callable | None = None):
        self.cfg, self.train_rows, self.dev_rows = cfg, train_rows, dev_rows or []
        self.events = events or Events()
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.wrap, self.autocast, self.open_index = wrap, autocast, open_index
        self.model = self.trainer = None
        self.resumed_from: int | None = None       # the step a restored run continues from

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, index=None, checkpoint_dir: str | Path | None = None) -> "TrainRecipe":
        """Build the model from the config over `index` (as given), or restore model, trainer state and step from
        `checkpoint_dir` (its index opened with `open_index`). Same seed on every rank: identical initial weights."""
        cfg = self.cfg
        torch.set_num_threads(cfg.train.torch_threads)
        seed_everything(cfg.train.seed)
        state = None
        if checkpoint_dir is not None:
            self.model, _, _ = load_checkpoint(checkpoint_dir, open_index=self.open_index)
            state = load_trainer_state(checkpoint_dir)
        else:
            self.model = build_model(cfg, index, self.train_rows)
        self.model.to(self.device)
        estimator = build_estimator(cfg.train.estimator, k=cfg.train.k, cfg=cfg.estimator)
        source = f"data.train_qa ({cfg.data.train_qa})" if cfg.data.train_qa else "the synthetic training questions"
        self.trainer = RagTrainer(self.model, estimator, self.train_rows, cfg.train,
                                  cfg.retriever.lr if cfg.retriever.train_query_encoder else 0.0, cfg.generator.lr,
                                  rank=self.rank, world_size=self.world_size, data_source=source, wrap=self.wrap,
                                  autocast=self.autocast, generator_encoder_lr=cfg.generator.encoder_lr)
        if state is not None:
            self.trainer.load_state_dict(state)
            self.resumed_from = self.trainer.step_num
        return self

    @property
    def step(self) -> int:
        return self.trainer.step_num

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """Train to `train.max_steps`. Every `eval_every` steps (and at the last) rank 0 evaluates the dev rows;
        every `checkpoint_every` steps (and at the last) a checkpoint is offered to the driver."""
        tc, events = self.cfg.train, self.events
        total = tc.max_steps
        every_ckpt = tc.checkpoint_every or total
        eval_every = tc.eval_every if self.dev_rows else 0
        window = _Window()
        while self.trainer.step_num < total:
            metrics = self.trainer.step()
            events.after_step(self, metrics)
            window.add(metrics)
            step = self.trainer.step_num
            if step % tc.log_every == 0 or step == total:
                events.log(self, step, {**metrics, **window.flush(metrics)})
            report = {"step": step, "loss": metrics["loss"], **window.examples_per_s()}
            if eval_every and (step % eval_every == 0 or step == total):
                report.update(self.dev_report())
            if step % every_ckpt == 0 or step == total:
                if eval_every and "dev_score" not in report:
                    report["dev_score"] = float("-inf")      # between evaluations a checkpoint never counts as best
                writer = None
                if events.wants_checkpoints:
                    state = self.trainer.state_dict()        # a collective: every rank's RNG and estimator state

                    def writer(d, state=state):
                        return self.save_checkpoint(d, state) if self.rank == 0 else None
                events.report(self, report, writer)
            elif "dev_score" in report:
                events.report(self, report, None)

    # --------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, rows: list[dict], nll: bool = True, progress=None) -> tuple[dict, list]:
        return evaluate_run(self.model, rows, self.cfg, nll=nll, progress=progress)

    def dev_report(self) -> dict:
        """dev_* metrics and dev_score (train.best_metric); rank 0 evaluates, other ranks report NaN. A sharded
        generator (train.parallel=fsdp) makes every model call a collective: then every rank evaluates alike and
        only rank 0's metrics are reported."""
        if self.rank != 0 and not self.trainer.sharded:
            return {"dev_score": float("nan")}
        dev, _ = self.evaluate(self.dev_rows)
        if self.rank != 0:
            return {"dev_score": float("nan")}
        out = {f"dev_{k}": v for k, v in dev.items() if v is not None}
        out["dev_score"] = dev_score(dev, self.cfg.train.best_metric)
        return out

    # ------------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, out_dir: str | Path, state: dict | None = None) -> Path:
        """Weights, config and trainer state into `out_dir` (written aside and renamed). With several ranks,
        `state` must come from `self.trainer.state_dict()` called on every rank."""
        state = state if state is not None else self.trainer.state_dict()
        return save_checkpoint(out_dir, self.model, self.cfg, self.trainer.step_num, state,
                               extra={"data_position": state["data"]["position"], "world_size": self.world_size})

    def cleanup(self) -> None:
        self.events.close()
        self.model = self.trainer = None
