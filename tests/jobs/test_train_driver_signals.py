"""Real signals to the training driver (`python -m jobs.train` in its own process, with its own local Ray).

One run, interrupted twice:
- SIGINT mid-run: exit 130 with a hint that names --resume, the MLflow run KILLED, run.json "interrupted";
  `--resume` continues from the newest reported checkpoint, training exactly the examples an uninterrupted run
  would, in the same MLflow run.
- SIGKILL of that resumed driver (no handler runs): the guard marks the MLflow run KILLED and stops the local Ray
  the driver started; a second `--resume` then finishes the run at the planned step.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from testlib import minilm_index

from jobs.train import plan_resume
from pipeline.synthetic import generate_knowledge_base, write_knowledge_base
from pipeline.training import DataOrder

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS, CKPT_EVERY, BATCH, SEED = 40, 10, 2, 0


@pytest.fixture(scope="module")
def kb_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kb")
    kb = generate_knowledge_base(seed=0, num_entities=12)
    write_knowledge_base(kb, root / "data")
    minilm_index(root / "index", kb.passages)
    return root, len(kb.train)


def _command(root: Path, out: Path, *extra: str) -> list[str]:
    data = root / "data"
    return [sys.executable, "-m", "jobs.train", "--corpus", str(data / "corpus.jsonl"),
            "--train-qa", str(data / "train.jsonl"), "--eval-qa", str(data / "test.jsonl"),
            "--index", str(root / "index"), "--output-dir", str(out), "--max-steps", str(MAX_STEPS),
            "--set", f"train.checkpoint_every={CKPT_EVERY}", "--set", f"train.batch_size={BATCH}",
            "--set", "train.k=3", "--set", "eval.k=3", "--set", "eval.max_questions=4",
            "--set", "train.log_every=1", "--set", "train.torch_threads=1", "--set", "train.trace=true",
            "--set", "generator.max_source_length=64", "--set", f"train.seed={SEED}", *extra]


def _env(ray_tmp: str) -> dict:
    # RAY_TMPDIR: the driver's local Ray is its own, apart from the suite's shared one
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": ray_tmp,
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(cmd: list[str], ray_tmp: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(ray_tmp), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    """Until the worker has trained past `step` and --resume would see the checkpoint at or before it: the
    controller records a reported checkpoint some time after the worker has trained on (under load, steps later)."""
    trace = out / "trace" / "rank0.jsonl"
    newest_expected = step // CKPT_EVERY * CKPT_EVERY
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the driver ended early (rc {proc.returncode})"
        steps = [r["step"] for r in _records(trace) if "event" not in r]
        if steps and max(steps) >= step and _newest_checkpoint(out) >= newest_expected:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} with a checkpoint at {newest_expected} not reached in {timeout}s")


def _newest_checkpoint(out: Path) -> int:
    """The step --resume would continue from now (-1 while nothing is recorded or the snapshot is mid-write)."""
    if not list((out / "ray_results").glob("*/checkpoint_manager_snapshot.json")):
        return -1
    try:
        return plan_resume(out)["step"]
    except (ValueError, OSError, RuntimeError):
        return -1


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _mlflow_status(out: Path, run_id: str) -> str:
    with sqlite3.connect(out / "mlflow.db") as db:
        return db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0]


def _wait_for_attempt(proc: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> int:
    """Until the worker of attempt `n` has started; the step it started at."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the driver ended early (rc {proc.returncode})"
        starts = [r for r in _records(out / "trace" / "rank0.jsonl") if r.get("event") == "start"]
        if len(starts) >= n:
            return starts[n - 1]["step"]
        time.sleep(0.2)
    raise AssertionError(f"attempt {n} did not start in {timeout}s")


def _resumed_at(out: Path) -> int:
    """The step the newest attempt started at (its trace's start record; 0 = not a resume)."""
    return [r for r in _records(out / "trace" / "rank0.jsonl") if r.get("event") == "start"][-1]["step"]


def _check_finished(out: Path, log: Path, n_train: int, run_id: str, attempts: int) -> None:
    """The run ended at MAX_STEPS in the same MLflow run; each resumed attempt started at the newest checkpoint on
    storage (not OUTPUT_DIR/checkpoint, absent until the end, and not step 0) and trained on from there; every
    attempt trained exactly the examples an uninterrupted run would."""
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == MAX_STEPS and m["mlflow_run_id"] == run_id
    assert _mlflow_status(out, run_id) == "FINISHED"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    recs = _records(out / "trace" / "rank0.jsonl")
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    assert len(starts) == attempts
    resumed_at = recs[starts[-1]]["step"]
    assert resumed_at >= CKPT_EVERY and resumed_at % CKPT_EVERY == 0
    assert f"resuming {out} at step {resumed_at} of {MAX_STEPS}" in log.read_text()
    assert [r["step"] for r in recs[starts[-1] + 1:]] == list(range(resumed_at, MAX_STEPS))
    order = DataOrder(n_train, BATCH, 1, 0, SEED)
    for r in recs:
        if "event" not in r:
            assert r["indices"] == [order.indices(r["step"], 0)], r["step"]


@pytest.mark.ray
def test_sigint_then_sigkill_of_the_driver_then_resume_finishes_the_run(kb_files, tmp_path):
    """One run, three attempts (so the suite pays for three driver starts, not four): SIGINT, then the resumed
    attempt SIGKILLed, then a second resume finishes it."""
    root, n_train = kb_files
    out, ray_tmp = tmp_path / "run", tempfile.mkdtemp(prefix="rs", dir="/tmp")

    # SIGINT mid-run: exit 130, a hint naming --resume, MLflow run KILLED, run.json "interrupted", no final output
    log = tmp_path / "first.log"
    proc = _start(_command(root, out), ray_tmp, log)
    _wait_for_step(proc, out, CKPT_EVERY + 3)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "--resume" in text.splitlines()[-1]
    state = json.loads((out / "run.json").read_text())
    run_id = state["mlflow_run_id"]
    assert state["status"] == "interrupted" and _mlflow_status(out, run_id) == "KILLED"
    assert not (out / "checkpoint").exists() and not (out / "metrics.json").exists()

    # --resume, SIGKILLed past its next checkpoint (no handler runs): the guard marks the MLflow run KILLED and
    # stops the local Ray the driver started
    log = tmp_path / "second.log"
    proc = _start(_command(root, out, "--resume"), ray_tmp, log)
    first_resume = _wait_for_attempt(proc, out, 2)
    _wait_for_step(proc, out, first_resume + CKPT_EVERY + 3)
    assert f"resuming {out} at step {first_resume} of {MAX_STEPS}" in log.read_text()
    driver = psutil.Process(proc.pid)
    ray_procs = [p for p in driver.children(recursive=True) if "jobs.guard" not in " ".join(p.cmdline())]
    assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs)     # the driver's own local Ray
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((out / "run.json").read_text())["mlflow_run_id"] == run_id
    deadline = time.time() + 90
    while time.time() < deadline and (_mlflow_status(out, run_id) != "KILLED"
                                      or any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                             for p in ray_procs)):
        time.sleep(0.5)
    assert _mlflow_status(out, run_id) == "KILLED"
    left = [p.pid for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Ray processes of the killed driver still running: {left}"
    assert json.loads((out / "run.json").read_text())["status"] == "killed"

    # --resume again: from the killed attempt's newest checkpoint to the end, in the same MLflow run
    log = tmp_path / "third.log"
    rc = subprocess.run(_command(root, out, "--resume"), cwd=ROOT, env=_env(ray_tmp), stdout=open(log, "w"),
                        stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, log.read_text()[-3000:]
    _check_finished(out, log, n_train, run_id, attempts=3)
    assert _resumed_at(out) >= first_resume + CKPT_EVERY


def test_resume_with_nothing_to_resume_is_refused_before_any_output(kb_files, tmp_path):
    root, _ = kb_files
    out = tmp_path / "empty"
    r = subprocess.run(_command(root, out, "--resume"), cwd=ROOT, env=_env("/tmp"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    assert not out.exists()
