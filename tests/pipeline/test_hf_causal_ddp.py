"""DDP (two gloo ranks, no Ray) over a LoRA causal generator: the frozen base stays out of DDP and unchanged, and
two ranks with a batch of 1 each train the adapters as one process with the batch of 2 does."""
import socket

import torch
from test_hf_causal_helpers import QUESTIONS, ANSWERS, causal_rag

from pipeline.config import TrainConfig
from pipeline.estimators import build_estimator
from pipeline.training import RagTrainer

ROWS = [{"question": q, "answers": [a], "id": str(i)} for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


def _train(batch_size, rank=0, world=1, steps=3):
    torch.manual_seed(0)
    model = causal_rag("qwen2")
    model.posterior_encoder = None
    cfg = TrainConfig(batch_size=batch_size, max_steps=steps, warmup_steps=0, lr_decay="constant", k=3)
    trainer = RagTrainer(model, build_estimator("rag-sequence", k=3), ROWS, cfg, 0.05, 0.05, rank=rank,
                         world_size=world)
    base = {n: p.detach().clone() for n, p in model.generator.named_parameters() if "lora_" not in n}
    for _ in range(steps):
        trainer.step()
    return model, trainer, base


def _worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, trainer, base = _train(1, rank=rank, world=world)
        ddp = trainer._wrapped[1]
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        synced = {id(p) for p in ddp.parameters() if p.requires_grad}
        assert all(id(p) not in synced for n, p in model.generator.named_parameters() if "lora_" not in n)
        assert all(torch.equal(p, base[n]) for n, p in model.generator.named_parameters() if n in base)
        if rank == 0:
            torch.save({n: p.detach() for n, p in model.generator.named_parameters() if "lora_" in n}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_trains_the_adapters_as_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    single, _, _ = _train(2)
    named = dict(single.generator.named_parameters())
    assert got and all(torch.allclose(v, named[n], atol=1e-6) for n, v in got.items())
    assert any(bool(v.abs().gt(0).any()) for n, v in got.items() if "lora_B" in n)      # the adapters did train
