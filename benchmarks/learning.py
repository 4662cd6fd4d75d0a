"""Does training learn? One run per estimator from the same start on the built-in synthetic knowledge base,
answers only (gold passage ids are used for recall, never for training). Prints a table, writes JSON.

    .venv/bin/python benchmarks/learning.py --estimators rag-sequence rag-token --steps 400
    .venv/bin/python benchmarks/learning.py --seed 1 --templates alt     # unseen wording and entities

Runs in one process without Ray (the training step is the same `pipeline.training.RagTrainer` the Ray job runs),
so the figures are about learning, not about Ray's fixed costs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import synthetic_index  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.estimators import build_estimator  # noqa: E402
from pipeline.evaluation import evaluate  # noqa: E402
from pipeline.models.generator import build_generator  # noqa: E402
from pipeline.models.retriever import TextEncoder  # noqa: E402
from pipeline.rag import RagModel  # noqa: E402
from pipeline.synthetic import generate_knowledge_base  # noqa: E402
from pipeline.training import RagTrainer, seed_everything  # noqa: E402

KEYS = ("em", "f1", "recall@1", "recall@5")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--estimators", nargs="+", default=["rag-sequence", "rag-token"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="knowledge-base seed")
    p.add_argument("--templates", default="default", help="default | alt")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-eval", type=int, default=320, help="test questions per evaluation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="benchmarks/results/learning.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(args.config, args.set)
    steps = args.steps or cfg.train.max_steps
    cfg.train.max_steps = steps
    kb = generate_knowledge_base(seed=args.seed, num_entities=cfg.data.synthetic_entities,
                                 template_set=args.templates)
    encoder = TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length)
    index = synthetic_index(kb, encoder, args.seed, args.templates)
    test = kb.test[:args.max_eval]
    answers = [a for r in kb.train for a in r["answers"]]
    results = {}
    for name in args.estimators:
        seed_everything(cfg.train.seed)
        model = RagModel(TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length),
                         build_generator(cfg.generator, answers), index, tau=cfg.retriever.tau)
        curve = []
        start, _ = evaluate(model, test, k=cfg.eval.k, estimator=name)
        curve.append({"step": 0, **{k: start[k] for k in KEYS}})
        print(f"{name:>14} step    0  " + "  ".join(f"{k} {start[k]:.3f}" for k in KEYS), flush=True)
        trainer = RagTrainer(model, build_estimator(name, k=cfg.train.k, cfg=cfg.estimator), kb.train, cfg.train,
                             cfg.retriever.lr,
                             cfg.generator.lr)
        t0 = time.time()
        while trainer.step_num < steps:
            trainer.step()
            if trainer.step_num % args.eval_every == 0 or trainer.step_num == steps:
                m, _ = evaluate(model, test, k=cfg.eval.k, estimator=name)
                curve.append({"step": trainer.step_num, **{k: m[k] for k in KEYS}})
                print(f"{name:>14} step {trainer.step_num:4d}  " + "  ".join(f"{k} {m[k]:.3f}" for k in KEYS)
                      + f"  ({(time.time() - t0) / trainer.step_num:.2f} s/step)", flush=True)
        results[name] = {"start": curve[0], "end": curve[-1], "best_recall@1": max(c["recall@1"] for c in curve),
                         "curve": curve, "s_per_step": (time.time() - t0) / steps}
    print()
    print(f"{'estimator':<14} | " + " | ".join(f"{k} start -> end" for k in KEYS))
    for name, r in results.items():
        print(f"{name:<14} | " + " | ".join(f"{r['start'][k]:.3f} -> {r['end'][k]:.3f}" for k in KEYS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kb_seed": args.seed, "templates": args.templates, "steps": steps,
                               "config": cfg.to_dict(), "results": results}, indent=2))
    print(f"\nJSON -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
