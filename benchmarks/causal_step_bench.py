"""Step time and tokens/s of a causal-generator training step, LoRA against full fine-tuning at the same sizes, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/causal_step_bench.py [--steps 8] [--warmup 2] [--threads 1]

The step is the project's own (`RagTrainer.step`): rag-sequence over the top K=5 passages of each question of a
batch, forward + backward + AdamW, the generator and a (negligible) hashed query encoder trained. The generator is a
random-weight Llama-family model built from a config (hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, the
embedded MiniLM's 30,522-token WordPiece vocabulary, untied head: 18.5M parameters), fp32. LoRA: r=16 on q/k/v/o,
alpha 32, no dropout (as configs/real_qwen_lora.yaml's attention targets). Both modes start from the same weights
and see the same batches; their steps alternate (LoRA, full, full, LoRA, ...) so that a change in the machine's load
falls on both alike, and the ratio LoRA/full comes from the one run.

tokens/s counts the real tokens (prompt + answer + EOS, no padding) of the K x batch (question, passage) rows a step
feeds the generator. Prints a table and writes benchmarks/results/causal_step_bench.json (with the machine's load
average at start and end: the figures of a shared machine are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.causal_common import (build_rag, make_trainer, minilm_tokenizer, next_step_lengths,  # noqa: E402
                                      parameter_counts, question_rows, random_index, step_flops)

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def llama(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--batch-size", type=int, default=4, help="questions per step (x K passages)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--words", type=int, default=60, help="words per passage")
    p.add_argument("--max-source-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "causal_step_bench.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    tok = minilm_tokenizer()
    index = random_index(200, 64, args.words)
    rows = question_rows(256)
    trainers, info = {}, {}
    for mode, lora in (("lora", LORA), ("full", None)):
        model = build_rag(llama(len(tok), args.hidden, args.layers), tok, lora=lora, index=index,
                          max_source_length=args.max_source_length)
        trainers[mode] = make_trainer(model, rows, k=args.k, batch_size=args.batch_size,
                                      lr=2e-4 if lora else 5e-5)
        info[mode] = parameter_counts(model)
    times = {m: [] for m in trainers}
    tokens = {m: [] for m in trainers}
    flops = {m: [] for m in trainers}
    losses = {m: [] for m in trainers}
    cfg = trainers["full"].model.generator._base().config
    for i in range(args.warmup + args.steps):
        # alternate which mode goes first, so neither always follows the other's memory traffic
        for mode, trainer in (list(trainers.items()) if i % 2 == 0 else list(trainers.items())[::-1]):
            lengths, answers = next_step_lengths(trainer, args.k)
            t = time.perf_counter()
            metrics = trainer.step()
            elapsed = time.perf_counter() - t
            losses[mode].append(metrics["loss"])
            if i < args.warmup:
                continue                      # first-call allocations and lazy initialisation
            times[mode].append(elapsed)
            tokens[mode].append(sum(lengths))
            flops[mode].append(step_flops(info[mode], lengths, answers, cfg.num_hidden_layers, cfg.hidden_size,
                                          full_finetune=mode == "full"))
    load_end = os.getloadavg()

    result = {"modes": {}}
    for mode in trainers:
        med = statistics.median(times[mode])
        tps = sum(tokens[mode]) / sum(times[mode])
        result["modes"][mode] = {
            "step_ms_median": 1000 * med, "step_ms_all": [1000 * x for x in times[mode]],
            "tokens_per_step_mean": statistics.mean(tokens[mode]), "tokens_per_s": tps,
            "model_gflops_per_s": sum(flops[mode]) / sum(times[mode]) / 1e9,
            "losses": losses[mode], "parameters": info[mode]}
    lora, full = result["modes"]["lora"], result["modes"]["full"]
    result.update({
        "lora_over_full_step_time": lora["step_ms_median"] / full["step_ms_median"],
        "lora_over_full_tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
        "model": {"family": "llama", "hidden": args.hidden, "layers": args.layers, "vocab": len(tok),
                  "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "dtype": "float32", "weights": "random (from config)"},
        "lora": LORA, "estimator": "rag-sequence", "k": args.k, "batch_size": args.batch_size,
        "max_source_length": args.max_source_length, "words_per_passage": args.words, "steps": args.steps,
        "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": load_end,
        "note": "CPU, one torch thread, on a machine shared with other jobs (see load averages): absolute times "
                "are those of a loaded machine; the LoRA/full ratio comes from alternating steps in one run.",
        "command": "OMP_NUM_THREADS=1 python benchmarks/causal_step_bench.py " + " ".join(argv or sys.argv[1:]),
    })
    print(f"causal step, rag-sequence K={args.k}, batch {args.batch_size}, Llama-family hidden {args.hidden} x "
          f"{args.layers} layers, vocab {len(tok)}, fp32, {args.threads} thread(s); load avg {load_start[0]:.1f} -> "
          f"{load_end[0]:.1f}")
    print(f"{'mode':<6} {'params':>10} {'trainable':>10} {'step ms':>9} {'tokens/step':>12} {'tokens/s':>9} "
          f"{'GFLOP/s':>8}")
    for mode, r in result["modes"].items():
        print(f"{mode:<6} {r['parameters']['total']:>10,} {r['parameters']['trainable']:>10,} "
              f"{r['step_ms_median']:>9.0f} {r['tokens_per_step_mean']:>12.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['model_gflops_per_s']:>8.2f}")
    print(f"LoRA / full: step time {result['lora_over_full_step_time']:.3f}x, tokens/s "
          f"{result['lora_over_full_tokens_per_s']:.3f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
