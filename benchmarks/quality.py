"""Estimator comparison in one command: EM, F1, recall@1/5/20 and gradient variance per estimator and strategy,
every run from the same start with the same budget (steps, K), on the synthetic knowledge base and on real data.

    .venv/bin/python benchmarks/quality.py                                   # synthetic KB, all estimators, seed 0
    .venv/bin/python benchmarks/quality.py --estimators rag-sequence jsa --steps 600 --kb-seed 1 --templates alt
    .venv/bin/python benchmarks/quality.py --datasets cmu --steps 300 --seeds 0 1
    .venv/bin/python benchmarks/quality.py --datasets cmu rag-mini --steps 2 --max-eval 20 --variance-repeats 0
    latentrag bench quality --datasets synthetic cmu --seeds 0 1 2           # the same, from a source checkout
    .venv/bin/python benchmarks/quality.py --merge jsa=/tmp/a jsa=/tmp/b rag-sequence=/tmp/c --out-dir OUT
                                            # one report from runs made in separate processes (one per core)

Writes OUT_DIR/quality.json, quality.md (the table), learning_curves_<dataset>.png, recall_<dataset>.png and
logs them with every run's metrics to MLflow (OUT_DIR/mlflow.db unless MLFLOW_TRACKING_URI is set).

Runs in one process without Ray: the training loop is the same `pipeline.recipe.TrainRecipe` the Ray job runs, so
the figures are about learning, not Ray's fixed costs. Answers-only training for every estimator (gold passage ids
are read only for recall) except the `independent` strategy, which by definition trains on them (marked in the
table). Zero-training rows: BM25 retrieval (bm25s), the majority answer (the most frequent training answer for every
test question), the untrained reader on BM25's top-K, and the frozen MiniLM retriever with the untrained reader
(every run's start). F1 is split by answer type: yes/no and the others.
Datasets: synthetic (built in); cmu and rag-mini (../shared/data: development data that is not in the repository;
the benchmark stops with a clear error when it is absent). rag-mini-wikipedia holds out articles like cmu_qa_wiki.
Gradient variance: tr Cov[g] / ||E g||^2 of the retriever and generator gradients over repeated estimates on one
fixed batch at the start (benchmarks/estimator_bench.py measures the same at an equal generator budget).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import cached_index  # noqa: E402
from benchmarks.estimator_bench import measure_estimator  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data import GoldPassages  # noqa: E402
from pipeline.estimators import build_estimator  # noqa: E402
from pipeline.evaluation import evaluate  # noqa: E402
from pipeline.metrics import exact_match, f1_by_answer_type, f1_score, normalize_answer, recall_at_k  # noqa: E402
from pipeline.models.assembly import build_model  # noqa: E402
from pipeline.models.retriever import TextEncoder  # noqa: E402
from pipeline.recipe import Events, TrainRecipe  # noqa: E402
from pipeline.synthetic import generate_knowledge_base  # noqa: E402
from pipeline.training import seed_everything  # noqa: E402

KEYS = ("em", "f1", "recall@1", "recall@5", "recall@20", "f1_yes_no", "f1_other")
RUNS = {  # label -> (estimator, strategy, config overrides of that run)
    "rag-sequence": ("rag-sequence", "joint", []), "rag-token": ("rag-token", "joint", []),
    "vrag": ("vrag", "joint", []), "jsa": ("jsa", "joint", []), "dro": ("dro", "joint", []),
    "pdist": ("pdist", "joint", []), "emdr2": ("emdr2", "joint", []), "replug-lsr": ("replug-lsr", "joint", []),
    "two-phase": ("rag-sequence", "two-phase", []), "independent": ("rag-sequence", "independent", []),
    # settings whose default is chosen by measurement
    "vrag-union": ("vrag", "joint", ["estimator.vrag_candidates=union"]),
    "rag-sequence-anchor": ("rag-sequence", "joint", ["train.retriever_anchor_kl=1.0"]),
    "vrag-anchor": ("vrag", "joint", ["train.retriever_anchor_kl=1.0"]),
    "rag-sequence-warmup": ("rag-sequence", "joint", ["train.generator_warmup_steps=100"]),
    "jsa-flat0.5": ("jsa", "joint", ["estimator.jsa_flat_nats=0.5"]),
}
DEFAULT_RUNS = ["rag-sequence", "rag-token", "vrag", "jsa", "dro", "two-phase", "independent"]
CONFIGS = {"synthetic": "configs/demo.yaml", "cmu": "configs/cmu_qa_wiki.yaml",
           "rag-mini": "configs/cmu_qa_wiki.yaml"}        # rag-mini is the S08 part of cmu_qa_wiki: same settings
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class DatasetMissing(Exception):
    """A dataset of --datasets whose files are not on this machine (../shared/data is not in the repository)."""


def need_dir(path, dataset: str, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetMissing(f"--datasets {dataset}: {path} not found. The shared development data "
                             f"(../shared/data) is not part of the repository; pass {flag} DIR where it is, or leave "
                             f"{dataset} out")
    return path


# ------------------------------------------------------------------------------------------------------ data
def synthetic_dataset(args):
    kb = generate_knowledge_base(seed=args.kb_seed, template_set=args.templates)
    return {"name": f"synthetic (kb seed {args.kb_seed}, {args.templates} templates)", "key": "synthetic",
            "passages": kb.passages, "train": kb.train, "test": kb.test, "index_tag": f"{args.kb_seed}-{args.templates}"}


def canonical_answer(answer: str) -> str:
    """CMU QA writes yes/no answers many ways ("Yes.", "yes", "YES"): one target form for the generator."""
    norm = normalize_answer(answer)
    return norm if norm in ("yes", "no") else answer


def cmu_dataset(args):
    """../shared/data/cmu_qa_wiki through jobs.prepare_qa (re-chunked passages, held-out articles, document-level
    gold ids), cached under /tmp."""
    from jobs.prepare_qa import prepare

    cmu_dir = need_dir(args.cmu_dir, "cmu", "--cmu-dir")
    out = Path(f"/tmp/latentrag-quality-cmu-{args.cmu_chunk_words}")
    if not (out / "prepare.json").exists():
        prepare(str(cmu_dir / "passages.jsonl"), str(cmu_dir / "qa.jsonl"), out,
                chunk_words=args.cmu_chunk_words, chunk_overlap=20)
    return prepared_dataset(out, "cmu_qa_wiki (document-level recall)", "cmu", f"cmu-{args.cmu_chunk_words}")


def rag_mini_dataset(args):
    """../shared/data/rag_mini_wikipedia through jobs.prepare_qa.prepare_rag_mini: its passages with their CMU
    article (read from ../shared/data/cmu_qa_wiki), held-out articles, document-level gold ids; cached under /tmp."""
    from jobs.prepare_qa import prepare_rag_mini

    rag_dir = need_dir(args.rag_mini_dir, "rag-mini", "--rag-mini-dir")
    cmu_dir = need_dir(args.cmu_dir, "rag-mini", "--cmu-dir (its passage -> article map)")
    out = Path(f"/tmp/latentrag-quality-ragmini-{args.cmu_chunk_words}")
    if not (out / "prepare.json").exists():
        prepare_rag_mini(rag_dir, cmu_dir, out, chunk_words=args.cmu_chunk_words, chunk_overlap=20)
    return prepared_dataset(out, "rag-mini-wikipedia (held-out articles, document-level recall)", "rag-mini",
                            f"ragmini-{args.cmu_chunk_words}")


def prepared_dataset(out: Path, name: str, key: str, index_tag: str) -> dict:
    """A directory written by jobs.prepare_qa: passages, train and test questions (yes/no answers canonical)."""
    from pipeline.data import read_passages, read_qa

    def rows(split):
        return [{**r, "answers": list(dict.fromkeys(canonical_answer(a) for a in r["answers"]))}
                for r in read_qa(out / f"{split}.jsonl")]

    return {"name": name, "key": key, "passages": read_passages(out / "passages").to_pylist(),
            "train": rows("train"), "test": rows("test"), "index_tag": index_tag}


DATASETS = {"synthetic": synthetic_dataset, "cmu": cmu_dataset, "rag-mini": rag_mini_dataset}


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """The options the DATASETS loaders read."""
    p.add_argument("--kb-seed", type=int, default=0, help="synthetic knowledge-base seed")
    p.add_argument("--templates", default="default", help="synthetic templates: default | alt")
    p.add_argument("--cmu-dir", default=str(SHARED_DATA / "cmu_qa_wiki"))
    p.add_argument("--rag-mini-dir", default=str(SHARED_DATA / "rag_mini_wikipedia"),
                   help="rag-mini-wikipedia (passages.csv, qa_s08.jsonl); its passage -> article map reads --cmu-dir")
    p.add_argument("--cmu-chunk-words", type=int, default=100)
BASELINES = {"bm25": "BM25 retrieval", "majority_answer": 'majority answer "{answer}"',
             "bm25_reader": "BM25 top-K + untrained reader", "minilm": "frozen MiniLM + untrained reader"}


def baseline_label(name: str, base: dict) -> str:
    return BASELINES.get(name, name).replace("{answer}", str(base.get("answer")))


# ------------------------------------------------------------------------------------------------- baselines
class Bm25:
    """BM25 (bm25s; English stopwords) over the passages' title and text, built once per dataset."""

    def __init__(self, passages):
        import bm25s

        self.passages = passages
        self.retriever = bm25s.BM25()
        corpus = [f"{p.get('title', '')} {p['text']}" for p in passages]
        self.retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def search(self, questions: list[str], k: int) -> list[list[str]]:
        """The ids of each question's top-k passages, best first."""
        import bm25s

        docs, _ = self.retriever.retrieve(bm25s.tokenize(questions, stopwords="en", show_progress=False),
                                          k=min(k, len(self.passages)), show_progress=False)
        return [[str(self.passages[int(j)]["id"]) for j in row] for row in docs]


def bm25_recall(passages, test, bm25: Bm25 | None = None) -> dict:
    ids = (bm25 or Bm25(passages)).search([r["question"] for r in test], 20)
    gold_of = GoldPassages(p["id"] for p in passages)
    gold = [gold_of.passages(r.get("gold_passage_ids")) for r in test]
    return {f"recall@{kk}": recall_at_k(ids, gold, kk) for kk in (1, 5, 20)}


def majority_answer(train, test) -> dict:
    """The most frequent (normalised) first answer of the training questions, given to every test question: what
    EM/F1 a model gets that ignores question and passages alike (on cmu_qa_wiki: "yes")."""
    counts = Counter(normalize_answer(r["answers"][0]) for r in train if r.get("answers"))
    answer = counts.most_common(1)[0][0]
    f1s = [f1_score(answer, r["answers"]) for r in test]
    return {"answer": answer, "em": sum(exact_match(answer, r["answers"]) for r in test) / len(test),
            "f1": sum(f1s) / len(test), **f1_by_answer_type(f1s, [r["answers"] for r in test])}


def bm25_reader(cfg, index, data, test, bm25: Bm25, seed: int = 0) -> tuple[dict, list]:
    """The untrained start (the model every run starts from: same config and seed) reading BM25's top-K instead of
    its own retriever's: EM/F1/recall of the reader without any training on candidates that share the question's
    words. The marginal over the K passages still weighs them by the dense retriever's scores."""
    seed_everything(seed)
    model = build_model(cfg, index, data["train"])
    row_of = {str(pid): i for i, pid in enumerate(model.index.ids)}

    def retrieve(questions, depth):
        rows = np.array([[row_of[pid] for pid in hits] for hits in bm25.search(questions, depth)], dtype=np.int64)
        return model.candidates(rows, model.query_encoder(questions))

    return evaluate(model, test, k=cfg.eval.k, estimator=cfg.train.estimator, decode=cfg.eval.decode,
                    num_beams=cfg.eval.num_beams, retrieve=retrieve)


# ------------------------------------------------------------------------------------------------------ runs
class CurveEvents(Events):
    """The benchmark's side of the recipe: gradient norms every step, the test metrics at each evaluation."""

    def __init__(self, label: str, seed: int):
        self.label, self.seed, self.grads, self.curve, self.t0 = label, seed, [], [], time.time()

    def after_step(self, recipe, m):
        self.grads.append({"step": recipe.step, "retriever": m["grad_norm/retriever"],
                           "generator": m["grad_norm/generator"], "loss": m["loss"]})

    def report(self, recipe, report, write_checkpoint):
        r = {k[len("dev_"):]: v for k, v in report.items() if k.startswith("dev_")}
        self.curve.append({"step": report["step"], **{k: r.get(k) for k in KEYS}})
        print(f"  {self.label:>13} seed {self.seed} step {report['step']:4d}  "
              + "  ".join(f"{k} {r[k]:.3f}" for k in KEYS if r.get(k) is not None)
              + f"  ({(time.time() - self.t0) / max(recipe.step, 1):.2f} s/step)", flush=True)


def run_one(label, cfg, index, data, seed, args) -> dict:
    """One run of the training recipe, the test questions evaluated every `--eval-every` steps."""
    estimator, strategy, _ = RUNS[label]
    cfg.train.strategy, cfg.train.estimator, cfg.train.seed = strategy, estimator, seed
    cfg.train.eval_every, cfg.train.checkpoint_every, cfg.eval.max_questions = args.eval_every, 0, 0
    cfg.train.torch_threads = args.threads
    test = data["test"][:args.max_eval] if args.max_eval else data["test"]
    events = CurveEvents(label, seed)
    recipe = TrainRecipe(cfg, data["train"], test, events=events).setup(index)
    start, _ = recipe.evaluate(test, nll=False)
    events.curve.append({"step": 0, **{k: start[k] for k in KEYS}})
    events.t0 = time.time()
    recipe.train()
    recipe.cleanup()
    curve = events.curve
    return {"label": label, "estimator": estimator, "strategy": strategy, "seed": seed, "start": curve[0],
            "end": curve[-1], "curve": curve, "grad_norms": events.grads,
            "s_per_step": (time.time() - events.t0) / cfg.train.max_steps,
            "uses_gold_passages": strategy == "independent"}


def gradient_variance(label, cfg, index, data, args) -> dict | None:
    estimator, strategy, _ = RUNS[label]
    if strategy != "joint" or args.variance_repeats == 0:
        return None                                   # a strategy, not a gradient estimator of the marginal; or off
    seed_everything(0)
    model = build_model(cfg, index, data["train"])
    est = build_estimator(estimator, k=cfg.train.k, cfg=cfg.estimator)
    batch = data["train"][:args.variance_batch]
    r = measure_estimator(model, est, batch, repeats=args.variance_repeats)
    return {"retriever_relative_var": r["retriever_grad"]["relative_var"],
            "generator_relative_var": r["generator_grad"]["relative_var"],
            "gen_rows_per_example": r["diagnostics"]["gen_rows_per_example"]}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in KEYS:
        start = [r["start"][key] for r in runs if r["start"][key] is not None]
        end = [r["end"][key] for r in runs if r["end"][key] is not None]
        if end:
            out[key] = {"start": statistics.mean(start), "mean": statistics.mean(end),
                        "std": statistics.stdev(end) if len(end) > 1 else 0.0}
    return out


# ---------------------------------------------------------------------------------------------------- report
def markdown(results: dict, args) -> str:
    lines = [f"# Estimator comparison ({args.steps or 'config'} steps, seeds {args.seeds})", ""]
    for ds in results["datasets"].values():
        lines += [f"## {ds['name']}", "",
                  f"train {ds['num_train']} questions, test {ds['num_test']}, {ds['num_passages']} passages; "
                  f"{ds['steps']} steps, K = {ds['k']}, batch {ds['batch_size']}. Mean ± std over seeds "
                  "(start -> end).", "",
                  "| run | " + " | ".join(KEYS) + " | retr. rel. var | gen. rel. var | gen rows/ex | s/step |",
                  "|" + "---|" * (len(KEYS) + 5)]
        for label, s in ds["summary"].items():
            cells = []
            for key in KEYS:
                v = s["metrics"].get(key)
                cells.append("n/a" if v is None else f"{v['start']:.3f} -> {v['mean']:.3f} ± {v['std']:.3f}")
            var = s.get("variance") or {}
            fmt = lambda x: "—" if x is None else f"{x:.3g}"  # noqa: E731
            name = label + (" (gold passages)" if s["uses_gold_passages"] else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(var.get('retriever_relative_var'))} | "
                         f"{fmt(var.get('generator_relative_var'))} | {fmt(var.get('gen_rows_per_example'))} | "
                         f"{s['s_per_step']:.2f} |")
        for name, base in ds["baselines"].items():
            cells = [("n/a" if base.get(k) is None else f"{base[k]:.3f}") for k in KEYS]
            lines.append(f"| {baseline_label(name, base)} (no training) | " + " | ".join(cells) + " | — | — | — | — |")
        lines += ["", "f1_yes_no / f1_other: F1 over the test questions whose answers are all yes/no, and over the "
                  "others (pipeline.metrics.answer_type).", ""]
    return "\n".join(lines)


def plots(ds: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, runs in ds["runs"].items():
        r = runs[0]
        steps = [c["step"] for c in r["curve"]]
        axes[0].plot(steps, [c["recall@1"] for c in r["curve"]], marker="o", label=label)
        axes[1].plot(steps, [c["em"] for c in r["curve"]], marker="o", label=label)
        axes[2].plot([g["step"] for g in r["grad_norms"]], [g["retriever"] for g in r["grad_norms"]], label=label,
                     linewidth=0.8)
    for ax, title in zip(axes, ("recall@1 (test)", "EM (test)", "retriever gradient norm (before clipping)")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(ds["name"] + " — first seed")
    fig.tight_layout()
    files.append(out_dir / f"learning_curves_{ds['key']}.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    labels = list(ds["summary"])
    x = range(len(labels))
    before = [ds["summary"][lb]["metrics"]["recall@1"]["start"] for lb in labels]
    after = [ds["summary"][lb]["metrics"]["recall@1"]["mean"] for lb in labels]
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="start")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="after training")
    if ds["baselines"].get("bm25", {}).get("recall@1") is not None:
        ax.axhline(ds["baselines"]["bm25"]["recall@1"], color="gray", linestyle="--", label="BM25")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=20)
    ax.set_ylabel("recall@1")
    ax.legend()
    fig.tight_layout()
    files.append(out_dir / f"recall_{ds['key']}.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="latentrag bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["synthetic"], choices=list(CONFIGS),
                   help="synthetic (built in); cmu and rag-mini read ../shared/data (development data, not in the "
                        "repository: --cmu-dir, --rag-mini-dir)")
    p.add_argument("--estimators", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS), metavar="RUN",
                   help=f"estimators and strategies to compare (default: {' '.join(DEFAULT_RUNS)}); any of "
                        f"{', '.join(RUNS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (same start per seed)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-eval", type=int, default=0, help="test questions per evaluation (0 = all)")
    add_dataset_arguments(p)
    p.add_argument("--variance-batch", type=int, default=8)
    p.add_argument("--variance-repeats", type=int, default=6, help="gradient estimates per estimator (0 = skip; else >= 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="benchmarks/results/quality")
    p.add_argument("--merge", nargs="+", metavar="LABEL=DIR",
                   help="no training: one report from earlier runs' DIR/quality.json, each DIR's runs under LABEL")
    args = p.parse_args(argv)
    if args.merge:
        try:
            return merge(args.merge, Path(args.out_dir))
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.variance_repeats == 1 or args.variance_repeats < 0:
        p.error("--variance-repeats: 0 (skip) or >= 2 (a variance needs two estimates)")
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "datasets": {}}
    try:                                            # every dataset's files, before any work
        loaded = {key: DATASETS[key](args) for key in args.datasets}
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key in args.datasets:
        data = loaded[key]
        cfg = load_config(CONFIGS[key], args.set)
        if args.steps:
            cfg.train.max_steps = args.steps
        index = cached_index(data["index_tag"], data["passages"],
                             TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length))
        test = data["test"][:args.max_eval] if args.max_eval else data["test"]
        print(f"== {data['name']}: {len(data['train'])} train / {len(test)} test questions, "
              f"{len(data['passages'])} passages", flush=True)
        bm25 = Bm25(data["passages"])
        baselines = {"bm25": bm25_recall(data["passages"], test, bm25), "majority_answer": majority_answer(
            data["train"], test), "bm25_reader": bm25_reader(cfg, index, data, test, bm25, args.seeds[0])[0]}
        ds = {"name": data["name"], "key": key, "num_train": len(data["train"]), "num_test": len(test),
              "num_passages": len(data["passages"]), "steps": cfg.train.max_steps, "k": cfg.train.k,
              "batch_size": cfg.train.batch_size, "baselines": baselines, "runs": {}, "summary": {}}
        for name, base in baselines.items():
            print(f"  {baseline_label(name, base)}: "
                  + "  ".join(f"{k} {base[k]:.3f}" for k in KEYS if base.get(k) is not None), flush=True)
        for label in args.estimators:
            if RUNS[label][1] == "independent" and not all(r.get("gold_passage_ids") for r in data["train"]):
                print(f"  {label}: skipped on {key}: training questions lack gold_passage_ids", flush=True)
                continue
            run_cfg = load_config(CONFIGS[key],
                                  args.set + RUNS[label][2] + [f"train.max_steps={cfg.train.max_steps}"])
            runs = [run_one(label, run_cfg, index, data, seed, args) for seed in args.seeds]
            ds["runs"][label] = runs
            ds["summary"][label] = run_summary(runs, gradient_variance(label, run_cfg, index, data, args))
        ds["baselines"]["minilm"] = next(iter(ds["runs"].values()))[0]["start"] if ds["runs"] else {}
        results["datasets"][key] = ds
        ds["plots"] = [str(f) for f in plots(ds, out_dir)] if ds["runs"] else []
    write_report(results, args, out_dir)
    return 0


def run_summary(runs: list[dict], variance: dict | None) -> dict:
    return {"metrics": summarise(runs), "uses_gold_passages": runs[0]["uses_gold_passages"],
            "s_per_step": statistics.mean(r["s_per_step"] for r in runs), "variance": variance}


def write_report(results: dict, args, out_dir: Path) -> None:
    """The table printed and written, the JSON, and both logged to MLflow with the plots."""
    table = markdown(results, args)
    print("\n" + table)
    (out_dir / "quality.md").write_text(table + "\n")
    (out_dir / "quality.json").write_text(json.dumps(results, indent=2, default=float))
    log_to_mlflow(results, out_dir)
    print(f"\n-> {out_dir}/quality.md, quality.json and plots")


def merge(specs: list[str], out_dir: Path) -> int:
    """Runs made in separate processes (one per core, or one seed each) as one report: LABEL=DIR puts the runs
    of DIR/quality.json (one estimator each) under LABEL. Datasets must agree on steps, K, batch and test set."""
    results = {"args": {"merge": specs, "steps": None, "seeds": []}, "datasets": {}}
    same = ("name", "steps", "k", "batch_size", "num_train", "num_test", "num_passages")
    for spec in specs:
        label, sep, d = spec.partition("=")
        if not sep or not label:
            raise ValueError(f"--merge {spec!r}: expected LABEL=DIR")
        if not re.fullmatch(r"[\w\-. :/]+", label):      # the labels name MLflow metrics: MLflow's characters
            raise ValueError(f"--merge {spec!r}: LABEL may hold letters, digits, '_', '-', '.', ' ', ':' and '/' "
                             "only (it names MLflow metrics)")
        part = json.loads((Path(d) / "quality.json").read_text())
        for key, ds in part["datasets"].items():
            if len(ds["runs"]) != 1:
                raise ValueError(f"{d}/quality.json: {key} has runs {sorted(ds['runs'])}; LABEL=DIR needs one")
            into = results["datasets"].setdefault(key, {**{k: ds[k] for k in (*same, "key", "baselines")},
                                                        "runs": {}, "summary": {}})
            differ = [k for k in same if into[k] != ds[k]]
            if differ:
                raise ValueError(f"{d}/quality.json: {key} differs from the first run in {differ}")
            runs = next(iter(ds["runs"].values()))
            into["runs"].setdefault(label, []).extend(runs)
            results["args"]["steps"] = ds["steps"]
            results["args"]["seeds"] = sorted(set(results["args"]["seeds"]) | {r["seed"] for r in runs})
    out_dir.mkdir(parents=True, exist_ok=True)
    for ds in results["datasets"].values():
        for label, runs in ds["runs"].items():
            ds["summary"][label] = run_summary(runs, None)
        ds["plots"] = [str(f) for f in plots(ds, out_dir)]
    write_report(results, argparse.Namespace(**results["args"]), out_dir)
    return 0


def log_to_mlflow(results: dict, out_dir: Path) -> None:
    from pipeline.tracking import Tracker, default_tracking_uri

    tracker = Tracker.start(default_tracking_uri(out_dir.resolve()), "latentrag-quality", "quality",
                            artifact_location=out_dir.resolve() / "mlartifacts")
    tracker.log_params({k: str(v) for k, v in results["args"].items()})
    for key, ds in results["datasets"].items():
        for label, s in ds["summary"].items():
            tracker.log_metrics({f"{key}/{label}/{m}": v["mean"] for m, v in s["metrics"].items()})
    for name in ("quality.md", "quality.json", *[Path(f).name for ds in results["datasets"].values()
                                                  for f in ds.get("plots", [])]):
        tracker.log_artifact(out_dir / name)
    tracker.end()


if __name__ == "__main__":
    sys.exit(main())
