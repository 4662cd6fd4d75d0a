"""`latentrag export-merged`: the generator of a checkpoint as one plain Hugging Face model directory.

An hf-causal generator's LoRA adapters are merged into its base weights (a full fine-tune is written as it is), with
its tokenizer and `latentrag_prompt.json` (how latentrag prompts it), so `AutoModelForCausalLM.from_pretrained(OUT)`
alone loads it.

    latentrag export-merged --checkpoint runs/x/checkpoint --out runs/x/merged
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.models.generator import load_generator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag export-merged", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a latentrag checkpoint directory (holds generator/)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gen_dir, out = Path(args.checkpoint) / "generator", Path(args.out)
    if not gen_dir.is_dir():
        print(f"error: {gen_dir} not found: --checkpoint must be a latentrag checkpoint directory", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new directory", file=sys.stderr)
        return 2
    gen = load_generator(gen_dir)
    if not hasattr(gen, "export_merged"):
        print(f"error: {gen_dir} holds a {type(gen).__name__}; export-merged is for hf-causal generators",
              file=sys.stderr)
        return 2
    print(f"merged generator -> {gen.export_merged(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
