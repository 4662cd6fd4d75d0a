"""train.parallel=fsdp (two gloo ranks on CPU, no Ray): a LoRA causal generator sharded with FSDP2 trains as one
process with the global batch does (same losses, same adapters), its trainer state round-trips (whole optimizer
moments, re-sharded on load), and its checkpoint holds the full adapter only, written by rank 0."""
import socket

import pytest
import torch
from safetensors.torch import load_file
from test_hf_causal_ddp import ROWS
from test_hf_causal_helpers import causal_rag

from pipeline.config import ConfigError, TrainConfig, from_dict
from pipeline.estimators import build_estimator
from pipeline.training import RagTrainer

STEPS = 3


def _trainer(batch_size, rank=0, world=1, parallel="ddp"):
    torch.manual_seed(0)
    model = causal_rag("qwen2")
    model.posterior_encoder = None
    cfg = TrainConfig(batch_size=batch_size, max_steps=STEPS, warmup_steps=0, lr_decay="constant", k=3,
                      parallel=parallel)
    return RagTrainer(model, build_estimator("rag-sequence", k=3), ROWS, cfg, 0.05, 0.05, rank=rank,
                      world_size=world)


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = _trainer(1, rank=rank, world=world, parallel="fsdp")
        gen = trainer.model.generator
        assert gen.is_sharded and all(isinstance(p, DTensor) for p in gen.parameters())
        losses = []
        for step in range(STEPS):
            if step == STEPS - 1:
                # whole optimizer moments out, re-sharded in: the last step must be unchanged by the round trip
                state = trainer.state_dict()
                assert not any(isinstance(v, DTensor) for st in state["optimizer"]["state"].values()
                               for v in st.values())
                trainer.load_state_dict(state)
            losses.append(trainer.step()["loss"])
        gathered = [None] * world
        dist.all_gather_object(gathered, losses)
        trainer.state_dict()                          # a collective: gathers the adapters to rank 0 for the writer
        if rank == 0:
            gen.save(f"{out_dir}/generator")
            torch.save({"losses": gathered}, f"{out_dir}/losses.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_the_adapters_as_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = _trainer(2)
    single_losses = [single.step()["loss"] for _ in range(STEPS)]
    per_rank = torch.load(tmp_path / "losses.pt", weights_only=True)["losses"]
    # the loss is the batch mean: the two ranks' losses (one question each) average to the global batch's
    assert [(a + b) / 2 for a, b in zip(*per_rank)] == pytest.approx(single_losses, abs=1e-5)
    saved = load_file(tmp_path / "generator" / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)                   # the adapters, no base weight
    named = {n.replace(".default", ""): p for n, p in single.model.generator.named_parameters() if "lora_" in n}
    assert len(saved) == len(named)
    for key, value in saved.items():
        ref = next(p for n, p in named.items() if n.endswith(key.removeprefix("base_model.model.")))
        assert value.shape == ref.shape and torch.allclose(value, ref.detach(), atol=1e-5), key
    assert any(bool(v.abs().gt(0).any()) for k, v in saved.items() if "lora_B" in k)      # they did train


def test_fsdp_is_refused_for_a_generator_it_cannot_shard():
    with pytest.raises(ConfigError, match="train.parallel=fsdp: shards an hf-causal generator only"):
        from_dict({"train": {"parallel": "fsdp"}}).validate()
    with pytest.raises(ConfigError, match="train.parallel: 'zero3'; choose ddp or fsdp"):
        from_dict({"train": {"parallel": "zero3"}}).validate()
