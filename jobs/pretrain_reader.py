"""Pre-train the embedded copy-bart generator to read, and write the weights the package ships as `reader`.

    latentrag pretrain-reader                                   # reproduces pipeline/assets/reader (~3 min, one core)
    latentrag pretrain-reader --steps 300 --out /tmp/reader     # a quick look

The task: (question, gold passage) -> answer, on synthetic knowledge bases generated with *other* seeds than any the
project evaluates on (default 100-104; the demo uses seed 0, the held-out check seed 1), worded with the "reading"
templates only (pipeline/synthetic.py), disjoint from the "default" and "alt" ones: the demo's and the held-out
knowledge bases are both unseen wording for it. A generator from scratch needs hundreds of joint steps
before p(y | x, z) says anything about z; this one reads from the first step, so the demo's budget goes to the
retriever and to the new knowledge base. It stays a generator (answers are decoded token by token), and
`generator.init: random` trains one from scratch as before.

Written: OUT/model.safetensors (float16), OUT/generator.json (architecture; tokenizer "minilm", the embedded one),
OUT/pretrain.json (arguments, held-out EM per evaluation, seconds). Held-out EM is greedy decoding with the gold
passage on a knowledge base of seed --eval-seed, for both template sets.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch, transformers and the pipeline are imported inside the functions: after the variables above, which
# transformers and tokenizers read when first imported

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "reader"


def _examples(kb) -> list[tuple[str, str, str]]:
    text = {p["id"]: p["text"] for p in kb.passages}
    return [(q["question"], text[q["gold_passage_ids"][0]], q["answers"][0]) for q in kb.questions]


def greedy_em(gen, rows: list[tuple[str, str, str]], batch_size: int = 64) -> float:
    """Exact match of greedy decoding given the gold passage."""
    import torch

    from pipeline.decoding import beam_search
    from pipeline.metrics import exact_match

    gen.eval()
    hits = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            state = gen.start_decoding(gen.encode_inputs([q for q, _, _ in chunk], [p for _, p, _ in chunk]))
            beams = beam_search(lambda prefix, state=state: gen.decode_step(state, prefix), len(chunk), gen.start_token_id,
                                gen.eos_token_id, gen.tokenizer.pad_token_id, 1, gen.max_target_length)
            hits += sum(exact_match(gen.decode(b[0][0]), a) for b, (_, _, a) in zip(beams, chunk))
    gen.train()
    return hits / max(1, len(rows))


def save_reader(gen, out: Path) -> None:
    """float16 weights (tied embeddings once) and the architecture; the tokenizer is the package's MiniLM one."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(gen.unique_state(torch.float16), str(tmp))
    os.chmod(tmp, 0o644)                              # safetensors writes 0600; the package ships it readable
    os.replace(tmp, out / "model.safetensors")
    hparams = {**gen.hparams, "output_token_ids": None, "tokenizer": gen.tokenizer_name}
    (out / "generator.json").write_text(json.dumps({"kind": "copy-bart", **hparams}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latentrag pretrain-reader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: the shipped asset)")
    p.add_argument("--kb-seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    p.add_argument("--entities", type=int, default=400, help="entities per knowledge base")
    p.add_argument("--eval-seed", type=int, default=99)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-questions", type=int, default=400)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a busy 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")

    import torch

    from pipeline.config import GeneratorConfig
    from pipeline.models.generator import build_generator
    from pipeline.synthetic import generate_knowledge_base

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = [ex for s in args.kb_seeds
             for ex in _examples(generate_knowledge_base(seed=s, num_entities=args.entities, template_set="reading"))]
    held_out = {t: _examples(generate_knowledge_base(seed=args.eval_seed, num_entities=100, template_set=t))
                [:args.eval_questions] for t in ("default", "alt")}
    print(f"pretrain-reader: {len(train)} (question, gold passage, answer) examples from kb seeds {args.kb_seeds}; "
          f"held-out kb seed {args.eval_seed}", flush=True)

    # The vocabulary head is tied to the input embeddings, so the weights fit any knowledge base: a run that loads
    # them points the head at its own answers' tokens (CopyBart.set_output_tokens).
    gen = build_generator(GeneratorConfig(init="random", dropout=args.dropout), [a for _, _, a in train])
    opt = torch.optim.AdamW(gen.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.0, 1 - s / args.steps))
    history, start, seen = [], time.time(), 0
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch_size)
        inputs = gen.encode_inputs([q for q, _, _ in batch], [p_ for _, p_, _ in batch])
        labels, _ = gen.encode_targets([a for _, _, a in batch])
        loss = -gen.token_logprobs(inputs, labels).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += len(batch)
        if step % args.eval_every == 0 or step == args.steps:
            em = {t: round(greedy_em(gen, rows), 3) for t, rows in held_out.items()}
            history.append({"step": step, "loss": round(loss.item(), 3), "em": em,
                            "seconds": round(time.time() - start, 1)})
            print(f"  step {step:5d}  loss {loss.item():7.3f}  held-out EM default {em['default']:.3f} "
                  f"alt {em['alt']:.3f}  ({time.time() - start:.0f} s)", flush=True)
    save_reader(gen, args.out)
    (args.out / "pretrain.json").write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "examples": len(train), "examples_seen": seen, "history": history,
        "seconds": round(time.time() - start, 1)}, indent=2) + "\n")
    print(f"wrote {args.out} ({(args.out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
