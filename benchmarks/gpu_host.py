"""For the GPU checks and train_bench, which can run on a bare CUDA machine with torch + transformers but no
FAISS, Ray or MLflow."""
from __future__ import annotations

import importlib
import sys
import types


def stub_missing_faiss(import_first: tuple[str, ...] = ()) -> None:
    """pipeline.index imports faiss at module level; the GPU checks never search with it. Where faiss is missing,
    install a module whose attributes read at import time (METRIC_*, IO_FLAG_*) are 0. `import_first`: modules that
    check for FAISS themselves, imported before the stub so they see it missing."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        for name in import_first:
            importlib.import_module(name)
        class _NoFaiss(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("_"):
                    raise AttributeError(name)
                return 0

        sys.modules["faiss"] = _NoFaiss("faiss")
