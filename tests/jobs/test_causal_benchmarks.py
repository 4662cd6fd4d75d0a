"""The causal-generator benchmarks stay runnable: benchmarks/causal_gpu_check.py's CPU dry run (--tiny --device cpu)
trains the adapters through the project's step and writes its figures, and the model-FLOPs formula counts what its
docstring says."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_gpu_check_dry_run_on_cpu_writes_consistent_figures(tmp_path):
    from benchmarks.causal_gpu_check import main

    out = tmp_path / "check.json"
    assert main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                 "--words", "40", "--max-source-length", "64", "--peak-tflops", "2.0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["checks"] == {"losses_finite": True, "adapters_moved": True, "base_unchanged": True}
    params = r["model"]["parameters"]
    assert 0 < params["trainable"] == params["lora"] < params["body"] < params["total"]
    assert r["k"] == 5 and r["estimator"] == "rag-sequence" and r["tokens_per_s"] > 0
    # MFU is the achieved model FLOP rate over the given peak
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 2.0)
    # refused: the realistic size on CPU
    assert main(["--device", "cpu", "--out", str(tmp_path / "no.json")]) == 1


def test_step_flops_counts_frozen_weights_at_4n_and_trained_ones_at_6n():
    from benchmarks.causal_common import step_flops

    counts = {"body": 1000, "lora": 100, "lm_head": 50}
    lengths, answers = [10, 20], [2, 3]
    attention = 12 * 2 * 8 * (10 * 10 + 20 * 20)
    lora = step_flops(counts, lengths, answers, num_layers=2, hidden=8, full_finetune=False)
    full = step_flops(counts, lengths, answers, num_layers=2, hidden=8, full_finetune=True)
    assert lora == (4 * 900 + 6 * 100) * 30 + 4 * 50 * 5 + attention
    assert full == 6 * 1000 * 30 + 6 * 50 * 5 + attention
