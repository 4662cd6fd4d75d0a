"""How much can a dataset's training questions teach the retriever, and does it carry to held-out questions?

Trains the query encoder alone (no generator), from the config's retriever (its fused prior and hybrid candidates
included), against one of two teachers over the prior's candidates C (the top train.k, plus retriever.hybrid_k):

  answer  the candidates whose text contains an answer (normalised, whole words); a question whose answer is in
          none or in all of C teaches nothing and is skipped (yes/no answers are never in the text). Answers only:
          about the best an estimator's posterior can teach the retriever from a reader that finds answer strings.
  gold    the candidates that are gold passages (document-level on cmu_qa_wiki). Uses gold ids: an upper bound on
          what any teacher over C can give the retriever, not an answers-only method.

loss = -log sum over the teacher's candidates of p(z|x). recall@1 (ranked as `latentrag eval` ranks: the dense
top-20 and BM25's top-H by the prior's score) of the held-out test questions and of the first --train-probe training
questions, every --eval-every steps. At the start it also measures the answer teacher: on the training questions
where it says something, how often its best passage is gold, against the prior's top-1. With `--set
retriever.train_passage_encoder=true --set index.rerank_top_m=M` a passage encoder trains beside the query encoder
and re-ranks the index's top-M (as in training, without refreshing the index).

    python -m benchmarks.retriever_signal --datasets cmu --seeds 0 1 --steps 400
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # `latentrag bench` runs this file by path
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import cached_index  # noqa: E402
from benchmarks.quality import CONFIGS, DATASETS, DatasetMissing, add_dataset_arguments  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import GoldPassages  # noqa: E402
from pipeline.metrics import normalize_answer, recall_at_k  # noqa: E402
from pipeline.models.assembly import attach_passage_encoder  # noqa: E402
from pipeline.models.retriever import TextEncoder  # noqa: E402
from pipeline.rag import RagModel  # noqa: E402

TEACHERS = ("answer", "gold")
RANK_DEPTH = 20                      # as pipeline.evaluation ranks for recall@1/5/20


def findable_answers(answers: list[str]) -> list[str]:
    """The normalised answers a passage can contain (not empty, not yes/no)."""
    return [a for a in (normalize_answer(x) for x in answers) if a and a not in ("yes", "no")]


def contains_answer(passages: list[str], answers: list[str]) -> list[bool]:
    """Per passage: does it contain one of the answers, normalised, as whole words? yes/no answers never count."""
    wanted = findable_answers(answers)
    texts = [f" {normalize_answer(p)} " for p in passages]
    return [any(f" {a} " in t for a in wanted) for t in texts]


def build_retriever(cfg, index) -> RagModel:
    """The config's query encoder over `index`, with its hybrid candidates and fused prior, and with
    `retriever.train_passage_encoder` a passage encoder; no generator."""
    encoder = TextEncoder(cfg.retriever.encoder, pooling=cfg.retriever.pooling, normalize=cfg.retriever.normalize,
                          max_length=cfg.retriever.max_length)
    model = RagModel(encoder.eval(), None, index, tau=cfg.retriever.tau)
    if cfg.retriever.train_passage_encoder:     # it trains too; the index's top-M re-ranked with it
        attach_passage_encoder(model, cfg).passage_encoder.eval()
    if cfg.retriever.hybrid_k > 0:
        model.attach_bm25(cfg.retriever.hybrid_k, cfg.retriever.bm25_weight)
    return model


class Teacher:
    """Which of a question's candidate rows the teacher marks (a bool per row)."""

    def __init__(self, name: str, model: RagModel):
        self.name, self.model = name, model
        self.gold_of = GoldPassages(str(i) for i in model.index.ids)

    def marks(self, row: dict, cand_rows) -> list[bool]:
        if self.name == "gold":
            gold = set(self.gold_of.passages(row.get("gold_passage_ids")))
            return [str(self.model.index.ids[int(r)]) in gold for r in cand_rows]
        return contains_answer([self.model.row_text(int(r)) for r in cand_rows], row["answers"])

    def teaches(self, row: dict) -> bool:
        """Can this question ever teach (answer: a non-yes/no answer; gold: gold ids)?"""
        if self.name == "gold":
            return bool(row.get("gold_passage_ids"))
        return bool(findable_answers(row["answers"]))


def retriever_encoders(model: RagModel) -> list:
    """The encoders that train here: the query encoder, and the passage encoder when there is one."""
    return [e for e in (model.query_encoder, model.passage_encoder) if e is not None]


@torch.no_grad()
def ranked_ids(model: RagModel, questions: list[str], batch_size: int = 64) -> list[list[str]]:
    """Each question's ranking of the dense top-20 and BM25's top-H, in eval mode."""
    encoders = retriever_encoders(model)
    was_training = [e.training for e in encoders]
    for e in encoders:
        e.eval()
    depth = min(RANK_DEPTH, len(model.index.ids))
    out = []
    for i in range(0, len(questions), batch_size):
        qs = questions[i:i + batch_size]
        q = model.query_encoder(qs)
        rows = (model.prior_rows(qs, q, min(depth, len(model.index.ids) - model.hybrid_k))
                if model.bm25_weight else model.search_rows(q, depth))
        out += [[str(model.index.ids[int(r)]) for r in row] for row in rows]
    for e, mode in zip(encoders, was_training):
        e.train(mode)
    return out


def recall1(model: RagModel, rows: list[dict]) -> float:
    gold_of = GoldPassages(str(i) for i in model.index.ids)
    return recall_at_k(ranked_ids(model, [r["question"] for r in rows]),
                       [gold_of.passages(r.get("gold_passage_ids")) for r in rows], 1)


@torch.no_grad()
def answer_teacher_quality(model: RagModel, rows: list[dict], k: int) -> dict:
    """On `rows`: how many questions the answer teacher speaks for (some, not all, candidates contain the answer),
    and among those, how often the prior's top-1 and the teacher's best (highest-prior marked) candidate are gold."""
    teacher = Teacher("answer", model)
    speaks = prior_gold = teacher_gold = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        qs = [r["question"] for r in chunk]
        cands = model.prior_rows(qs, model.query_encoder(qs), k)
        for r, cand in zip(chunk, cands):
            marks = teacher.marks(r, cand)
            if not any(marks) or all(marks):
                continue
            gold = set(teacher.gold_of.passages(r.get("gold_passage_ids")))
            speaks += 1
            prior_gold += str(model.index.ids[int(cand[0])]) in gold
            teacher_gold += str(model.index.ids[int(cand[marks.index(True)])]) in gold
    return {"questions": len(rows), "speaks": speaks, "prior_top1_gold": prior_gold / max(speaks, 1),
            "teacher_gold": teacher_gold / max(speaks, 1)}


def train_retriever(model: RagModel, teacher: Teacher, train: list[dict], test: list[dict], probe: list[dict],
                    k: int, steps: int, lr: float, batch_size: int, eval_every: int, seed: int,
                    log=print) -> list[dict]:
    """Train the query encoder on the teacher's marks; returns the recall@1 curve (step 0 first)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = [r for r in train if teacher.teaches(r)]
    if not pool:
        raise ValueError(f"the {teacher.name} teacher has no training question to learn from")
    encoders = retriever_encoders(model)
    params = [p for e in encoders for p in e.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = [{"step": 0, "test": recall1(model, test), "train_probe": recall1(model, probe), "taught": 0}]
    taught, t0 = 0, time.time()
    for e in encoders:
        e.train()
    for step in range(1, steps + 1):
        batch = rng.sample(pool, min(batch_size, len(pool)))
        qs = [r["question"] for r in batch]
        q = model.query_encoder(qs)
        cands = model.prior_rows(qs, q.detach(), k)
        log_p = torch.log_softmax(model.prior_scores(qs, q, cands), -1)
        terms = []
        for b, (r, cand) in enumerate(zip(batch, cands)):
            marks = torch.tensor(teacher.marks(r, cand))
            if marks.any() and not marks.all():
                terms.append(-torch.logsumexp(log_p[b][marks], -1))
        if terms:
            taught += len(terms)
            opt.zero_grad()
            (torch.stack(terms).sum() / len(batch)).backward()
            opt.step()
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "test": recall1(model, test), "train_probe": recall1(model, probe),
                          "taught": taught})
            log(f"  {teacher.name:>6} seed {seed} step {step:4d}  test recall@1 {curve[-1]['test']:.3f}  "
                f"train recall@1 {curve[-1]['train_probe']:.3f}  taught {taught}  "
                f"({(time.time() - t0) / step:.2f} s/step)")
    for e in encoders:
        e.eval()
    return curve


def markdown(results: dict) -> str:
    lines = []
    for ds in results["datasets"].values():
        tq = ds["answer_teacher"]
        lines += [f"## {ds['name']}: {ds['num_train']} train / {ds['num_test']} test questions, "
                  f"{results['args']['steps']} steps, lr {ds['lr']}, candidates k={ds['k']} + "
                  f"BM25 {ds['hybrid_k']}", "",
                  f"Answer teacher at the start: speaks for {tq['speaks']} of {tq['questions']} training questions; "
                  f"there its passage is gold {tq['teacher_gold']:.3f} of the time, the prior's top-1 "
                  f"{tq['prior_top1_gold']:.3f}.", "",
                  "| teacher | seed | test recall@1 start -> end (best) | train recall@1 start -> end | taught |",
                  "|---|---|---|---|---|"]
        for name, runs in ds["runs"].items():
            for run in runs:
                c = run["curve"]
                best = max(p["test"] for p in c)
                lines.append(f"| {name} | {run['seed']} | {c[0]['test']:.3f} -> {c[-1]['test']:.3f} ({best:.3f}) | "
                             f"{c[0]['train_probe']:.3f} -> {c[-1]['train_probe']:.3f} | {c[-1]['taught']} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, ds in results["datasets"].items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (name, runs) in enumerate(ds["runs"].items()):
            for run in runs:
                steps = [p["step"] for p in run["curve"]]
                ax.plot(steps, [p["test"] for p in run["curve"]], color=f"C{i}",
                        label=f"{name} seed {run['seed']}: test")
                ax.plot(steps, [p["train_probe"] for p in run["curve"]], color=f"C{i}", linestyle="--",
                        label=f"{name} seed {run['seed']}: train")
        ax.set_xlabel("step")
        ax.set_ylabel("recall@1")
        ax.set_title(f"{ds['name']}: query encoder trained on a teacher")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"retriever_signal_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="latentrag bench retriever_signal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["cmu"], choices=list(CONFIGS),
                   help="cmu and rag-mini read ../shared/data (development data, not in the repository)")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None, help="query encoder learning rate (default: retriever.lr)")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--train-probe", type=int, default=400, help="training questions whose recall@1 is tracked")
    add_dataset_arguments(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="benchmarks/results/retriever_signal")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:                                            # every dataset's files, before any work
        loaded = {key: DATASETS[key](args) for key in args.datasets}
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "datasets": {}}
    for key, data in loaded.items():
        cfg = load_config(CONFIGS[key], args.set)
        lr = args.lr if args.lr is not None else cfg.retriever.lr
        batch_size = args.batch_size or cfg.train.batch_size
        index = cached_index(data["index_tag"], data["passages"],
                             TextEncoder(cfg.retriever.encoder, max_length=cfg.retriever.max_length))
        train, test = data["train"], data["test"]
        probe = [r for r in train if r.get("gold_passage_ids")][:args.train_probe]
        print(f"== {data['name']}: {len(train)} train / {len(test)} test questions", flush=True)
        start = build_retriever(cfg, index)
        ds = {"name": data["name"], "lr": lr, "num_train": len(train), "num_test": len(test), "k": cfg.train.k,
              "hybrid_k": cfg.retriever.hybrid_k, "bm25_weight": cfg.retriever.bm25_weight,
              "answer_teacher": answer_teacher_quality(start, train, cfg.train.k), "runs": {}}
        print(f"  answer teacher: {json.dumps(ds['answer_teacher'])}", flush=True)
        for name in args.teachers:
            ds["runs"][name] = []
            for seed in args.seeds:
                model = build_retriever(cfg, index)
                curve = train_retriever(model, Teacher(name, model), train, test, probe, cfg.train.k, args.steps,
                                        lr, batch_size, args.eval_every, seed,
                                        log=lambda s: print(s, flush=True))
                ds["runs"][name].append({"seed": seed, "curve": curve})
        results["datasets"][key] = ds
    results["plots"] = plot(results, out_dir)
    (out_dir / "retriever_signal.json").write_text(json.dumps(results, indent=1))
    (out_dir / "retriever_signal.md").write_text(markdown(results))
    print(markdown(results))
    print(f"-> {out_dir}/retriever_signal.md, retriever_signal.json and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
