"""`latentrag eval`: evaluate a checkpoint on QA pairs (EM, F1, recall@1/5/20) and write metrics.json."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data import DataError, read_qa


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag eval", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory written by `latentrag train`")
    p.add_argument("--eval-qa", required=True, help="questions with answers (and gold_passage_ids for recall)")
    p.add_argument("--output-dir", required=True, help="where metrics.json and predictions.jsonl go")
    p.add_argument("--index", help="evaluate against another index root or version than the checkpoint's")
    p.add_argument("--k", type=int, help="passages per question (default: the checkpoint's eval.k)")
    p.add_argument("--decode", choices=["fast", "thorough"], help="RAG-Sequence decoding mode")
    p.add_argument("--num-beams", type=int, help="beams per passage (default: the checkpoint's eval.num_beams)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jobs.train import _fmt, write_json, write_jsonl_predictions
    from pipeline.checkpoint import load_checkpoint
    from pipeline.evaluation import evaluate

    try:
        rows = read_qa(args.eval_qa)
        model, cfg, meta = load_checkpoint(args.checkpoint, index_dir=args.index)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics, predictions = evaluate(model, rows, k=args.k or cfg.eval.k, estimator=cfg.train.estimator,
                                    decode=args.decode or cfg.eval.decode,
                                    num_beams=args.num_beams or cfg.eval.num_beams)
    metrics.update({"estimator": cfg.train.estimator, "index_version": model.index.version,
                    "checkpoint": str(Path(args.checkpoint).resolve()), "step": meta.get("step")})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    write_jsonl_predictions(predictions, out / "predictions.jsonl")
    print(_fmt(metrics))
    print(f"metrics -> {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
