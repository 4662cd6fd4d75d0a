"""`latentrag <command>`: each command is a job module with `main(argv)`, also runnable as `python -m jobs.<name>`."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("jobs.demo", "run the whole pipeline on the built-in synthetic knowledge base"),
    "ingest": ("jobs.ingest", "validate a corpus file and write passage Parquet shards"),
    "encode": ("jobs.encode", "encode passages into embedding shards with Ray Data"),
    "index": ("jobs.index", "encode passages and build a versioned FAISS index"),
    "train": ("jobs.train", "train retriever and generator together with Ray Train"),
    "eval": ("jobs.eval", "evaluate a checkpoint on QA pairs"),
    "serve": ("jobs.serve", "serve a checkpoint over HTTP with Ray Serve (answer, stream, retrieve, reload)"),
    "tune": ("jobs.tune", "sweep retriever and generator learning rates with Ray Tune (ASHA)"),
    "export-merged": ("jobs.export", "write a checkpoint's hf-causal generator (LoRA merged) as one plain HF model"),
    "pretrain-reader": ("jobs.pretrain_reader", "pre-train the shipped copy-bart `reader` generator weights"),
    "bench": ("jobs.bench", "run a benchmark from benchmarks/ (quality: the estimator comparison)"),
}


def _usage() -> str:
    lines = ["usage: latentrag <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`latentrag <command> --help` explains every flag of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"latentrag: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
