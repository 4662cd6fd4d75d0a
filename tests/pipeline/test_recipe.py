"""The training recipe without Ray: the lifecycle's events in order, and a run saved at step 3 and restored
trains on exactly as the uninterrupted run (same losses, same weights)."""
import math

import pytest
import torch

from pipeline.config import load_config
from testlib import minilm_index

from pipeline.index import load_index
from pipeline.recipe import Events, TrainRecipe, dev_score
from pipeline.synthetic import generate_knowledge_base

STEPS = 6


@pytest.fixture(scope="module")
def kb_index(tmp_path_factory):
    kb = generate_knowledge_base(seed=0, num_entities=10)
    return kb, load_index(minilm_index(tmp_path_factory.mktemp("index"), kb.passages))


def _cfg(estimator="rag-sequence", **train):
    sets = {"train.max_steps": STEPS, "train.batch_size": 2, "train.k": 3, "eval.k": 3, "train.log_every": 2,
            "train.eval_every": 3, "train.checkpoint_every": 4, "train.warmup_steps": 1, "train.torch_threads": 1,
            "train.estimator": estimator, "generator.max_source_length": 64, "eval.max_questions": 4,
            **{f"train.{k}": v for k, v in train.items()}}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


class _Recorder(Events):
    wants_checkpoints = True

    def __init__(self, tmp):
        self.calls, self.tmp = [], tmp

    def after_step(self, recipe, metrics):
        self.calls.append(("step", recipe.step, metrics["loss"]))

    def log(self, recipe, step, metrics):
        self.calls.append(("log", step, metrics["loss_mean"]))

    def report(self, recipe, report, write_checkpoint):
        path = write_checkpoint(self.tmp / f"ckpt-{report['step']}") if write_checkpoint else None
        self.calls.append(("report", report["step"], dict(report), path))


def test_the_loop_calls_its_events_in_order(kb_index, tmp_path):
    kb, index = kb_index
    events = _Recorder(tmp_path)
    recipe = TrainRecipe(_cfg(), kb.train, kb.dev, events=events).setup(index)
    recipe.train()
    kinds = [(c[0], c[1]) for c in events.calls]
    assert [s for k, s in kinds if k == "step"] == list(range(1, STEPS + 1))
    assert [s for k, s in kinds if k == "log"] == [2, 4, 6]
    # dev at 3 and 6 (eval_every and the last), checkpoints at 4 and 6 (checkpoint_every and the last)
    reports = {c[1]: c for c in events.calls if c[0] == "report"}
    assert sorted(reports) == [3, 4, 6]
    assert reports[3][3] is None and reports[4][3] is not None and reports[6][3] is not None
    for step in (3, 6):
        r = reports[step][2]
        assert {"dev_em", "dev_f1", "dev_recall@1", "dev_nll"} <= set(r) and r["dev_nll"] > 0
        assert r["dev_score"] == pytest.approx(r["dev_em"] + r["dev_recall@1"]) == pytest.approx(dev_score(r, "em+recall@1"))
    assert reports[4][2]["dev_score"] == -math.inf                    # a checkpoint between evaluations
    assert (reports[4][3] / "trainer_state.pt").exists() and (reports[4][3] / "rag.json").exists()


class _Interrupted(Exception):
    pass


class _StopAfterCheckpoint(_Recorder):
    """The run dies right after its step-3 checkpoint is written."""

    def report(self, recipe, report, write_checkpoint):
        super().report(recipe, report, write_checkpoint)
        if report["step"] == 3:
            raise _Interrupted


def test_a_restored_recipe_trains_on_exactly_as_the_uninterrupted_run(kb_index, tmp_path):
    kb, index = kb_index
    cfg = _cfg(eval_every=0, checkpoint_every=3)
    full = _Recorder(tmp_path / "full")
    whole = TrainRecipe(cfg, kb.train, events=full).setup(index)
    whole.train()

    first = _StopAfterCheckpoint(tmp_path / "first")
    with pytest.raises(_Interrupted):
        TrainRecipe(cfg, kb.train, events=first).setup(index).train()
    saved = next(c[3] for c in first.calls if c[0] == "report" and c[1] == 3)

    torch.manual_seed(999)                                            # the restore must not depend on this
    rest = _Recorder(tmp_path / "rest")
    resumed = TrainRecipe(cfg, kb.train, events=rest).setup(checkpoint_dir=saved)
    assert resumed.resumed_from == 3
    resumed.train()
    losses = lambda rec: [c[2] for c in rec.calls if c[0] == "step"]  # noqa: E731
    assert len(losses(rest)) == STEPS - 3
    assert losses(first) + losses(rest) == pytest.approx(losses(full), rel=1e-5)
    for a, b in zip(whole.model.generator.parameters(), resumed.model.generator.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(whole.model.query_encoder.parameters(), resumed.model.query_encoder.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
