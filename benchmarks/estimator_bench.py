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

`--truth` (issue 22) measures every estimator against the exact gradient over the whole knowledge base instead:

    latentrag bench estimator --truth                  # default and alt KB: 24 min wall, 13.5 CPU-min, 1 thread
    .venv/bin/python benchmarks/estimator_bench.py --truth --kbs default --truth-steps 60 --truth-states 0 20 40 60

For the same model states (the start and checkpoints of a real rag-sequence training run of `--truth-steps` steps
through pipeline.recipe.TrainRecipe, taken at `--truth-states`) and one fixed batch of `--batch` training questions,
the `exact` estimator gives the truth: -log p(y|x) and its gradient over every passage. Each estimator then runs
`--repeats` times (twice when it is deterministic: its variance is 0) at equal compute, K generator rows per example
(jsa n = K proposals, dro n = K lists, sampled vrag S = K samples; the table shows the rows each really scored), and
for the retriever (prior query encoder) and the generator gradients it reports against the exact gradient g*:
cos(E g, g*), the relative error of the mean ||E g - g*|| / ||g*|| (it includes the Monte-Carlo error of the mean,
sqrt(rel. var / repeats)), the relative variance tr Cov[g] / ||g*||^2, and the loss against the exact -log p(y|x).
rag-sequence also runs at every K of `--k-sweep` (the truncation bias as a function of K). The posterior encoder of
vrag and jsa is, at every state, a copy of that state's prior encoder (what such a run starts from).
Writes OUT_DIR/truth.json, truth.md and truth_<kb>.png (bias vs variance per estimator, one point per state).
"""
from __future__ import annotations

import argparse
import copy
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
from pipeline.recipe import Events, TrainRecipe  # noqa: E402
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


# ------------------------------------------------------------------------------------------------ --truth
TRUTH_RUNS = ["rag-sequence", "rag-token", "vrag", "vrag-sampled", "jsa", "dro", "pdist", "emdr2", "replug-lsr"]
STOCHASTIC = {"vrag-sampled", "jsa", "dro"}


def truth_runs(names: list[str], k: int, k_sweep: list[int]) -> list[tuple[str, str, dict, int]]:
    """(label, estimator, estimator overrides, K) at equal compute (K generator rows per example), then rag-sequence
    at the other K of the sweep."""
    over = {"vrag-sampled": ("vrag", {"vrag_mode": "sampled", "vrag_num_samples": k}),
            "jsa": ("jsa", {"jsa_num_proposals": k, "jsa_cache": False}), "dro": ("dro", {"dro_num_lists": k})}
    runs = [(label, *over.get(label, (label, {})), k) for label in names]
    runs += [(f"rag-sequence K={kk}", "rag-sequence", {}, kk) for kk in k_sweep if kk != k]
    return runs


class GradStats:
    """Streaming mean and tr Cov of gradient vectors (a retriever gradient has ~22M entries: no stack of repeats)."""

    def __init__(self):
        self.n, self.total, self.sq = 0, None, 0.0

    def add(self, g: torch.Tensor) -> None:
        self.n += 1
        self.total = g.clone() if self.total is None else self.total.add_(g)
        self.sq += float(g.pow(2).sum())

    def against(self, exact: torch.Tensor) -> dict:
        mean = self.total / self.n
        e2 = float(exact.pow(2).sum())
        trace = max(self.sq - self.n * float(mean.pow(2).sum()), 0.0) / (self.n - 1) if self.n > 1 else 0.0
        err2 = float((mean - exact).pow(2).sum())
        denom = float(mean.norm() * exact.norm())
        return {"cos": float(mean @ exact) / denom if denom > 0 else float("nan"),
                "rel_err_mean": (err2 / e2) ** 0.5, "rel_var": trace / e2,
                # the part of the error of the mean that Monte-Carlo noise does not explain (squared bias, relative)
                "rel_bias": max(err2 - trace / self.n, 0.0) ** 0.5 / e2 ** 0.5,
                "mc_error_of_mean": (trace / self.n / e2) ** 0.5, "exact_norm": e2 ** 0.5, "repeats": self.n}


def one_gradient(model, est, questions, answers, rows, seed: int, params: dict) -> tuple[float, dict, dict]:
    """(loss, {module: gradient vector}, diagnostics) of one loss + backward."""
    model.zero_grad(set_to_none=True)
    if hasattr(est, "cache"):
        est.cache.clear()
    torch.manual_seed(seed)
    out = est.loss(model, questions, answers, rows=rows) if est.needs_rows else est.loss(model, questions, answers)
    out.loss.backward()
    return float(out.loss.detach()), {m: grad_vector(ps) for m, ps in params.items()}, out.diagnostics


def measure_state(model, cfg, batch: list[dict], runs, repeats: int) -> dict:
    """Every run of `runs` against the exact gradient, for the model's current weights."""
    questions, answers = [r["question"] for r in batch], [r["answers"][0] for r in batch]
    model.eval()
    model.posterior_encoder = copy.deepcopy(model.query_encoder)      # q starts as this state's prior
    params = {"retriever": list(model.query_encoder.parameters()), "generator": list(model.generator.parameters())}
    t = time.perf_counter()
    exact = build_estimator("exact", k=cfg.train.k, cfg=cfg.estimator)
    exact_loss, exact_grads, exact_diag = one_gradient(model, exact, questions, answers, batch, 0, params)
    state = {"exact": {"loss": exact_loss, **exact_diag, "seconds": time.perf_counter() - t,
                       **{f"{m}_norm": float(g.norm()) for m, g in exact_grads.items()}}, "runs": {}}
    print(f"    exact: -log p(y|x) {exact_loss:.3f}, posterior entropy {exact_diag['posterior_entropy']:.3f} nats, "
          f"posterior mass in the prior top-{cfg.train.k} {exact_diag['posterior_mass_in_prior_topk']:.3f} "
          f"({state['exact']['seconds']:.0f} s)", flush=True)
    counter = CountingGenerator(model)
    for label, name, over, k in runs:
        est = build_estimator(name, k=k, cfg=type(cfg.estimator)(**{**cfg.estimator.__dict__, **over}))
        stats, losses, rows_seen = {m: GradStats() for m in params}, [], []
        t = time.perf_counter()
        for rep in range(repeats if label in STOCHASTIC else 2):
            counter.rows = 0
            loss, grads, _ = one_gradient(model, est, questions, answers, batch, 1000 + rep, params)
            for m, g in grads.items():
                stats[m].add(g)
            losses.append(loss)
            rows_seen.append(counter.rows / len(questions))
        r = state["runs"][label] = {
            "estimator": name, "overrides": over, "k": k, "gen_rows_per_example": statistics.mean(rows_seen),
            "loss_mean": statistics.mean(losses), "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "loss_minus_exact": statistics.mean(losses) - exact_loss, "seconds": time.perf_counter() - t,
            **{m: stats[m].against(exact_grads[m]) for m in params}}
        print(f"    {label:>20}: rows/ex {r['gen_rows_per_example']:5.1f}  retriever cos {r['retriever']['cos']:.3f} "
              f"err {r['retriever']['rel_err_mean']:.3f} var {r['retriever']['rel_var']:.3g}  generator cos "
              f"{r['generator']['cos']:.3f} err {r['generator']['rel_err_mean']:.3f} var "
              f"{r['generator']['rel_var']:.3g}  loss-exact {r['loss_minus_exact']:+.3f}", flush=True)
    model.pair_logprobs = counter._orig
    return state


class Snapshots(Events):
    """TrainRecipe events: keep the prior encoder's and the generator's weights at the chosen steps."""

    def __init__(self, steps: list[int]):
        self.steps, self.states, self.t0 = set(steps), {}, time.time()

    def take(self, recipe) -> None:
        m = recipe.model
        self.states[recipe.step] = {"query_encoder": copy.deepcopy(m.query_encoder.state_dict()),
                                    "generator": copy.deepcopy(m.generator.state_dict())}

    def after_step(self, recipe, metrics):
        if recipe.step in self.steps:
            self.take(recipe)

    def log(self, recipe, step, metrics):
        print(f"    train step {step}: loss {metrics['loss_mean']:.3f} ({(time.time() - self.t0) / step:.2f} s/step)",
              flush=True)



def truth_kb(kb_name: str, args) -> dict:
    cfg = load_config(args.config, [f"train.max_steps={args.truth_steps}", f"train.batch_size={args.train_batch}",
                                    f"train.k={args.k}", f"train.torch_threads={args.threads}", "train.log_every=20",
                                    "train.checkpoint_every=0", "train.estimator=rag-sequence"])
    kb = generate_knowledge_base(seed=0, num_entities=cfg.data.synthetic_entities, template_set=kb_name)
    encoder = TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length)
    index = synthetic_index(kb, encoder, 0, kb_name)
    print(f"== {kb_name} KB: {len(kb.passages)} passages; rag-sequence training {args.truth_steps} steps, batch "
          f"{args.train_batch}; states at steps {args.truth_states}; {args.batch} questions", flush=True)
    events = Snapshots(args.truth_states)
    recipe = TrainRecipe(cfg, kb.train, events=events).setup(index)
    if 0 in events.steps:
        events.take(recipe)
    t = time.time()
    recipe.train()
    train_seconds = time.time() - t
    model, batch = recipe.model, kb.train[:args.batch]
    runs = truth_runs(args.estimators, args.k, args.k_sweep)
    states = {}
    for step in sorted(events.states):
        print(f"  state at step {step}", flush=True)
        model.query_encoder.load_state_dict(events.states[step]["query_encoder"])
        model.generator.load_state_dict(events.states[step]["generator"])
        states[step] = measure_state(model, cfg, batch, runs, args.repeats)
    return {"kb": kb_name, "num_passages": len(kb.passages), "train_steps": args.truth_steps,
            "train_batch": args.train_batch, "train_seconds": train_seconds, "questions": [r["question"] for r in batch],
            "k": args.k, "states": states}


def truth_markdown(results: dict) -> str:
    lines = ["# Estimators against the exact gradient over the whole knowledge base", "",
             f"{results['batch']} training questions, K = {results['k']}, {results['repeats']} repeats per stochastic "
             "estimator (2 per deterministic one). cos: cosine of the mean gradient to the exact one; err: "
             "||E g - g*|| / ||g*||; var: tr Cov[g] / ||g*||^2; loss - exact: the estimator's loss minus the exact "
             "-log p(y|x) (nats). Command: `latentrag bench estimator --truth` (see benchmarks/estimator_bench.py).",
             ""]
    for kb in results["kbs"].values():
        lines += [f"## {kb['kb']} KB ({kb['num_passages']} passages; states of a {kb['train_steps']}-step rag-sequence "
                  f"run, batch {kb['train_batch']})", ""]
        for step, st in kb["states"].items():
            ex = st["exact"]
            lines += [f"### step {step}: -log p(y|x) {ex['loss']:.3f}, posterior entropy {ex['posterior_entropy']:.3f} "
                      f"nats, prior entropy {ex['prior_entropy']:.3f}, posterior mass in the prior top-{kb['k']} "
                      f"{ex['posterior_mass_in_prior_topk']:.3f}", "",
                      "| estimator | gen rows/ex | ret cos | ret err | ret var | gen cos | gen err | gen var | "
                      "loss - exact |", "|---|---|---|---|---|---|---|---|---|"]
            for label, r in st["runs"].items():
                lines.append(f"| {label} | {r['gen_rows_per_example']:.1f} | {r['retriever']['cos']:.3f} | "
                             f"{r['retriever']['rel_err_mean']:.3f} | {r['retriever']['rel_var']:.3g} | "
                             f"{r['generator']['cos']:.3f} | {r['generator']['rel_err_mean']:.3f} | "
                             f"{r['generator']['rel_var']:.3g} | {r['loss_minus_exact']:+.3f} |")
            lines.append("")
    return "\n".join(lines)


def truth_plot(kb: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(kb["states"])
    labels = [lb for lb in next(iter(kb["states"].values()))["runs"] if "K=" not in lb]
    floor = 1e-4                                        # deterministic estimators (variance 0) are drawn here
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, module in zip(axes[:2], ("retriever", "generator")):
        for label in labels:
            xs = [kb["states"][s]["runs"][label][module]["rel_err_mean"] for s in steps]
            ys = [max(kb["states"][s]["runs"][label][module]["rel_var"], floor) for s in steps]
            line, = ax.plot(xs, ys, marker="o", alpha=0.8, label=label)
            for s, x, y in zip(steps, xs, ys):
                ax.annotate(str(s), (x, y), fontsize=7, color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(floor, color="gray", linewidth=0.5)
        ax.set_xlabel("relative error of the mean gradient ||E g - g*|| / ||g*|| (bias)")
        ax.set_ylabel(f"tr Cov[g] / ||g*||^2 (variance; {floor:g} = zero)")
        ax.set_title(f"{module} gradient (labels: training step)")
    axes[0].legend(fontsize=8)
    ax = axes[2]
    sweep = sorted({r["k"] for st in kb["states"].values() for lb, r in st["runs"].items()
                    if r["estimator"] == "rag-sequence" and (lb == "rag-sequence" or "K=" in lb)})
    for s in steps:
        runs = kb["states"][s]["runs"]
        by_k = {r["k"]: r for lb, r in runs.items() if r["estimator"] == "rag-sequence" and (lb == "rag-sequence" or "K=" in lb)}
        ax.plot(sweep, [by_k[k]["retriever"]["rel_err_mean"] for k in sweep], marker="o", label=f"step {s} retriever")
        ax.plot(sweep, [by_k[k]["generator"]["rel_err_mean"] for k in sweep], marker="x", linestyle="--",
                label=f"step {s} generator")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (rag-sequence top-K)")
    ax.set_ylabel("relative error of the gradient")
    ax.set_title("top-K truncation bias")
    ax.legend(fontsize=7)
    fig.suptitle(f"{kb['kb']} KB ({kb['num_passages']} passages): estimators against the exact gradient")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def truth_main(args) -> int:
    if args.repeats < 2:
        raise SystemExit("--repeats: at least 2 (a variance needs two estimates)")
    states = sorted(set(args.truth_states))
    if any(s < 0 or s > args.truth_steps for s in states):
        raise SystemExit(f"--truth-states {states}: each between 0 and --truth-steps {args.truth_steps}")
    args.truth_states = states
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"batch": args.batch, "k": args.k, "repeats": args.repeats, "threads": args.threads,
               "k_sweep": args.k_sweep, "estimators": args.estimators, "kbs": {}}
    t = time.time()
    for kb_name in args.kbs:
        kb = results["kbs"][kb_name] = truth_kb(kb_name, args)
        kb["plot"] = str(truth_plot(kb, out_dir / f"truth_{kb_name}.png"))
        (out_dir / "truth.json").write_text(json.dumps(results, indent=2))          # after each KB: partial results
    results["seconds"] = time.time() - t
    results["load_average"] = os.getloadavg()
    table = truth_markdown(results)
    print("\n" + table)
    (out_dir / "truth.md").write_text(table + "\n")
    (out_dir / "truth.json").write_text(json.dumps(results, indent=2))
    print(f"-> {out_dir}/truth.md, truth.json, truth_<kb>.png ({results['seconds'] / 60:.1f} min)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--estimators", nargs="+", default=DEFAULT)
    p.add_argument("--batch", type=int, default=None, help="questions in the fixed batch (default 8; --truth: 4)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=None, help="estimates per estimator (default 8; --truth: 12)")
    p.add_argument("--jsa-default-proposals", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --truth: 1)")
    p.add_argument("--train-steps", type=int, default=8, help="timed whole training steps (rag-sequence vs jsa)")
    p.add_argument("--out", default="benchmarks/results/estimator_bench.json")
    t = p.add_argument_group("--truth: every estimator against the exact gradient over the whole knowledge base")
    t.add_argument("--truth", action="store_true", help="measure bias and variance against the exact gradient")
    t.add_argument("--kbs", nargs="+", default=["default", "alt"], choices=["default", "alt"],
                   help="synthetic knowledge bases (template sets) to measure")
    t.add_argument("--truth-steps", type=int, default=200, help="steps of the rag-sequence run that makes the states")
    t.add_argument("--truth-states", nargs="+", type=int, default=[0, 50, 100, 200], help="steps measured")
    t.add_argument("--train-batch", type=int, default=8, help="batch size of that training run")
    t.add_argument("--k-sweep", nargs="+", type=int, default=[1, 2, 5, 10, 20, 50, 100, 200], help="rag-sequence K values")
    t.add_argument("--out-dir", default="benchmarks/results/estimator_truth")
    args = p.parse_args(argv)
    if args.truth:
        if args.estimators == DEFAULT:
            args.estimators = TRUTH_RUNS
        args.batch, args.repeats, args.threads = args.batch or 4, args.repeats or 12, args.threads or 1
        return truth_main(args)
    args.batch, args.repeats, args.threads = args.batch or 8, args.repeats or 8, args.threads or 2
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
