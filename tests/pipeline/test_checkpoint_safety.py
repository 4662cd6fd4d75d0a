"""trainer_state.pt is read with torch.load(weights_only=True): a real trainer state round-trips (RNG streams
included), and a planted pickle that would run code is refused without running it."""
import os
import random

import numpy as np
import pytest
import torch

from pipeline.checkpoint import CheckpointError, load_trainer_state
from pipeline.config import TrainConfig
from pipeline.estimators.base import EstimatorOutput
from pipeline.training import RagTrainer


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query_encoder = torch.nn.Linear(2, 1)
        self.generator = torch.nn.Linear(2, 1)


class _CachingEstimator:
    """Keeps a per-example cache, as JSA does, so the estimator state is not empty."""

    def __init__(self):
        self.cache = {}

    def loss(self, model, questions, answers, rows=None):
        for q in questions:
            self.cache[q] = f"p{len(self.cache)}"
        x = torch.ones(len(questions), 2)
        return EstimatorOutput((model.query_encoder(x) + model.generator(x)).pow(2).mean(), {"nll": 0.0})

    def state_dict(self):
        return {"cache": dict(self.cache)}

    def load_state_dict(self, s):
        self.cache = dict(s.get("cache", {}))


def _trainer():
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=2, max_steps=6, warmup_steps=1, lr_decay="linear")
    rows = [{"question": f"q{i}", "answers": ["a"]} for i in range(6)]
    return RagTrainer(_Model(), _CachingEstimator(), rows, cfg, 0.1, 0.1)


def test_trainer_state_round_trips_through_weights_only_load(tmp_path):
    trainer = _trainer()
    trainer.step()
    trainer.step()
    torch.save(trainer.state_dict(), tmp_path / "trainer_state.pt")
    expected = (np.random.rand(), random.random(), float(torch.rand(())))

    state = load_trainer_state(tmp_path)
    assert state["step"] == 2 and state["estimator"]["cache"]
    np.random.seed(123), random.seed(123), torch.manual_seed(123)         # scramble every stream
    resumed = _trainer()
    resumed.load_state_dict(state)
    assert resumed.step_num == 2 and resumed.estimator.cache == trainer.estimator.cache
    assert (np.random.rand(), random.random(), float(torch.rand(()))) == expected
    assert resumed.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()
    resumed.step()                                                        # and it trains on from there


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"step": 3, "optimizer": exploit}, tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt: refused"):
        load_trainer_state(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_without_trainer_state_has_none(tmp_path):
    assert load_trainer_state(tmp_path) is None
