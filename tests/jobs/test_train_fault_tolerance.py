"""Ray Train fault tolerance for real: two DDP workers train JSA (per-rank caches in the checkpoints); once a
checkpoint exists the test SIGKILLs one worker process. The run must restart from its last checkpoint, finish
with the planned number of steps, and train exactly the planned example sequence (steps after the checkpoint are
replayed with the same examples, none is lost). The workers search through index-shard actors
(index.search_shards=2): one set shared by both ranks, kept across the worker group's restart, gone after the run."""
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from testlib import minilm_index

from pipeline.config import load_config
from pipeline.index import load_index
from pipeline.training import DataOrder

MAX_STEPS, CKPT_EVERY, BATCH, WORKERS = 10, 3, 2, 2


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
def test_killed_worker_resumes_from_checkpoint_and_loses_no_example(ray_local, tmp_path):
    from jobs.train import run_training
    from pipeline.synthetic import generate_knowledge_base

    kb = generate_knowledge_base(seed=0, num_entities=12)
    index = load_index(minilm_index(tmp_path / "index", kb.passages))
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CKPT_EVERY}",
                             f"train.batch_size={BATCH}", f"train.num_workers={WORKERS}", "train.cpus_per_worker=1",
                             "train.torch_threads=1", "train.trace=true", "train.warmup_steps=1",
                             "train.log_every=2", "train.estimator=jsa", "estimator.jsa_num_proposals=3",
                             "train.k=3", "eval.k=3", "eval.max_questions=4", "generator.max_source_length=64",
                             "index.search_shards=2", "index.cpus_per_shard=0"])
    result: dict = {}

    def run():
        try:
            result["metrics"] = run_training(cfg, out, None, kb.train, None, kb.test, index_dir=str(index.path))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    victim = out / "trace" / "rank1.jsonl"
    killed_pid, deadline = None, time.time() + 600
    while killed_pid is None and thread.is_alive() and time.time() < deadline:
        recs = _records(victim)
        steps = [r["step"] for r in recs if "step" in r and "event" not in r]
        # a checkpoint is registered (Ray Train writes its snapshot after registering one; a checkpoint_* directory
        # alone may still be uploading) and the worker is past it: kill it mid-run
        checkpoints = list((out / "ray_results").glob("*/checkpoint_manager_snapshot.json"))
        if checkpoints and steps and max(steps) >= CKPT_EVERY + 1:
            killed_pid = next(r["pid"] for r in recs if r.get("event") == "start")
            os.kill(killed_pid, signal.SIGKILL)
        time.sleep(0.2)
    assert killed_pid is not None, f"no checkpoint/step to kill at: {result.get('error')}"
    thread.join(timeout=900)
    assert not thread.is_alive() and "error" not in result, result.get("error")

    m = result["metrics"]
    assert m["steps"] == MAX_STEPS
    n = len(kb.train)
    for rank in range(WORKERS):
        recs = _records(out / "trace" / f"rank{rank}.jsonl")
        starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
        assert len(starts) == 2, f"rank {rank}: expected one restart, got {len(starts)} starts"
        first, second = recs[starts[0]], recs[starts[1]]
        assert first["step"] == 0 and second["pid"] != first["pid"]
        before = [r for r in recs[starts[0] + 1:starts[1]]]
        after = [r for r in recs[starts[1] + 1:]]
        resumed_at = second["step"]
        # restarted from a checkpoint (not from scratch), at or before the last step trained before the kill
        assert resumed_at >= CKPT_EVERY and resumed_at % CKPT_EVERY == 0
        assert resumed_at <= len(before)
        assert second["estimator_state_size"] > 0             # this rank's JSA cache came back from the checkpoint
        assert [r["step"] for r in before] == list(range(len(before)))
        assert [r["step"] for r in after] == list(range(resumed_at, MAX_STEPS))
        order = DataOrder(n, BATCH, WORKERS, rank, cfg.train.seed)
        for r in before + after:                                # replayed steps train the same examples
            assert r["indices"] == [order.indices(r["step"], 0)], r["step"]
    # one set of shard actors for both ranks, the same one after the restart (detached: a worker's death does not
    # take the index down), and none left once the run ended
    shard_pids = {tuple(r["index_shard_pids"]) for rank in range(WORKERS)
                  for r in _records(out / "trace" / f"rank{rank}.jsonl") if r.get("event") == "start"}
    assert len(shard_pids) == 1 and len(set(next(iter(shard_pids)))) == 2, shard_pids
    group = json.loads((out / "run.json").read_text())["ray_run_name"]
    assert [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(group)] == []
    deadline = time.time() + 30
    while any(psutil.pid_exists(p) for p in next(iter(shard_pids))) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(psutil.pid_exists(p) for p in next(iter(shard_pids)))
    # the killed worker was one of the first attempt's
    assert killed_pid in {_records(out / "trace" / f"rank{r}.jsonl")[0]["pid"] for r in range(WORKERS)}
    db = sqlite3.connect(out / "mlflow.db")
    (status,) = db.execute("select status from runs where run_uuid=?", (m["mlflow_run_id"],)).fetchone()
    steps_logged = {s for (s,) in db.execute("select step from metrics where run_uuid=? and key='loss'",
                                             (m["mlflow_run_id"],))}
    keys = {k for (k,) in db.execute("select distinct key from metrics where run_uuid=?", (m["mlflow_run_id"],))}
    assert status == "FINISHED" and MAX_STEPS in steps_logged
    assert {"grad_norm/generator", "grad_norm/retriever", "grad_norm/posterior", "examples_per_s",
            "acceptance_rate"} <= keys
