"""`latentrag bench <name> [options]`: run a benchmark from benchmarks/ of this source checkout.

    latentrag bench quality --datasets synthetic --seeds 0 1     # estimator comparison (benchmarks/quality.py)
    latentrag bench estimator                                     # step time and gradient variance
    latentrag bench list

The benchmarks live beside the package in the repository (they are not installed): run from a source checkout.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def available() -> dict[str, Path]:
    """name -> script: quality.py is `quality`, estimator_bench.py is `estimator`."""
    if not BENCH_DIR.is_dir():
        return {}
    return {f.stem.removesuffix("_bench"): f for f in sorted(BENCH_DIR.glob("*.py"))
            if f.stem not in HELPERS}


# modules of benchmarks/ that other benchmarks import, not benchmarks themselves
HELPERS = ("__init__", "common", "gpu_host", "causal_common")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    benches = available()
    if not benches:
        print(f"error: no benchmarks/ directory at {BENCH_DIR}: `latentrag bench` runs from a source checkout",
              file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__ + "\nbenchmarks: " + ", ".join(benches))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in benches:
        print(f"error: unknown benchmark {name!r}; choose one of: {', '.join(benches)}", file=sys.stderr)
        return 2
    sys.argv = [str(benches[name]), *rest]
    try:
        runpy.run_path(str(benches[name]), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
