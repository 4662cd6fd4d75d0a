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
    def __init__(self, model, estimator, train_rows: list[dict], train_cfg, retriever_lr: float,
                 generator_lr: float, rank: int = 0, world_size: int = 1):
        self.model, self.estimator, self.rows, self.cfg = model, estimator, train_rows, train_cfg
        self.rank, self.world_size = rank, world_size
        self.order = DataOrder(len(train_rows), train_cfg.batch_size, world_size, rank, train_cfg.seed)
        self.retriever_params = [p for p in model.query_encoder.parameters()]
        self.generator_params = [p for p in model.generator.parameters()]
        groups = [{"params": self.generator_params, "lr": generator_lr, "name": "generator"}]
        self.train_retriever = retriever_lr > 0
        if self.train_retriever:
            groups.append({"params": self.retriever_params, "lr": retriever_lr, "name": "retriever"})
        else:
            model.query_encoder.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
        warm, total, decay = train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.lr_decay
        gen_warm = train_cfg.generator_warmup_steps
        # The retriever's schedule starts when the generator warm-up ends.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [
            lambda s: lr_multiplier(s, warm, total, decay),
            *([lambda s: 0.0 if s < gen_warm else lr_multiplier(s - gen_warm, warm, total - gen_warm, decay)]
              if self.train_retriever else []),
        ])
        self.step_num = 0

    def retriever_frozen(self) -> bool:
        return (not self.train_retriever) or self.step_num < self.cfg.generator_warmup_steps

    def step(self) -> dict:
        start = time.time()
        self.model.train()
        frozen = self.retriever_frozen()
        self.model.query_encoder.requires_grad_(not frozen)
        batch = [self.rows[i] for i in self.order.indices(self.step_num)]
        questions = [r["question"] for r in batch]
        answers = [r["answers"][0] for r in batch]
        out = self.estimator.loss(self.model, questions, answers)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.world_size > 1:
            self._average_gradients()
        grad_norms = {
            "grad_norm/generator": _grad_norm(self.generator_params),
            "grad_norm/retriever": 0.0 if frozen else _grad_norm(self.retriever_params),
        }
        if self.cfg.grad_clip:
            # per module: the retriever's gradient is often 10x the generator's, and one joint clip would
            # shrink the generator's updates by as much
            torch.nn.utils.clip_grad_norm_(self.generator_params, self.cfg.grad_clip)
            if not frozen:
                torch.nn.utils.clip_grad_norm_(self.retriever_params, self.cfg.grad_clip)
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}   # the rates this step used
        self.optimizer.step()
        self.scheduler.step()
        self.step_num += 1
        return {"loss": float(out.loss.detach()), **out.diagnostics, **grad_norms, **lrs,
                "retriever_frozen": float(frozen), "step_seconds": time.time() - start}

    def _average_gradients(self) -> None:
        for p in self.generator_params + self.retriever_params:
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
