"""GPU check of the causal generator at a realistic size: a random-weight Qwen2-family model of ~0.5B parameters built
from Qwen2.5-0.5B's config (no download), LoRA, bf16, the rag-sequence training step over K=5 passages per question
through the project's own code (HFCausalGenerator, the rag-sequence estimator, RagTrainer). Prints tokens/s, model
FLOPs utilisation and peak memory; writes JSON. No Ray, MLflow or FAISS needed (a bare CUDA machine with torch,
transformers and peft, and this checkout).

    python benchmarks/causal_gpu_check.py [--batch-size 16] [--steps 10] [--out benchmarks/results/gpu/causal_gpu_check.json]
    python benchmarks/causal_gpu_check.py --tiny --device cpu      # a dry run of this script at a tiny size

The model: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936 (tied), base weights in bf16
(`generator.dtype: bfloat16`), the forward under bf16 autocast (`train.precision: bf16`); LoRA r=16, alpha 32 on
q/k/v/o/gate/up/down (configs/real_qwen_lora.yaml's targets; adapters fp32). Prompts are the embedded MiniLM
tokenizer's tokens of generated passages (~`--max-source-length` tokens each) and questions; the model's embedding
keeps Qwen's 151,936 rows, so the compute per token is Qwen2.5-0.5B's.

Model FLOPs utilisation = model FLOPs per step / step time / the card's dense bf16 peak (989 TFLOP/s for H100 SXM and
H200; `--peak-tflops` for another card). Model FLOPs count real tokens only (padding is waste), per
`benchmarks/causal_common.step_flops`:

    LoRA, per token:            4 * (N_body - N_lora) + 6 * N_lora    (a frozen weight: forward 2N + activation
                                                                        gradient 2N, no weight gradient: ~4N, not 6N)
    lm_head, per answer token:  4 * V * d                              (logits only where the loss reads them)
    attention, per token:       12 * layers * d * L                   (row of L tokens, no causal halving)

N_body: the decoder layers' linear weights (adapters included); the embedding lookup and gradient-checkpointing
recomputation are not model FLOPs. Target: >= 35% on an H100/H200-class card. Checks (exit status 1 when one
fails): losses finite, the adapters moved, the base weights did not.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gpu_host import stub_missing_faiss  # noqa: E402

stub_missing_faiss()

import torch  # noqa: E402

from benchmarks.causal_common import (build_rag, make_trainer, minilm_tokenizer, next_step_lengths,  # noqa: E402
                                      parameter_counts, question_rows, random_index, step_flops)

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# Qwen2.5-0.5B's architecture (its config.json), random weights
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, max_position_embeddings=32768)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=1024)
# dense bf16 peak, TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def card_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def qwen2(vocab: int, tiny: bool, dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    arch = dict(TINY, vocab_size=vocab) if tiny else QWEN05
    cfg = Qwen2Config(**arch, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return Qwen2ForCausalLM(cfg).to(dtype)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, MiniLM's vocabulary: a dry run")
    p.add_argument("--batch-size", type=int, default=16, help="questions per step (x K passages)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--max-source-length", type=int, default=256)
    p.add_argument("--words", type=int, default=200, help="words per passage (cut to fit the prompt)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="base weights (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu" / "causal_gpu_check.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --tiny --device cpu for a dry run)")
        return 1
    if device.type == "cpu" and not args.tiny:
        print("a ~0.5B model on CPU is not what this checks: add --tiny for a dry run")
        return 1
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (card_peak(name) if device.type == "cuda" else None)
    print(f"device: {name}, torch {torch.__version__}, peak bf16 {peak or 'unknown'} TFLOP/s", flush=True)

    tok = minilm_tokenizer()
    model = build_rag(qwen2(len(tok), args.tiny, getattr(torch, dtype)), tok, lora=LORA,
                      index=random_index(512, 64, args.words), max_source_length=args.max_source_length,
                      dtype=dtype, gradient_checkpointing=args.gradient_checkpointing, device=device)
    trainer = make_trainer(model, question_rows(1024), k=args.k, batch_size=args.batch_size, lr=2e-4,
                           autocast="cuda" if device.type == "cuda" else None)
    counts = parameter_counts(model)
    cfg = model.generator._base().config
    named = dict(model.generator.named_parameters())
    watch_base = next(n for n in named if "layers.0." in n and "q_proj.base_layer.weight" in n)
    before = {n: named[n].detach().clone() for n in (watch_base,) + tuple(n for n in named if "lora_B" in n)[:4]}
    print(f"parameters: {counts['total'] / 1e6:.1f}M ({counts['body'] / 1e6:.1f}M in the decoder layers), "
          f"trainable (LoRA) {counts['trainable'] / 1e6:.2f}M; base {dtype}", flush=True)

    times, losses, tokens, flops, padded = [], [], [], [], []
    for i in range(args.warmup + args.steps):
        lengths, answers = next_step_lengths(trainer, args.k)
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t = time.perf_counter()
        metrics = trainer.step()
        _sync(device)
        elapsed = time.perf_counter() - t
        losses.append(metrics["loss"])
        if i < args.warmup:
            continue
        times.append(elapsed)
        tokens.append(sum(lengths))
        padded.append(len(lengths) * max(lengths))
        flops.append(step_flops(counts, lengths, answers, cfg.num_hidden_layers, cfg.hidden_size,
                                full_finetune=False))
    total_time = sum(times)
    tokens_per_s = sum(tokens) / total_time
    achieved = sum(flops) / total_time
    mfu = achieved / (peak * 1e12) if peak else None
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    named = dict(model.generator.named_parameters())
    checks = {"losses_finite": all(math.isfinite(x) for x in losses),
              "adapters_moved": any(not torch.equal(v, named[n]) for n, v in before.items() if "lora_B" in n),
              "base_unchanged": torch.equal(before[watch_base], named[watch_base])}
    result = {
        "device": name, "torch": torch.__version__, "tiny": args.tiny,
        "model": {"family": "qwen2", **{k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size",
                                                                      "num_hidden_layers", "num_attention_heads",
                                                                      "num_key_value_heads", "vocab_size")},
                  "dtype": dtype, "weights": "random (from config)", "parameters": counts},
        "lora": LORA, "estimator": "rag-sequence", "k": args.k, "batch_size": args.batch_size,
        "max_source_length": args.max_source_length, "autocast": "bf16" if device.type == "cuda" else None,
        "gradient_checkpointing": args.gradient_checkpointing, "warmup_steps": args.warmup, "steps": args.steps,
        "step_ms_median": 1000 * statistics.median(times), "tokens_per_step_mean": statistics.mean(tokens),
        "padding_fraction": 1 - sum(tokens) / sum(padded),
        "tokens_per_s": tokens_per_s, "model_tflops_per_s": achieved / 1e12, "peak_bf16_tflops": peak,
        "mfu": mfu, "mfu_target": 0.35, "peak_memory_bytes": peak_mem,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": losses, "checks": checks,
        "flops_formula": "per real token 4*(N_body - N_lora) + 6*N_lora; per answer position 4*V*d (lm_head); "
                         "attention 12*layers*d*L per token of a row of L tokens; MFU = FLOPs / step time / peak",
        "command": "python benchmarks/causal_gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"step {result['step_ms_median']:.0f} ms (median of {args.steps}), {result['tokens_per_step_mean']:.0f} "
          f"real tokens/step ({100 * result['padding_fraction']:.0f}% padding), {tokens_per_s:,.0f} tokens/s, "
          f"{achieved / 1e12:.2f} model TFLOP/s")
    print(f"MFU {100 * mfu:.1f}% of {peak} TFLOP/s (target 35%)" if mfu is not None else
          "MFU: no peak for this device (pass --peak-tflops)")
    print(f"peak memory {peak_mem / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)" if peak_mem is not None else
          f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB (CPU)")
    failed = [k for k, ok in checks.items() if not ok]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
