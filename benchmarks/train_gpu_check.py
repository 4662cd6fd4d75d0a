"""GPU check of the training step (no Ray, FAISS or MLflow needed: runs on a bare CUDA machine with torch +
transformers): RagTrainer on CUDA in fp32 and under bf16 autocast, for rag-sequence and jsa, with copy-bart and a
Hugging Face BART generator (tiny, from config) and a tiny random BERT query encoder over an in-memory index.

    python benchmarks/train_gpu_check.py --tokenizer DIR [--steps 6]

DIR: any BERT WordPiece tokenizer directory (e.g. the embedded MiniLM's). Checks, per case: the first-step loss
under bf16 is within 5% of fp32 on the same weights and batch, losses stay finite, every trained module's
weights move; prints median step times (informational). Then two ranks on the one GPU (gloo, DDP with
device_ids) must end with the same weights as one process with the global batch. Exit status 1 on a failed check.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gpu_host import stub_missing_faiss  # noqa: E402

stub_missing_faiss()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.index import ArrayIndex  # noqa: E402


def random_index(n: int, dim: int, seed: int = 0) -> ArrayIndex:
    """Exact search over n random unit vectors, with short passages of repeated words."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    words = ["alpha", "river", "town", "guild", "north", "stone", "lamp", "green", "harbor", "mill"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" item{i}" for i in range(n)]
    return ArrayIndex(emb / np.linalg.norm(emb, axis=1, keepdims=True), texts=texts,
                      titles=[f"T{i}" for i in range(n)])


def build(kind: str, tok_dir: str, enc_dir: Path, index, device):
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from pipeline.config import GeneratorConfig
    from pipeline.models.generator import HFSeq2SeqGenerator, build_generator
    from pipeline.models.retriever import TextEncoder
    from pipeline.rag import RagModel

    torch.manual_seed(0)
    enc = TextEncoder(str(enc_dir), pooling="mean", normalize=True, max_length=32)
    if kind == "copy-bart":
        gen = build_generator(GeneratorConfig(tokenizer=tok_dir, d_model=64, encoder_layers=2, decoder_layers=2,
                                              ffn_dim=128, output_vocab_size=0, dropout=0.0, max_source_length=64),
                              None)
    else:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = BartConfig(vocab_size=tok.vocab_size, d_model=64, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                         decoder_ffn_dim=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.sep_token_id, dropout=0.0,
                         max_position_embeddings=128)
        gen = HFSeq2SeqGenerator("tiny-bart", 64, 8, model=BartForConditionalGeneration(cfg), tokenizer=tok)
    return RagModel(enc, gen, index, tau=0.05).to(device)


def rows_for(n: int) -> list[dict]:
    return [{"id": f"q{i}", "question": f"where is item{i} near the river", "answers": [f"item{i}"]} for i in range(n)]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def case(kind: str, est_name: str, precision: str, steps: int, tok_dir: str, enc_dir: Path, index, device) -> dict:
    from pipeline.config import EstimatorConfig, TrainConfig
    from pipeline.estimators import build_estimator
    from pipeline.training import RagTrainer

    model = build(kind, tok_dir, enc_dir, index, device)
    est = build_estimator(est_name, k=3, cfg=EstimatorConfig(jsa_num_proposals=4))
    cfg = TrainConfig(batch_size=4, max_steps=steps, warmup_steps=0, lr_decay="constant", grad_accum_steps=2)
    trainer = RagTrainer(model, est, rows_for(64), cfg, 1e-4, 1e-3,
                         autocast=device.type if precision == "bf16" else None)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in
              (("generator", model.generator), ("query_encoder", model.query_encoder))}
    losses, times = [], []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        m = trainer.step()
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(m["loss"])
    moved = {n: any(not torch.equal(a, b) for a, b in zip(ps, getattr(model, n).parameters()))
             for n, ps in before.items()}
    return {"losses": losses, "step_ms_median": 1000 * statistics.median(times[1:]), "moved": moved}


def _ddp_rank(rank, world, port, tok_dir, enc_dir, out, device_type):
    import torch.distributed as dist

    from pipeline.config import TrainConfig
    from pipeline.estimators import build_estimator
    from pipeline.training import RagTrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if device_type == "cuda":
        torch.cuda.set_device(0)
    model = build("hf-bart", tok_dir, Path(enc_dir), random_index(200, 64), torch.device(device_type))
    cfg = TrainConfig(batch_size=2, max_steps=3, warmup_steps=0, lr_decay="constant")
    t = RagTrainer(model, build_estimator("rag-sequence", k=3), rows_for(64), cfg, 1e-3, 1e-3, rank=rank,
                   world_size=world)
    for _ in range(3):
        t.step()
    if rank == 0:
        torch.save([p.detach().cpu() for p in model.parameters()], out)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script")
    p.add_argument("--only-ddp", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    from transformers import BertConfig, BertModel

    from pipeline.config import TrainConfig
    from pipeline.estimators import build_estimator
    from pipeline.training import RagTrainer

    device = torch.device(args.device)
    print("device:", torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch", torch.__version__,
          flush=True)
    failures, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        enc_dir = Path(tmp) / "enc"
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)).save_pretrained(enc_dir)
        tok.save_pretrained(enc_dir)
        index = random_index(200, 64)
        for kind in () if args.only_ddp else ("copy-bart", "hf-bart"):
            for est in ("rag-sequence", "jsa"):
                r = {prec: case(kind, est, prec, args.steps, args.tokenizer, enc_dir, index, device)
                     for prec in ("fp32", "bf16")}
                l32, l16 = r["fp32"]["losses"][0], r["bf16"]["losses"][0]
                rel = abs(l16 - l32) / max(abs(l32), 1e-6)
                ok = (rel < 0.05 and all(np.isfinite(x) for v in r.values() for x in v["losses"])
                      and all(all(v["moved"].values()) for v in r.values()))
                if not ok:
                    failures.append(f"{kind}/{est}")
                results[f"{kind}/{est}"] = {**r, "first_loss_rel_diff": rel, "ok": ok}
                print(f"{kind:>9} {est:>12}: first loss fp32 {l32:.4f} bf16 {l16:.4f} (rel {rel:.4f}); "
                      f"step fp32 {r['fp32']['step_ms_median']:.0f} ms, bf16 {r['bf16']['step_ms_median']:.0f} ms; "
                      f"weights moved {r['bf16']['moved']}  {'OK' if ok else 'FAIL'}", flush=True)
        # DDP over two ranks on the one GPU == one process with the global batch
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(tmp) / "ddp.pt"
        mp.spawn(_ddp_rank, args=(2, port, args.tokenizer, str(enc_dir), str(out), device.type), nprocs=2,
                 join=True)
        ddp = torch.load(out)
        model = build("hf-bart", args.tokenizer, enc_dir, random_index(200, 64), device)
        t = RagTrainer(model, build_estimator("rag-sequence", k=3), rows_for(64),
                       TrainConfig(batch_size=4, max_steps=3, warmup_steps=0, lr_decay="constant"), 1e-3, 1e-3)
        for _ in range(3):
            t.step()
        init = [p.detach().cpu() for p in build("hf-bart", args.tokenizer, enc_dir, random_index(200, 64),
                                                 device).parameters()]
        after = [p.detach().cpu() for p in model.parameters()]
        # Adam turns rounding-level gradient differences of near-zero gradients into lr-sized steps, so compare
        # the whole difference with the whole update rather than entry by entry
        diff = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(ddp, after))))
        update = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, init))))
        ok = diff < 0.01 * update
        results["ddp_2_ranks_vs_global_batch"] = {"diff_norm": diff, "update_norm": update}
        print(f"DDP 2 ranks (gloo, {device.type}) vs 1 process with the global batch: |w_ddp - w| {diff:.2e} vs "
              f"update |w - w0| {update:.2e}  {'OK' if ok else 'FAIL'}")
        if not ok:
            failures.append("ddp")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
