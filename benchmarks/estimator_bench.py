"""Estimator benchmark: step time and gradient variance per estimator on one fixed batch.

    .venv/bin/python benchmarks/estimator_bench.py --batch 8 --k 5 --repeats 8

Every estimator starts from the same weights and sees the same batch of synthetic-KB questions. Each repeat is
one loss + backward (model in eval mode, so dropout adds no noise: the spread comes from the estimator's own
sampling). Equal budget of generator forward passes: K rows per example for the top-K estimators, n = K lists for
dro, n = K proposals for jsa (its no-grad scoring pass sees <= K distinct rows, its gradient pass the distinct
accepted states; both are counted and reported as gen_rows/ex). jsa at its default n = 20 is timed too, against
rag-sequence at the same K (design target: <= 1.6x).

Gradient variance: tr Cov[g] over the repeats, and the same divided by ||E g||^2 (relative), for the retriever (prior
query encoder) and the generator. Deterministic estimators have zero variance. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import synthetic_index  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.estimators import build_estimator  # noqa: E402
from pipeline.models.generator import build_generator  # noqa: E402
from pipeline.models.retriever import TextEncoder  # noqa: E402
from pipeline.rag import RagModel  # noqa: E402
from pipeline.synthetic import generate_knowledge_base  # noqa: E402
from pipeline.training import RagTrainer, seed_everything  # noqa: E402

DEFAULT = ["rag-sequence", "rag-token", "vrag", "jsa", "dro", "pdist", "emdr2", "replug-lsr"]


class CountingGenerator:
    """Counts generator rows through RagModel.pair_logprobs (every estimator goes through it)."""

    def __init__(self, model):
        self.model, self.rows = model, 0
        self._orig = model.pair_logprobs

        def counted(questions, passages, answers):
            self.rows += len(questions)
            return self._orig(questions, passages, answers)

        model.pair_logprobs = counted


def grad_vector(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                      for p in params])


def variance_stats(grads: list[torch.Tensor]) -> dict:
    g = torch.stack(grads)
    mean = g.mean(0)
    trace = float(g.var(0, unbiased=True).sum()) if len(grads) > 1 else 0.0
    norm2 = float(mean.pow(2).sum())
    return {"trace_var": trace, "mean_norm2": norm2, "relative_var": trace / norm2 if norm2 > 0 else float("nan")}


def measure_estimator(model, est, batch: list[dict], repeats: int) -> dict:
    """Step time and gradient variance of `repeats` independent loss + backward passes on one fixed batch (model in
    eval mode: dropout adds no noise, the spread is the estimator's own sampling); the first pass is a warm-up."""
    questions, answers = [r["question"] for r in batch], [r["answers"][0] for r in batch]
    est.prepare(model)
    model.eval()
    counter = CountingGenerator(model)
    ret_params = list(model.query_encoder.parameters())
    gen_params = list(model.generator.parameters())
    times, ret_grads, gen_grads, diags = [], [], [], []
    for rep in range(repeats + 1):
        if hasattr(est, "cache"):
            est.cache.clear()                            # independent estimates, not one Markov chain
        model.zero_grad(set_to_none=True)
        counter.rows = 0
        torch.manual_seed(1000 + rep)
        t = time.perf_counter()
        out = est.loss(model, questions, answers, rows=batch) if est.needs_rows else \
            est.loss(model, questions, answers)
        out.loss.backward()
        elapsed = time.perf_counter() - t
        if rep == 0:
            continue
        times.append(elapsed)
        ret_grads.append(grad_vector(ret_params))
        gen_grads.append(grad_vector(gen_params))
        diags.append({**out.diagnostics, "gen_rows_per_example": counter.rows / len(questions)})
    return {"step_seconds_median": statistics.median(times), "step_seconds": times,
            "retriever_grad": variance_stats(ret_grads), "generator_grad": variance_stats(gen_grads),
            "diagnostics": {k: statistics.mean(d[k] for d in diags) for k in diags[0]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--estimators", nargs="+", default=DEFAULT)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--jsa-default-proposals", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=8, help="timed whole training steps (rag-sequence vs jsa)")
    p.add_argument("--out", default="benchmarks/results/estimator_bench.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    kb = generate_knowledge_base(seed=0, num_entities=cfg.data.synthetic_entities)
    encoder = TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length)
    index = synthetic_index(kb, encoder, 0, "default")
    batch = kb.train[:args.batch]
    train_answers = [a for r in kb.train for a in r["answers"]]

    runs = [(name, name, {}) for name in args.estimators]
    for i, (_, name, _) in enumerate(runs):
        if name == "jsa":
            runs[i] = ("jsa (n=K)", "jsa", {"jsa_num_proposals": args.k})
        if name == "dro":
            runs[i] = ("dro (n=K)", "dro", {"dro_num_lists": args.k})
    if "jsa" in args.estimators:
        runs.append((f"jsa (n={args.jsa_default_proposals})", "jsa",
                     {"jsa_num_proposals": args.jsa_default_proposals}))

    results = {}
    for label, name, over in runs:
        seed_everything(0)
        model = RagModel(TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length),
                         build_generator(cfg.generator, train_answers), index, tau=cfg.retriever.tau)
        ecfg = type(cfg.estimator)(**{**cfg.estimator.__dict__, **over})
        est = build_estimator(name, k=args.k, cfg=ecfg)
        r = results[label] = {"estimator": name, "overrides": over, "k": args.k,
                              **measure_estimator(model, est, batch, args.repeats)}
        mean_diag = r["diagnostics"]
        print(f"{label:>16}: {r['step_seconds_median'] * 1000:7.0f} ms  gen_rows/ex "
              f"{mean_diag['gen_rows_per_example']:5.1f}  retriever relvar {r['retriever_grad']['relative_var']:.3g}"
              f"  generator relvar {r['generator_grad']['relative_var']:.3g}", flush=True)
        del model

    base = results.get("rag-sequence", {}).get("step_seconds_median")
    print()
    head = f"{'estimator':<16} | {'ms/step':>8} | {'x rag-seq':>9} | {'gen rows/ex':>11} | " \
           f"{'ret tr(Var)':>11} | {'ret rel var':>11} | {'gen tr(Var)':>11} | {'gen rel var':>11}"
    print(head)
    print("-" * len(head))
    for label, r in results.items():
        ratio = r["step_seconds_median"] / base if base else float("nan")
        r["ratio_to_rag_sequence"] = ratio
        print(f"{label:<16} | {r['step_seconds_median'] * 1000:8.0f} | {ratio:9.2f} | "
              f"{r['diagnostics']['gen_rows_per_example']:11.1f} | {r['retriever_grad']['trace_var']:11.3g} | "
              f"{r['retriever_grad']['relative_var']:11.3g} | {r['generator_grad']['trace_var']:11.3g} | "
              f"{r['generator_grad']['relative_var']:11.3g}")
    train_steps = {}
    if "jsa" in args.estimators and "rag-sequence" in args.estimators:
        # the design target is about whole training steps (loss, backward, clipping, optimiser) at the config's
        # batch size: rag-sequence against jsa at its default n, both at K
        for name in ("rag-sequence", "jsa"):
            seed_everything(0)
            model = RagModel(TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length),
                             build_generator(cfg.generator, train_answers), index, tau=cfg.retriever.tau)
            trainer = RagTrainer(model, build_estimator(name, k=args.k, cfg=cfg.estimator), kb.train, cfg.train,
                                 cfg.retriever.lr, cfg.generator.lr)
            times = []
            for i in range(args.train_steps + 2):                 # two warm-up steps
                m = trainer.step()
                if i >= 2:
                    times.append(m["step_seconds"])
            train_steps[name] = statistics.median(times)
        ratio = train_steps["jsa"] / train_steps["rag-sequence"]
        train_steps["jsa_over_rag_sequence"] = ratio
        print(f"\nwhole training step, batch {cfg.train.batch_size}, K={args.k}: rag-sequence "
              f"{train_steps['rag-sequence'] * 1000:.0f} ms, jsa (n={cfg.estimator.jsa_num_proposals}) "
              f"{train_steps['jsa'] * 1000:.0f} ms: {ratio:.2f}x (target <= 1.6x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": args.batch, "k": args.k, "repeats": args.repeats, "threads": args.threads,
                               "load_average": os.getloadavg(), "results": results,
                               "train_step_seconds": train_steps}, indent=2))
    print(f"\nJSON -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
