import math

import numpy as np
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
