"""The training step, independent of Ray: optimisers with separate retriever and generator learning rates,
schedules, the generator warm-up (retriever frozen while the generator learns to read), DistributedDataParallel
over the modules that train, gradient accumulation, bf16 autocast, and a resumable data order.
`jobs/train.py` runs this inside Ray Train workers (and hands in `ray.train.torch.prepare_model` as `wrap`).

How DDP meets the estimators: an estimator calls several RagModel methods per batch (query encoder, posterior
encoder, generator, sometimes twice, sometimes without gradient), so no single submodule's `forward` is "the"
forward. `LossModule` registers the modules that train in the current phase and its `forward` runs the whole
estimator loss; that module is what gets wrapped, so every gradient of the step flows through one DDP reducer.

`train.parallel: fsdp` shards an hf-causal generator instead (torch's FSDP2 `fully_shard`, per decoder layer, in
place: see HFCausalGenerator.shard) and leaves it out of the DDP-wrapped LossModule: its gradients are
reduce-scattered by FSDP, the retrievers' still all-reduced by DDP. Its AdamW state is sharded too; trainer state
stores it whole (gathered on every rank, re-sharded on load, so a run resumes with another number of workers), and
the generator's checkpoint weights are gathered to rank 0 in `state_dict` (the adapters only, under LoRA).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.estimators.registry import build_objective


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
    """Example indices for (step, micro-batch, rank): a fresh permutation per epoch, a function of the seed only, so
    a resumed run continues exactly where it stopped and no example is lost or repeated.

    The stream is global: step s consumes examples [position(s), position(s) + per_step) of the endless sequence
    of permutations, split into micro-batches and ranks. `rebase(step, position)` restarts the stream at a saved
    position, so a run resumed with another number of workers or accumulation steps still loses nothing."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 accum_steps: int = 1):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self.accum_steps = accum_steps
        self.per_step = batch_size * world_size * accum_steps
        self.base_step, self.base_position = 0, 0
        self._perms: dict[int, np.ndarray] = {}

    def rebase(self, step: int, position: int) -> None:
        self.base_step, self.base_position = step, position

    def position(self, step: int) -> int:
        """Examples consumed by all workers before `step`."""
        return self.base_position + (step - self.base_step) * self.per_step

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed * 100_003 + epoch).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int = 0) -> list[int]:
        first = self.position(step) + (micro * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(first, first + self.batch_size)]


class LossModule(nn.Module):
    """The unit DDP wraps: the modules that train in this phase, and a forward that is the estimator's loss.

    `forward(questions, answers, rows)` -> (loss, diagnostics). The RagModel keeps its own (unwrapped) submodules,
    so estimators, evaluation and checkpoints see the plain model; only the gradient sync goes through DDP."""

    def __init__(self, model, objective, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        object.__setattr__(self, "rag", model)            # not a registered submodule: DDP syncs only `parts`
        object.__setattr__(self, "objective", objective)

    def forward(self, questions, answers, rows=None):
        if getattr(self.objective, "needs_rows", False):
            out = self.objective.loss(self.rag, questions, answers, rows=rows)
        else:
            out = self.objective.loss(self.rag, questions, answers)
        return out.loss, out.diagnostics


def default_wrap(module: nn.Module) -> nn.Module:
    """DDP over gloo/nccl when a process group is up (outside Ray Train); identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device_ids = [torch.cuda.current_device()] if next(module.parameters()).is_cuda else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    return module


class RagTrainer:
    """One optimiser step at a time. Parameter groups: generator, retriever (the prior query encoder), when the
    estimator trains one (vrag, jsa), posterior (q(z|x,y)'s query encoder), and, when the model has a passage
    encoder that trains, passage; the last two at the retriever's learning rate and schedule. Each group has its own
    gradient norm (logged) and clipping. `train.grad_accum_steps` micro-batches make one optimiser step.

    Strategies (`train.strategy`; the objective each trains is `pipeline.estimators.build_objective`'s):
      joint        `estimator`'s loss; every group trains from the start (after `generator_warmup_steps` for the
                   retrievers);
      two-phase    `estimator`'s loss; phase 1 (the first `two_phase_split` of max_steps): generator only,
                   retrievers frozen; phase 2: retrievers only, generator frozen. Each group's schedule runs over
                   its own phase;
      independent  its own objective (`independent`) in place of `estimator`'s: retriever contrastive on
                   gold_passage_ids + generator NLL on the gold passage; rows without gold_passage_ids fail at
                   construction, naming `data_source`.
    `objective_name` says which loss runs.
    """

    def __init__(self, model, estimator, train_rows: list[dict], train_cfg, retriever_lr: float,
                 generator_lr: float, rank: int = 0, world_size: int = 1, data_source: str = "the training data",
                 wrap: Callable[[nn.Module], nn.Module] | None = None, autocast: str | None = None,
                 generator_encoder_lr: float | None = None):
        """`wrap`: makes a LossModule distributed (DDP); jobs pass `ray.train.torch.prepare_model`, the default
        wraps in DDP when a torch process group of more than one rank is up. `autocast`: a device type ("cuda",
        "cpu") to run the forward under bf16 autocast, or None for fp32."""
        self.model, self.estimator, self.rows, self.cfg = model, estimator, train_rows, train_cfg
        self.rank, self.world_size = rank, world_size
        self.wrap = wrap or default_wrap
        self.autocast = autocast
        self.accum_steps = max(1, int(getattr(train_cfg, "grad_accum_steps", 1) or 1))
        self._wrapped: tuple[tuple[str, ...], nn.Module] | None = None
        self.last_indices: list[list[int]] = []     # example indices of the last step, one list per micro-batch
        if rank:
            # every rank builds identical weights from the same seed; from here on each rank draws its own
            # dropout masks and samples (rank 0 keeps the single-worker stream)
            seed_everything(train_cfg.seed + 7919 * rank)
        self.strategy = getattr(train_cfg, "strategy", "joint")
        self.objective = build_objective(estimator, self.strategy, train_cfg, train_rows, data_source)
        self.objective_name = getattr(self.objective, "name", "") or type(self.objective).__name__
        self.own_objective = self.objective is not estimator      # the strategy's objective replaces estimator's
        if hasattr(self.objective, "prepare"):
            self.objective.prepare(model)      # e.g. adds the posterior encoder for vrag / jsa
        self.parallel = getattr(train_cfg, "parallel", "ddp")
        # one worker has nothing to shard over: the generator then trains as under ddp
        self.sharded = self.parallel == "fsdp" and world_size > 1
        if self.sharded:
            if not hasattr(model.generator, "shard"):
                raise ValueError(f"train.parallel=fsdp: the {type(model.generator).__name__} generator cannot be "
                                 "sharded (hf-causal only); use train.parallel=ddp")
            model.generator.shard()            # before the optimizer: sharding replaces the parameters
        self.anchor = None
        if getattr(train_cfg, "retriever_anchor_kl", 0.0) > 0:
            from pipeline.anchor import AnchoredObjective, RetrieverAnchor

            self.anchor = RetrieverAnchor(model.query_encoder, train_cfg.retriever_anchor_kl, train_cfg.k)
            self.objective = AnchoredObjective(self.objective, self.anchor)
        self.order = DataOrder(len(train_rows), train_cfg.batch_size, world_size, rank, train_cfg.seed,
                               self.accum_steps)
        self.retriever_params = [p for p in model.query_encoder.parameters()]
        posterior = getattr(model, "posterior_encoder", None)
        self.posterior_params = [p for p in posterior.parameters()] if posterior is not None else []
        # the passage encoder, when the model has one (retriever.train_passage_encoder: fresh passage vectors with
        # gradient, index refreshed in the background), trains with the retrievers, at the retriever's rate
        passage = getattr(model, "passage_encoder", None)
        self.passage_params = [p for p in passage.parameters()] if passage is not None else []
        # a LoRA generator names its trainable parameters: the frozen base stays out of AdamW and the clip
        trainable = getattr(model.generator, "trainable_parameters", None)
        self.generator_params = list(trainable()) if trainable else list(model.generator.parameters())
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

        # a generator's pretrained encoder (copy-bart reading through MiniLM) trains at its own, smaller rate
        pretrained = {id(p) for p in getattr(model.generator, "pretrained_parameters", list)()}
        if generator_encoder_lr is None or not pretrained:
            pretrained = set()
        groups = [{"params": [p for p in self.generator_params if id(p) not in pretrained], "lr": generator_lr,
                   "name": "generator"}]
        schedules = [gen_schedule]
        if pretrained:
            groups.append({"params": [p for p in self.generator_params if id(p) in pretrained],
                           "lr": generator_encoder_lr, "name": "generator_encoder"})
            schedules.append(gen_schedule)
        self.train_retriever = retriever_lr > 0
        if self.train_retriever:
            groups.append({"params": self.retriever_params, "lr": retriever_lr, "name": "retriever"})
            schedules.append(ret_schedule)
            if self.posterior_params:
                groups.append({"params": self.posterior_params, "lr": retriever_lr, "name": "posterior"})
                schedules.append(ret_schedule)
            if self.passage_params:
                groups.append({"params": self.passage_params, "lr": retriever_lr, "name": "passage"})
                schedules.append(ret_schedule)
        else:
            model.query_encoder.requires_grad_(False)
            if posterior is not None:
                posterior.requires_grad_(False)
            if passage is not None:
                passage.requires_grad_(False)
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
        if self.own_objective:
            return self.objective_name
        return "generator warm-up (retriever frozen)" if self.retriever_frozen() else "joint"

    def _loss_module(self, frozen: bool, gen_frozen: bool) -> nn.Module | None:
        """The (wrapped) LossModule over the modules that train now; rebuilt when the phase changes."""
        parts = {}
        if not gen_frozen and not self.sharded:          # a sharded generator syncs its own gradients (FSDP)
            parts["generator"] = self.model.generator
        if not frozen:
            parts["query_encoder"] = self.model.query_encoder
            if self.posterior_params:
                parts["posterior_encoder"] = self.model.posterior_encoder
            if self.passage_params:
                parts["passage_encoder"] = self.model.passage_encoder
        key = tuple(parts)
        if not parts:
            return None
        if self._wrapped is None or self._wrapped[0] != key:
            self._wrapped = None                       # drop the previous phase's DDP (and its gradient hooks)
            self._wrapped = (key, self.wrap(LossModule(self.model, self.objective, parts)))
        return self._wrapped[1]

    def step(self) -> dict:
        start = time.time()
        self.model.train()
        frozen, gen_frozen = self.retriever_frozen(), self.generator_frozen()
        self.model.query_encoder.requires_grad_(not frozen)
        posterior = getattr(self.model, "posterior_encoder", None)
        if posterior is not None and self.posterior_params:
            posterior.requires_grad_(not frozen)
        if self.passage_params:
            self.model.passage_encoder.requires_grad_(not frozen)
        self.model.generator.requires_grad_(not gen_frozen)
        module = self._loss_module(frozen, gen_frozen)
        self.optimizer.zero_grad(set_to_none=True)
        losses, diags = [], []
        self.last_indices = []
        for micro in range(self.accum_steps):
            idx = self.order.indices(self.step_num, micro)
            self.last_indices.append(idx)
            batch = [self.rows[i] for i in idx]
            questions = [r["question"] for r in batch]
            answers = [r["answers"][0] for r in batch]
            # DDP all-reduces on the last micro-batch's backward only
            sync = micro == self.accum_steps - 1 or not hasattr(module, "no_sync")
            if self.sharded:
                # FSDP reduce-scatters on the last micro-batch's backward only, as DDP all-reduces
                self.model.generator.model.set_requires_gradient_sync(micro == self.accum_steps - 1)
            with (contextlib.nullcontext() if sync else module.no_sync()), self._autocast():
                if module is None:
                    loss, diag = LossModule(self.model, self.objective, {})(questions, answers, batch)
                else:
                    loss, diag = module(questions, answers, batch)
            if loss.requires_grad:
                (loss / self.accum_steps).backward()
            losses.append(float(loss.detach()))
            diags.append(diag)
        grad_norms = {
            "grad_norm/generator": 0.0 if gen_frozen else _grad_norm(self.generator_params),
            "grad_norm/retriever": 0.0 if frozen else _grad_norm(self.retriever_params),
        }
        if self.posterior_params:
            grad_norms["grad_norm/posterior"] = 0.0 if frozen else _grad_norm(self.posterior_params)
        if self.passage_params:
            grad_norms["grad_norm/passage"] = 0.0 if frozen else _grad_norm(self.passage_params)
        if self.cfg.grad_clip:
            # per module: the retriever's gradient is often 10x the generator's, and one joint clip would
            # shrink the generator's updates by as much
            if not gen_frozen:
                torch.nn.utils.clip_grad_norm_(self.generator_params, self.cfg.grad_clip)
            if not frozen:
                torch.nn.utils.clip_grad_norm_(self.retriever_params, self.cfg.grad_clip)
                if self.posterior_params:
                    torch.nn.utils.clip_grad_norm_(self.posterior_params, self.cfg.grad_clip)
                if self.passage_params:
                    torch.nn.utils.clip_grad_norm_(self.passage_params, self.cfg.grad_clip)
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}   # the rates this step used
        self.optimizer.step()
        self.scheduler.step()
        self.step_num += 1
        return {"loss": sum(losses) / len(losses), **_mean_dicts(diags), **grad_norms, **lrs,
                "retriever_frozen": float(frozen), "generator_frozen": float(gen_frozen),
                "examples": float(self.order.per_step), "step_seconds": time.time() - start}

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.autocast, dtype=torch.bfloat16)

    def _rank_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": rng, "estimator": self.estimator.state_dict()}

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the weights. With several workers this is a collective (every
        rank must call it): each rank's RNG and estimator state (JSA's caches) is gathered into `ranks`."""
        mine = self._rank_state()
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            optimizer = _full_optimizer_state(optimizer)
            self.model.generator.gather_for_save(self.rank)      # for the checkpoint writer on rank 0
        if self.world_size > 1:
            ranks: list = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return {"step": self.step_num, "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "data": {"position": self.order.position(self.step_num), "seed": self.order.seed,
                         "num_examples": self.order.n, "examples_per_step": self.order.per_step},
                "world_size": self.world_size, "ranks": ranks,
                "anchor": self.anchor.state_dict() if self.anchor is not None else None,
                # rank 0's, at the top level as before (older readers, single-worker tools)
                "estimator": ranks[0]["estimator"], "rng": ranks[0]["rng"]}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sharded:
            _shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.anchor is not None and state.get("anchor"):
            self.anchor.load_state_dict(state["anchor"])     # the run's starting retriever, not the resumed one
        data = state.get("data")
        if data is not None:
            self.order.rebase(self.step_num, int(data["position"]))
        ranks = state.get("ranks") or [{"rng": state.get("rng"), "estimator": state.get("estimator", {})}]
        if len(ranks) == self.world_size:
            mine = ranks[self.rank]
            self.estimator.load_state_dict(mine.get("estimator", {}))
            _set_rng(mine.get("rng"))
        else:
            # another number of workers: every rank gets the union of the saved estimator states and a fresh
            # RNG stream derived from the seed and the step
            self.estimator.load_state_dict(merge_states([r.get("estimator", {}) for r in ranks]))
            seed_everything(self.cfg.seed + 7919 * self.rank + 104_729 * self.step_num)


def merge_states(states: list[dict]) -> dict:
    """Union of per-rank estimator states: dict values (caches) are merged, later ranks win; others: the first."""
    out: dict = {}
    for st in states:
        for k, v in (st or {}).items():
            if isinstance(v, dict):
                out.setdefault(k, {}).update(v)
            else:
                out.setdefault(k, v)
    return out


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as plain values and a tensor: what `torch.load(weights_only=True)` can read back
    (a numpy array would need unpickling)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_rng(rng: dict | None) -> None:
    if not rng:
        return
    torch.set_rng_state(rng["torch"])
    st = rng["numpy"]
    np.random.set_state((st["bit_generator"], st["key"].numpy().astype(np.uint32), st["pos"], st["has_gauss"],
                         st["cached_gaussian"]))
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = {k for d in dicts for k in d}
    out = {}
    for k in keys:
        vals = [d[k] for d in dicts if isinstance(d.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def _grad_norm(params) -> float:
    norms = [_full(p.grad.detach().norm()) for p in params if p.grad is not None]
    return float(torch.norm(torch.stack(norms))) if norms else 0.0


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_optimizer_state(state: dict) -> dict:
    """The optimizer's state dict with every sharded (DTensor) value gathered whole, in CPU memory (a device never
    holds more than one whole moment at a time): a collective, every rank walks the same parameters in the same
    order."""
    def whole(v):
        return v.full_tensor().cpu() if hasattr(v, "full_tensor") else v

    return {**state, "state": {i: {k: whole(v) for k, v in st.items()} for i, st in sorted(state["state"].items())}}


def _shard_optimizer_state(optimizer) -> None:
    """After loading whole values: shard each state tensor of a sharded parameter as the parameter is (every rank
    holds the same whole value, so each keeps its own shard; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not isinstance(p, DTensor) or not st:
                continue
            for k, v in st.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                              src_data_rank=None)
