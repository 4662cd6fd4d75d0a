
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training import DataOrder, RagTrainer, lr_multiplier


def test_data_order_covers_each_example_once_per_epoch_across_workers():
    n, b, w = 24, 4, 2
    orders = [DataOrder(n, b, world_size=w, rank=r, seed=3) for r in range(w)]
    seen = [i for step in range(n // (b * w)) for o in orders for i in o.indices(step)]
    assert sorted(seen) == list(range(n))


def test_data_order_is_a_function_of_step_so_resume_loses_nothing():
    a, b = DataOrder(50, 8, seed=1), DataOrder(50, 8, seed=1)
    full = [a.indices(s) for s in range(10)]
    resumed = [b.indices(s) for s in range(6, 10)]
    assert resumed == full[6:]
    assert DataOrder(50, 8, seed=2).indices(0) != full[0]


def test_lr_schedule():
    assert lr_multiplier(0, 10, 100, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, "linear") == pytest.approx(1.0)
    assert lr_multiplier(100, 10, 100, "linear") == 0.0
    assert lr_multiplier(55, 10, 100, "constant") == 1.0
    assert lr_multiplier(55, 10, 100, "cosine") == pytest.approx(0.5, abs=1e-9)


class _ToyModel(torch.nn.Module):
    """Stands in for RagModel: a 'query encoder' and a 'generator' parameter."""

    def __init__(self):
        super().__init__()
        self.query_encoder = torch.nn.Linear(2, 1)
        self.generator = torch.nn.Linear(2, 1)


class _ToyEstimator:
    def loss(self, model, questions, answers):
        from pipeline.estimators.base import EstimatorOutput

        x = torch.ones(len(questions), 2)
        return EstimatorOutput((model.query_encoder(x) + model.generator(x)).pow(2).mean(), {"nll": 0.0})

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


def test_generator_warmup_freezes_the_retriever_then_releases_it():
    torch.manual_seed(0)
    model = _ToyModel()
    cfg = TrainConfig(batch_size=2, max_steps=6, generator_warmup_steps=3, warmup_steps=0, lr_decay="constant")
    rows = [{"question": "q", "answers": ["a"]}] * 4
    trainer = RagTrainer(model, _ToyEstimator(), rows, cfg, retriever_lr=0.1, generator_lr=0.1)
    before = model.query_encoder.weight.detach().clone()
    for _ in range(3):
        m = trainer.step()
        assert m["retriever_frozen"] == 1.0 and m["lr/retriever"] == 0.0 and m["lr/generator"] == 0.1
    assert torch.equal(model.query_encoder.weight, before)
    m = trainer.step()
    assert m["retriever_frozen"] == 0.0 and m["lr/retriever"] == pytest.approx(0.1)
    assert not torch.equal(model.query_encoder.weight, before)


def test_trainer_state_round_trip_continues_identically():
    rows = [{"question": str(i), "answers": ["a"]} for i in range(8)]
    cfg = TrainConfig(batch_size=2, max_steps=6, warmup_steps=2)

    def run(split):
        torch.manual_seed(0)
        model = _ToyModel()
        t = RagTrainer(model, _ToyEstimator(), rows, cfg, 0.05, 0.02)
        for _ in range(split):
            t.step()
        if split < 6:
            state = t.state_dict()
            torch.manual_seed(0)
            fresh = _ToyModel()
            fresh.load_state_dict(model.state_dict())
            t = RagTrainer(fresh, _ToyEstimator(), rows, cfg, 0.05, 0.02)
            t.load_state_dict(state)
            model = fresh
            for _ in range(6 - split):
                t.step()
        return model.generator.weight.detach()

    assert torch.allclose(run(6), run(3))


class _FeatureEstimator:
    """A loss that depends on which examples the batch holds (question text = a number), with per-example state
    (like JSA's cache) so that checkpoints must carry every rank's estimator state."""

    def __init__(self):
        self.cache = {}

    def loss(self, model, questions, answers):
        from pipeline.estimators.base import EstimatorOutput

        x = torch.tensor([[float(q), 1.0] for q in questions])
        for q in questions:
            self.cache[q] = self.cache.get(q, 0) + 1
        pred = model.query_encoder(x) + model.generator(x)
        return EstimatorOutput((pred - x[:, :1] / 10).pow(2).mean(), {"batch": float(len(questions))})

    def state_dict(self):
        return {"cache": dict(self.cache)}

    def load_state_dict(self, s):
        self.cache = dict(s.get("cache", {}))


_ROWS = [{"question": str(i), "answers": ["a"]} for i in range(16)]


def _train(steps, batch_size, accum=1, rank=0, world=1, seed=0):
    torch.manual_seed(0)
    model = _ToyModel()
    cfg = TrainConfig(batch_size=batch_size, max_steps=steps, warmup_steps=0, lr_decay="constant",
                      grad_accum_steps=accum, seed=seed)
    t = RagTrainer(model, _FeatureEstimator(), _ROWS, cfg, 0.05, 0.05, rank=rank, world_size=world)
    seen = []
    for _ in range(steps):
        m = t.step()
        seen.append(t.last_indices)
    return model, t, seen, m


def test_gradient_accumulation_equals_the_large_batch():
    big, _, seen_big, m_big = _train(5, batch_size=4)
    acc, _, seen_acc, m_acc = _train(5, batch_size=2, accum=2)
    for a, b in zip(big.parameters(), acc.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [sum(s, []) for s in seen_acc] == [sum(s, []) for s in seen_big]     # same examples, same order
    assert m_acc["examples"] == m_big["examples"] == 4.0 and m_acc["batch"] == 2.0


def test_data_order_rebased_on_another_worker_count_loses_nothing():
    one = DataOrder(40, 2, seed=5)
    planned = [i for s in range(10) for i in one.indices(s)]
    consumed = [i for s in range(4) for i in one.indices(s)]               # 4 steps on one worker ...
    two = [DataOrder(40, 2, world_size=2, rank=r, seed=5) for r in range(2)]
    for o in two:
        o.rebase(4, one.position(4))                                        # ... resumed on two
    consumed += [i for s in range(4, 7) for o in two for i in o.indices(s)]
    assert consumed == planned


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, trainer, seen, _ = _train(4, batch_size=2, rank=rank, world=world)
        assert trainer._wrapped is not None and isinstance(trainer._wrapped[1],
                                                           torch.nn.parallel.DistributedDataParallel)
        state = trainer.state_dict()                                        # a collective: every rank calls it
        if rank == 0:
            torch.save({"params": [p.detach() for p in model.parameters()], "state": state, "seen": seen}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_over_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    """Two gloo ranks, batch 2 each, through DDP (LossModule wrapped): the same weights as one process with batch
    4, and the checkpoint state carries both ranks' estimator caches."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    single, t1, seen1, _ = _train(4, batch_size=4)
    for a, b in zip(got["params"], single.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    state = got["state"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    caches = [set(r["estimator"]["cache"]) for r in state["ranks"]]
    assert caches[0] and caches[1] and not caches[0] & caches[1]            # each rank saw its own examples
    assert caches[0] | caches[1] == set(t1.estimator.cache)
    assert state["data"]["position"] == 4 * 4


def test_a_passage_encoder_trains_with_the_retrievers_in_its_own_group():
    class WithPassage(_ToyModel):
        def __init__(self):
            super().__init__()
            self.passage_encoder = torch.nn.Linear(2, 1)

    class Est(_FeatureEstimator):
        def loss(self, model, questions, answers):
            out = super().loss(model, questions, answers)
            x = torch.tensor([[float(q), 1.0] for q in questions])
            out.loss = out.loss + model.passage_encoder(x).pow(2).mean()
            return out

    torch.manual_seed(0)
    model = WithPassage()
    cfg = TrainConfig(batch_size=2, max_steps=4, generator_warmup_steps=2, warmup_steps=0, lr_decay="constant")
    t = RagTrainer(model, Est(), _ROWS, cfg, 0.1, 0.1)
    assert [g["name"] for g in t.optimizer.param_groups] == ["generator", "retriever", "passage"]
    before = model.passage_encoder.weight.detach().clone()
    m = t.step()
    assert m["grad_norm/passage"] == 0.0 and torch.equal(model.passage_encoder.weight, before)   # warm-up: frozen
    t.step()
    m = t.step()
    assert m["grad_norm/passage"] > 0 and not torch.equal(model.passage_encoder.weight, before)


def test_state_saved_by_two_ranks_loads_into_one_worker_with_merged_caches_and_position():
    _, t, _, _ = _train(3, batch_size=2)
    state = t.state_dict()
    state["ranks"] = [{"rng": state["rng"], "estimator": {"cache": {"1": 1, "2": 1}}},
                      {"rng": state["rng"], "estimator": {"cache": {"3": 1}}}]
    state["world_size"], state["data"]["position"] = 2, 12          # 3 steps x 2 ranks x batch 2
    torch.manual_seed(0)
    fresh = RagTrainer(_ToyModel(), _FeatureEstimator(), _ROWS,
                       TrainConfig(batch_size=2, max_steps=6, warmup_steps=0, lr_decay="constant"), 0.05, 0.05)
    fresh.load_state_dict(state)
    assert fresh.step_num == 3 and fresh.estimator.cache == {"1": 1, "2": 1, "3": 1}
    order = DataOrder(len(_ROWS), 2, world_size=2, seed=0)
    assert fresh.order.indices(3) == [order._perm(0)[i] for i in (12, 13)]   # continues after the 12 consumed
