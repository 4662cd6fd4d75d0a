"""`latentrag demo`: the whole pipeline on the built-in synthetic knowledge base, on a laptop.

Starts a local Ray; generates fictional entities and relations (no model knows an answer) with train/dev/test
questions; ingests the passages; encodes them with Ray Data; builds a FAISS index version; trains retriever and
generator together with Ray Train; evaluates the untrained start and the trained model on the test questions;
logs everything to MLflow (a SQLite file in the output directory); prints a results table; writes metrics.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.tracking import default_tracking_uri

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=50 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(args.config, list(args.set) + [f"output_dir={args.output_dir}"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # imported after HF_HUB_OFFLINE is set above: transformers reads it when first imported
    from jobs.ray_env import ensure_ray
    from jobs.train import clear_previous_run, next_steps, results_table, run_training, where_things_go
    from pipeline.data import chunk_passages, write_passages
    from pipeline.synthetic import generate_knowledge_base, write_knowledge_base

    start = time.time()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(where_things_go(out, default_tracking_uri(out, cfg.mlflow.tracking_uri)), flush=True)
    kb = generate_knowledge_base(seed=cfg.data.synthetic_seed, num_entities=cfg.data.synthetic_entities,
                                 template_set=cfg.data.synthetic_templates)
    write_knowledge_base(kb, out / "data")
    print(f"[data] synthetic knowledge base: {len(kb.passages)} passages, {len(kb.train)} train / "
          f"{len(kb.dev)} dev / {len(kb.test)} test questions -> {out / 'data'}", flush=True)
    write_passages(chunk_passages(kb.passages, cfg.data.chunk_words, cfg.data.chunk_overlap), out / "passages")
    clear_previous_run(out)             # `make demo` again replaces the last demo (its index is reused)
    ensure_ray()
    metrics = run_training(cfg, out, out / "passages", kb.train, kb.dev, kb.test)
    print()
    print(results_table(metrics))
    print(f"\nmetrics -> {out / 'metrics.json'}   MLflow -> {metrics.get('mlflow_run_id')} in {out / 'mlflow.db'}"
          f"   ({time.time() - start:.0f}s in all)")
    print(next_steps(out / "checkpoint", kb.test[0]["question"] if kb.test else "Where was Varnel Ostrik born?"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
