"""Hybrid candidates (retriever.hybrid_k) against dense-only, no training, on cmu_qa_wiki's held-out articles.

    .venv/bin/python benchmarks/hybrid_candidates.py                    # K 5, H 0 2 5, retrieval and reader
    .venv/bin/python benchmarks/hybrid_candidates.py --hs 0 2 5 10 --no-reader
    .venv/bin/python benchmarks/hybrid_candidates.py --hs --no-reader --out /tmp/fused   # the fused prior's sweep only

For each H (0 = dense only): the candidate set the reader reads (the dense top-K united with BM25's top-H,
`RagModel.prior_rows`), and the dense top-(K + H) alone (as many passages, no BM25), and
- recall@candidates: document-level, does the set hold a passage of the question's article;
- answer-in-candidates: for answers that are not yes/no, does a candidate passage contain the answer text;
- the untrained reader (--config's generator; results/hybrid was measured with the shipped copy-bart `reader`, then
  configs/cmu_qa_wiki.yaml's, vocabulary head from the training answers) decoding from those candidates: EM and F1, overall and split by answer type (yes/no vs other).
Rows: the held-out articles' questions (dev + test, 437) and the test split alone (314, what `bench quality
--datasets cmu` evaluates). BM25 alone (top-K) is the reference line. The fused prior (`retriever.bm25_weight` w): recall@1/@k of the dense
top-k + BM25 top-H ranked by dense score / tau + w * BM25 score, per w, on the train and test questions. Writes OUT/hybrid_candidates.json and .md.
The data is prepared with jobs.prepare_qa into --data (under /tmp, never the repo); the MiniLM index is cached
under /tmp (benchmarks/common.cached_index) with its BM25 index beside it. No Ray, one process.
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

from benchmarks.common import cached_index  # noqa: E402
from benchmarks.quality import canonical_answer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation import evaluate  # noqa: E402
from pipeline.index.bm25 import open_bm25  # noqa: E402
from pipeline.metrics import exact_match, f1_score, normalize_answer, recall_at_k  # noqa: E402
from pipeline.models.assembly import build_model  # noqa: E402
from pipeline.models.retriever import TextEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_data(cmu_dir: Path, out: Path) -> dict:
    from jobs.prepare_qa import prepare
    from pipeline.data import read_passages, read_qa

    if not (out / "prepare.json").exists():
        prepare(str(cmu_dir / "passages.jsonl"), str(cmu_dir / "qa.jsonl"), out, chunk_words=100, chunk_overlap=20)

    def rows(name):
        return [{**r, "answers": list(dict.fromkeys(canonical_answer(a) for a in r["answers"])), "split": name}
                for r in read_qa(out / f"{name}.jsonl")]

    return {"passages": read_passages(out / "passages").to_pylist(), "train": rows("train"),
            "heldout": rows("dev") + rows("test")}


def is_yes_no(row: dict) -> bool:
    return normalize_answer(row["answers"][0]) in ("yes", "no")


def candidate_sets(model, rows: list[dict], k: int, batch_size: int = 64) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            questions = [r["question"] for r in rows[i:i + batch_size]]
            out += model.prior_rows(questions, model.query_encoder(questions), k).tolist()
    return out


def retrieval_figures(model, rows: list[dict], sets: list[list[int]]) -> dict:
    ids = [[str(model.index.ids[r]) for r in s] for s in sets]
    gold = [r.get("gold_passage_ids") or [] for r in rows]
    other = [(r, s) for r, s in zip(rows, sets) if not is_yes_no(r)]
    found = sum(any(normalize_answer(a) and normalize_answer(a) in normalize_answer(model.row_text(p))
                    for a in r["answers"] for p in s) for r, s in other)
    return {"recall@candidates": recall_at_k(ids, gold, len(sets[0])),
            "answer_in_candidates_other": found / len(other) if other else None, "candidates": len(sets[0])}


def reader_figures(preds: list[dict], rows: list[dict]) -> dict:
    out = {}
    for name, keep in (("all", lambda r: True), ("yes_no", is_yes_no), ("other", lambda r: not is_yes_no(r))):
        pairs = [(p, r) for p, r in zip(preds, rows) if keep(r)]
        if pairs:
            out[f"em_{name}"] = sum(exact_match(p["prediction"], r["answers"]) for p, r in pairs) / len(pairs)
            out[f"f1_{name}"] = sum(f1_score(p["prediction"], r["answers"]) for p, r in pairs) / len(pairs)
    return out


def fused_recall(model, rows: list[dict], k: int, h: int, weights: list[float]) -> list[dict]:
    """recall@1 and @k of the fused prior's ranking of the dense top-k and BM25's top-h (retriever.bm25_weight w:
    dense score / tau + w * BM25 score; w 0 = the dense order), per weight. No training, no reader."""
    gold = [r.get("gold_passage_ids") or [] for r in rows]
    out = []
    for w in weights:
        model.attach_bm25(h, w)
        ids = [[str(model.index.ids[r]) for r in s] for s in candidate_sets(model, rows, k)]
        out.append({"bm25_weight": w, "k": k, "hybrid_k": h, "recall@1": recall_at_k(ids, gold, 1),
                    f"recall@{k}": recall_at_k(ids, gold, k)})
    return out


def markdown(results: dict) -> str:
    lines = [f"Hybrid candidates on cmu_qa_wiki, no training: dense MiniLM top-{results['k']} united with BM25's "
             "top-H (k1 0.9, b 0.4, English stopwords), untrained copy-bart reader", ""]
    for split, res in results["splits"].items():
        lines += [f"**{split}** ({res['num_questions']} questions, {res['num_other']} not yes/no)", "",
                  "| candidates | recall@candidates | answer in candidates (other) | EM | F1 | F1 yes/no | F1 other |",
                  "|---|---|---|---|---|---|---|"]
        for row in res["rows"]:
            def f(key, row=row):
                return "" if row.get(key) is None else f"{row[key]:.3f}"
            lines.append(f"| {row['label']} | {f('recall@candidates')} | {f('answer_in_candidates_other')} | "
                         f"{f('em_all')} | {f('f1_all')} | {f('f1_yes_no')} | {f('f1_other')} |")
        lines.append("")
    for split, table in (results.get("fused") or {}).items():
        k = table[0]["k"]
        lines += [f"**fused prior, {split}**: dense top-{k} + BM25 top-{table[0]['hybrid_k']} ranked by dense/tau + "
                  "w * BM25", "", f"| bm25_weight w | recall@1 | recall@{k} |", "|---|---|---|"]
        lines += [f"| {row['bm25_weight']:g} | {row['recall@1']:.3f} | {row[f'recall@{k}']:.3f} |" for row in table]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmu-dir", default=str(ROOT.parent / "shared" / "data" / "cmu_qa_wiki"))
    p.add_argument("--data", default="/tmp/latentrag-hybrid-cmu", help="where jobs.prepare_qa writes (not the repo)")
    p.add_argument("--config", default=str(ROOT / "configs" / "cmu_qa_wiki.yaml"))
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--hs", type=int, nargs="*", default=[0, 2, 5])
    p.add_argument("--no-reader", action="store_true", help="candidate sets only (no decoding)")
    p.add_argument("--fused-weights", type=float, nargs="*", default=[0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3],
                   help="retriever.bm25_weight values whose fused ranking is measured (train and test splits)")
    p.add_argument("--fused-k", type=int, default=3, help="dense top-k of the fused ranking")
    p.add_argument("--fused-h", type=int, default=2, help="BM25 top-H of the fused ranking")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hybrid"))
    args = p.parse_args(argv)
    cmu_dir = Path(args.cmu_dir)
    if not (cmu_dir / "qa.jsonl").is_file():
        print(f"error: {cmu_dir} holds no cmu_qa_wiki (qa.jsonl); pass --cmu-dir", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.time()
    data = load_data(cmu_dir, Path(args.data))
    cfg = load_config(args.config)
    torch.manual_seed(cfg.train.seed)
    index = cached_index("cmu-100", data["passages"], TextEncoder(cfg.retriever.encoder))
    model = build_model(cfg, index, data["train"]).eval()   # the untrained start every estimator begins from
    bm25 = open_bm25(index)                                  # built once into the index version's bm25/
    splits = {"held-out (dev + test)": lambda r: True, "test": lambda r: r["split"] == "test"}
    results = {"k": args.k, "hs": args.hs, "index": str(index.path), "bm25": bm25.meta, "splits": {}}
    # (k, H): dense top-k with BM25's top-H, and dense-only sets of the same size (is it BM25 or just more passages?)
    runs = [(args.k, h) for h in args.hs] + [(args.k + h, 0) for h in args.hs if h > 0]
    found = {}
    for k, h in runs:
        model.attach_bm25(h)
        sets = candidate_sets(model, data["heldout"], k)
        preds = None
        if not args.no_reader:
            t = time.time()
            _, preds = evaluate(model, data["heldout"], k=k, estimator=cfg.train.estimator,
                                decode=cfg.eval.decode, num_beams=cfg.eval.num_beams)
            print(f"k={k} H={h}: reader decoded {len(preds)} questions in {time.time() - t:.0f}s", flush=True)
        found[k, h] = (sets, preds)
    _, bm25_rows = bm25.search([r["question"] for r in data["heldout"]], args.k, with_zero_scores=True)
    for split, chosen in splits.items():
        keep = [i for i, r in enumerate(data["heldout"]) if chosen(r)]
        rows = [data["heldout"][i] for i in keep]
        table = []
        for (k, h), (sets, preds) in found.items():
            row = {"label": f"dense {k}" if h == 0 else f"dense {k} + BM25 {h}", "k": k, "hybrid_k": h,
                   **retrieval_figures(model, rows, [sets[i] for i in keep])}
            if preds is not None:
                row.update(reader_figures([preds[i] for i in keep], rows))
            table.append(row)
        table.append({"label": f"BM25 {args.k} alone",
                      **retrieval_figures(model, rows, [bm25_rows[i].tolist() for i in keep])})
        results["splits"][split] = {"num_questions": len(rows), "num_other": sum(not is_yes_no(r) for r in rows),
                                    "rows": table}
    if args.fused_weights:
        results["fused"] = {
            split: fused_recall(model, rows, args.fused_k, args.fused_h, args.fused_weights)
            for split, rows in (("train", data["train"]),
                                ("test", [r for r in data["heldout"] if r["split"] == "test"]))}
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_candidates.json").write_text(json.dumps(results, indent=2))
    (out / "hybrid_candidates.md").write_text(markdown(results))
    print(markdown(results))
    print(f"-> {out / 'hybrid_candidates.json'}, {out / 'hybrid_candidates.md'} ({results['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
