"""The training step, independent of Ray: optimisers with separate retriever and generator learning rates,
schedules, the generator warm-up (retriever frozen while the generator learns to read), gradient averaging
across workers, and a resumable data order. `jobs/train.py` runs this inside Ray Train workers.
"""
from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, warmup: int, total: int, decay: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return 1.0


class DataOrder:
    """Example indices for (step, rank): a fresh permutation per epoch, a function of the seed only, so a
    resumed run continues exactly where it stopped and no example is lost or repeated."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed * 100_003 + epoch).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(first, first + self.batch_size)]


class RagTrainer:
    """One optimiser step at a time. Parameter groups: generator, retriever (the prior query encoder) and, when the
    estimator trains one (vrag, jsa), posterior (q(z|x,y)'s query encoder, at the retriever's learning rate).

    Strategies (`train.strategy`):
      joint        every group trains from the start (after `generator_warmup_steps` for the retrievers);
      two-phase    phase 1 (the first `two_phase_split` of max_steps): generator only, retrievers frozen;
                   phase 2: retrievers only, generator frozen. Each group's schedule runs over its own phase;
      independent  retriever contrastive on gold_passage_ids + generator NLL on the gold passage (the estimator
                   is not used); rows without gold_passage_ids fail at construction, naming `data_source`.
    """

    def __init__(self, model, estimator, train_rows: list[dict], train_cfg, retriever_lr: float,
                 generator_lr: float, rank: int = 0, world_size: int = 1, data_source: str = "the training data"):
        self.model, self.estimator, self.rows, self.cfg = model, estimator, train_rows, train_cfg
        self.rank, self.world_size = rank, world_size
        self.strategy = getattr(train_cfg, "strategy", "joint")
        if self.strategy == "independent":
            from pipeline.estimators.independent import Independent, require_context_labels

            require_context_labels(train_rows, data_source)
            self.objective = Independent(k=getattr(estimator, "k", 5), cfg=getattr(estimator, "cfg", None),
                                         hard_negatives=train_cfg.independent_hard_negatives,
                                         temperature=train_cfg.independent_temperature)
        else:
            self.objective = estimator
            if hasattr(estimator, "prepare"):
                estimator.prepare(model)       # e.g. adds the posterior encoder for vrag / jsa
        self.order = DataOrder(len(train_rows), train_cfg.batch_size, world_size, rank, train_cfg.seed)
        self.retriever_params = [p for p in model.query_encoder.parameters()]
        posterior = getattr(model, "posterior_encoder", None)
        self.posterior_params = [p for p in posterior.parameters()] if posterior is not None else []
        self.generator_params = [p for p in model.generator.parameters()]
        warm, total, decay = train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.lr_decay
        if self.strategy == "two-phase":
            self.phase_boundary = int(round(getattr(train_cfg, "two_phase_split", 0.5) * total))
            gen_end = self.phase_boundary
        else:
            self.phase_boundary = None
            gen_end = total
        self.retriever_start = max(train_cfg.generator_warmup_steps, self.phase_boundary or 0)
        start = self.retriever_start

        def gen_schedule(s):
            return lr_multiplier(s, warm, gen_end, decay) if s < gen_end else 0.0

        def ret_schedule(s):
            # the retrievers' schedule starts when the generator warm-up (or phase 1) ends
            return 0.0 if s < start else lr_multiplier(s - start, warm, total - start, decay)

        groups = [{"params": self.generator_params, "lr": generator_lr, "name": "generator"}]
        schedules = [gen_schedule]
        self.train_retriever = retriever_lr > 0
        if self.train_retriever:
            groups.append({"params": self.retriever_params, "lr": retriever_lr, "name": "retriever"})
            schedules.append(ret_schedule)
            if self.posterior_params:
                groups.append({"params": self.posterior_params, "lr": retriever_lr, "name": "posterior"})
                schedules.append(ret_schedule)
        else:
            model.query_encoder.requires_grad_(False)
            if posterior is not None:
                posterior.requires_grad_(False)
        # fused: one kernel for all parameters; the per-tensor loop took ~15% of a CPU step (MiniLM's 11.7M-entry
        # word embeddings get a dense gradient every step)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedules)
        self.step_num = 0

    def retriever_frozen(self) -> bool:
        return (not self.train_retriever) or self.step_num < self.retriever_start

    def generator_frozen(self) -> bool:
        return self.phase_boundary is not None and self.step_num >= self.phase_boundary

    def phase(self) -> str:
        if self.strategy == "two-phase":
            return "phase 1: generator (retriever frozen)" if not self.generator_frozen() else \
                "phase 2: retriever (generator frozen)"
        if self.strategy == "independent":
            return "independent"
        return "generator warm-up (retriever frozen)" if self.retriever_frozen() else "joint"

    def step(self) -> dict:
        start = time.time()
        self.model.train()
        frozen, gen_frozen = self.retriever_frozen(), self.generator_frozen()
        self.model.query_encoder.requires_grad_(not frozen)
        posterior = getattr(self.model, "posterior_encoder", None)
        if posterior is not None and self.posterior_params:
            posterior.requires_grad_(not frozen)
        self.model.generator.requires_grad_(not gen_frozen)
        batch = [self.rows[i] for i in self.order.indices(self.step_num)]
        questions = [r["question"] for r in batch]
        answers = [r["answers"][0] for r in batch]
        if getattr(self.objective, "needs_rows", False):
            out = self.objective.loss(self.model, questions, answers, rows=batch)
        else:
            out = self.objective.loss(self.model, questions, answers)
        self.optimizer.zero_grad(set_to_none=True)
        if out.loss.requires_grad:
            out.loss.backward()
        if self.world_size > 1:
            self._average_gradients()
        grad_norms = {
            "grad_norm/generator": 0.0 if gen_frozen else _grad_norm(self.generator_params),
            "grad_norm/retriever": 0.0 if frozen else _grad_norm(self.retriever_params),
        }
        if self.posterior_params:
            grad_norms["grad_norm/posterior"] = 0.0 if frozen else _grad_norm(self.posterior_params)
        if self.cfg.grad_clip:
            # per module: the retriever's gradient is often 10x the generator's, and one joint clip would
            # shrink the generator's updates by as much
            if not gen_frozen:
                torch.nn.utils.clip_grad_norm_(self.generator_params, self.cfg.grad_clip)
            if not frozen:
                torch.nn.utils.clip_grad_norm_(self.retriever_params, self.cfg.grad_clip)
                if self.posterior_params:
                    torch.nn.utils.clip_grad_norm_(self.posterior_params, self.cfg.grad_clip)
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}   # the rates this step used
        self.optimizer.step()
        self.scheduler.step()
        self.step_num += 1
        return {"loss": float(out.loss.detach()), **out.diagnostics, **grad_norms, **lrs,
                "retriever_frozen": float(frozen), "generator_frozen": float(gen_frozen),
                "step_seconds": time.time() - start}

    def _average_gradients(self) -> None:
        for p in self.generator_params + self.retriever_params + self.posterior_params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world_size

    def state_dict(self) -> dict:
        return {"step": self.step_num, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "estimator": self.estimator.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.estimator.load_state_dict(state.get("estimator", {}))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])


def _grad_norm(params) -> float:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.norm(torch.stack(norms))) if norms else 0.0
