"""`latentrag eval`: evaluate a checkpoint on QA pairs (EM, F1, recall@1/5/20) and write metrics.json."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.train import format_metrics
from pipeline.checkpoint import load_checkpoint
from pipeline.data import DataError, read_qa, write_json, write_jsonl
from pipeline.evaluation import evaluate, gold_passages
from pipeline.progress import Progress


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`--k 0` is refused, not read as "use the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag eval", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory written by `latentrag train`")
    p.add_argument("--eval-qa", required=True, help="questions with answers (and gold_passage_ids for recall)")
    p.add_argument("--output-dir", required=True, help="where metrics.json and predictions.jsonl go")
    p.add_argument("--index", help="evaluate against another index root or version than the checkpoint's (by "
                                   "default the checkpoint finds its own, also after its run directory moved)")
    p.add_argument("--k", type=_positive_int,
                   help="passages per question, 1 to the number of passages in the index (default: the "
                        "checkpoint's eval.k)")
    p.add_argument("--decode", choices=["fast", "thorough"], help="RAG-Sequence decoding mode")
    p.add_argument("--hybrid-k", type=int, metavar="H",
                   help="BM25's top-H join the dense top-k as the reader's candidates (default: the checkpoint's "
                        "retriever.hybrid_k; 0 = dense only)")
    p.add_argument("--num-beams", type=_positive_int,
                   help="beams per passage (default: the checkpoint's eval.num_beams)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = read_qa(args.eval_qa)
        model, cfg, meta = load_checkpoint(args.checkpoint, index_dir=args.index)
        gold_passages(model.index).check(rows, args.eval_qa)        # gold ids name rows of the index's corpus
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k = args.k if args.k is not None else cfg.eval.k
    hybrid_k = args.hybrid_k if args.hybrid_k is not None else cfg.retriever.hybrid_k
    num_passages = len(model.index.ids)
    if hybrid_k < 0:
        print(f"error: --hybrid-k {hybrid_k}: must be >= 0 (0 = dense only)", file=sys.stderr)
        return 2
    if k + hybrid_k > num_passages:
        given = f"--k {k}" if args.k is not None else f"eval.k={k} (from the checkpoint's config; pass --k)"
        plus = f" + {hybrid_k} BM25 candidates (hybrid_k)" if hybrid_k else ""
        print(f"error: {given}{plus}: the index {model.index.path} holds only {num_passages} passage(s); "
              f"choose k between 1 and {num_passages - hybrid_k}", file=sys.stderr)
        return 2
    if hybrid_k != model.hybrid_k:
        model.attach_bm25(hybrid_k, cfg.retriever.bm25_weight)
    decode = args.decode or cfg.eval.decode
    num_beams = args.num_beams if args.num_beams is not None else cfg.eval.num_beams
    metrics, predictions = evaluate(model, rows, k=k, estimator=cfg.train.estimator, decode=decode,
                                    num_beams=num_beams, progress=Progress("[eval]", "questions"))
    metrics.update({"k": k, "hybrid_k": hybrid_k, "decode": decode, "num_beams": num_beams,
                    "estimator": cfg.train.estimator, "index_version": model.index.version,
                    "checkpoint": str(Path(args.checkpoint).resolve()), "step": meta.get("step")})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    write_jsonl(predictions, out / "predictions.jsonl")
    print(format_metrics(metrics))
    print(f"metrics -> {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
