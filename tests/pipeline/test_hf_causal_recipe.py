"""The training recipe (no Ray) with an hf-causal LoRA generator: train, save at step 3, restore, train on: the
same losses and adapters as the uninterrupted run, and the base never moves."""
import pytest
import torch
from test_hf_causal_helpers import save_tiny_base
from testlib import minilm_index

from pipeline.config import load_config
from pipeline.index import load_index
from pipeline.recipe import Events, TrainRecipe
from pipeline.synthetic import generate_knowledge_base

STEPS = 5


class _Interrupted(Exception):
    pass


class _Recorder(Events):
    wants_checkpoints = True

    def __init__(self, tmp, stop_at=None):
        self.losses, self.saved, self.tmp, self.stop_at = [], {}, tmp, stop_at

    def after_step(self, recipe, metrics):
        self.losses.append(metrics["loss"])

    def report(self, recipe, report, write_checkpoint):
        if write_checkpoint:
            self.saved[report["step"]] = write_checkpoint(self.tmp / f"ckpt-{report['step']}")
        if report["step"] == self.stop_at:
            raise _Interrupted


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_recipe")
    kb = generate_knowledge_base(seed=0, num_entities=10)
    base = save_tiny_base(root / "base", "llama", pad=False)
    sets = {"train.max_steps": STEPS, "train.batch_size": 2, "train.k": 2, "eval.k": 2, "train.log_every": 1,
            "train.checkpoint_every": 3, "train.warmup_steps": 1, "train.torch_threads": 1,
            "train.estimator": "jsa", "estimator.jsa_num_proposals": 2, "generator.kind": "hf-causal",
            "generator.name_or_path": str(base), "generator.max_source_length": 64, "generator.max_target_length": 6,
            "generator.lr": 1e-2, "generator.lora.r": 4, "generator.lora.alpha": 8, "generator.lora.dropout": 0.0,
            "generator.lora.target_modules": "q_proj,v_proj"}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    return kb, load_index(minilm_index(root / "index", kb.passages)), cfg


def test_a_restored_lora_recipe_trains_on_exactly_as_the_uninterrupted_run(setting, tmp_path):
    kb, index, cfg = setting
    full = _Recorder(tmp_path / "full")
    whole = TrainRecipe(cfg, kb.train, events=full).setup(index)
    base_before = {n: p.detach().clone() for n, p in whole.model.generator.named_parameters() if "lora_" not in n}
    whole.train()

    first = _Recorder(tmp_path / "first", stop_at=3)
    with pytest.raises(_Interrupted):
        TrainRecipe(cfg, kb.train, events=first).setup(index).train()
    assert not (first.saved[3] / "generator" / "base").exists()          # adapter only: the base is referenced
    torch.manual_seed(999)                                               # the restore must not depend on this
    rest = _Recorder(tmp_path / "rest")
    resumed = TrainRecipe(cfg, kb.train, events=rest).setup(checkpoint_dir=first.saved[3])
    assert resumed.resumed_from == 3
    resumed.train()
    assert len(rest.losses) == STEPS - 3
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-5)
    named = dict(resumed.model.generator.named_parameters())
    moved = 0
    for n, p in whole.model.generator.named_parameters():
        assert torch.allclose(p, named[n], atol=1e-6), n
        if n in base_before:
            assert torch.equal(p, base_before[n]), n                     # the base never trains
        elif "lora_B" in n and bool(p.abs().gt(0).any()):                 # lora_B starts at zero
            moved += 1
    assert moved > 0
