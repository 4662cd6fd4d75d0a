"""`latentrag tune`: search-space parsing, scores and best_config.yaml without Ray; then a 4-trial sweep on the
shared local Ray (embedded default, tiny) with its MLflow parent/child runs, heatmap and a best config that trains."""
import json
import sqlite3
from pathlib import Path

import pytest

from pipeline import sweep
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_search_space_parsing(tmp_path):
    cfg, spec = sweep.load_sweep_config(ROOT / "configs" / "tune.yaml", [
        "sweep.generator_lr={loguniform: [1e-4, 1e-2]}", "sweep.num_samples=3", "sweep.estimator=[rag-sequence]",
        "train.max_steps=40"])
    dims = spec.dimensions()
    assert dims["retriever_lr"] == ("grid", [1e-5, 3e-5])
    assert dims["generator_lr"] == ("loguniform", 1e-4, 1e-2)        # "1e-4" (a YAML string) read as a number
    assert dims["estimator"] == ("grid", ["rag-sequence"]) and spec.num_samples == 3
    assert cfg.train.max_steps == 40
    assert sweep.parse_dimension(3e-4, "x") == ("grid", [3e-4])
    assert sweep.parse_dimension({"grid": [1, "2e-3"]}, "x") == ("grid", [1.0, 2e-3])
    for bad in ({"loguniform": [1e-2, 1e-4]}, {"uniform": [0, 1]}, [], ["fast"], [-1e-3]):
        with pytest.raises(ConfigError):
            sweep.parse_dimension(bad, "sweep.generator_lr")
    for bad in (["sweep.mode=three-phase"], ["sweep.metric=loss"], ["sweep.bogus=1"], ["sweep.k={loguniform: [1, 5]}"]):
        with pytest.raises(ConfigError):
            sweep.load_sweep_config(ROOT / "configs" / "tune.yaml", bad)


def test_two_phase_plan():
    cfg, spec = sweep.load_sweep_config(ROOT / "configs" / "tune.yaml",
                                        ["sweep.mode=two-phase", "sweep.phase1_steps=30", "sweep.phase2_steps=20",
                                         "sweep.eval_every=10", "sweep.grace_period=10"])
    (p1,) = sweep.phase_plan(cfg, spec)
    assert p1["dims"]["retriever_lr"] == ("grid", [0.0]) and p1["dims"]["generator_lr"][0] == "grid"
    assert p1["max_t"] == 30 and p1["set"]["train.max_steps"] == 30
    p2 = sweep.second_phase(cfg, spec, 3e-3)
    assert p2["dims"]["generator_lr"] == ("grid", [3e-3]) and p2["dims"]["retriever_lr"] == ("grid", [1e-5, 3e-5])
    assert p2["set"] == {"train.max_steps": 50, "train.generator_warmup_steps": 30}
    assert p2["grace"] == 40                                          # ASHA compares only after the warm-up
    assert sweep.num_trials(p1["dims"], 3) == 6 and sweep.num_trials(p2["dims"], 1) == 2
    c = sweep.trial_config(cfg, {"retriever_lr": 0.0, "generator_lr": 1e-3}, p1["set"])
    assert c.retriever.lr == 0.0 and c.generator.lr == 1e-3 and c.train.max_steps == 30


def test_combined_score_breaks_ties_by_nll_only():
    a = sweep.combined_score({"dev_em": 0.5, "dev_nll": 3.0}, num_questions=8)
    b = sweep.combined_score({"dev_em": 0.5, "dev_nll": 1.0}, num_questions=8)
    c = sweep.combined_score({"dev_em": 0.5 + 1 / 8, "dev_nll": 1e6}, num_questions=8)
    assert a < b < c                                                  # lower nll wins a tie, never more
    assert sweep.combined_score({"dev_nll": 2.0}, "dev_nll", None) == -2.0
    assert sweep.combined_score({}, "dev_em") != sweep.combined_score({}, "dev_em")    # nan


def test_best_config_round_trips_and_is_train_ready(tmp_path):
    cfg, spec = sweep.load_sweep_config(ROOT / "configs" / "tune.yaml", ["sweep.mode=two-phase"])
    p2 = sweep.second_phase(cfg, spec, 3e-3)
    data = {"corpus": str(tmp_path / "passages"), "train_qa": "t.jsonl", "dev_qa": "d.jsonl", "eval_qa": "e.jsonl"}
    out = tmp_path / "best_config.yaml"
    best = sweep.write_best_config(cfg, {"retriever_lr": 3e-5, "generator_lr": 3e-3}, out, p2["set"], data,
                                   output_dir=str(tmp_path / "best"))
    loaded = load_config(out)
    assert loaded.to_dict() == best.to_dict()
    assert loaded.retriever.lr == 3e-5 and loaded.generator.lr == 3e-3
    assert loaded.train.generator_warmup_steps == cfg.train.max_steps          # the two-phase recipe, one run
    assert loaded.data.eval_qa == "e.jsonl" and "sweep" not in out.read_text()
    rows = [{"retriever_lr": 1e-5, "generator_lr": 1e-3, "score": 0.2, "step": 4},
            {"retriever_lr": 3e-5, "generator_lr": 1e-3, "score": 0.3, "step": 2},
            {"retriever_lr": 3e-5, "generator_lr": 3e-3, "score": 0.3, "step": 4},
            {"retriever_lr": 1e-5, "generator_lr": 3e-3, "score": float("nan"), "step": 4}]
    assert sweep.best_row(rows) is rows[2]
    sweep.write_results_csv(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("phase,trial_id,status,retriever_lr")


TINY = ["--set", "data.synthetic_entities=25", "--set", "train.max_steps=6", "--set", "train.batch_size=4",
        "--set", "train.warmup_steps=1", "--set", "train.log_every=2", "--set", "eval.max_questions=8",
        "--set", "sweep.eval_every=3", "--set", "sweep.grace_period=3",
        "--set", "sweep.retriever_lr=[1.0e-5, 3.0e-5]", "--set", "sweep.generator_lr=[1.0e-3, 3.0e-3]"]


@pytest.mark.ray
def test_four_trial_sweep(ray_local, tmp_path):
    from jobs import train, tune

    out = tmp_path / "sweep"
    assert tune.main(["--config", str(ROOT / "configs" / "tune.yaml"), "--output-dir", str(out), *TINY]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["trials"] == 4

    db = sqlite3.connect(out / "mlflow.db")
    parent = summary["parent_run_id"]
    (status,) = db.execute("select status from runs where run_uuid=?", (parent,)).fetchone()
    assert status == "FINISHED"
    children = [r for (r,) in db.execute("select run_uuid from tags where key='mlflow.parentRunId' and value=?",
                                         (parent,))]
    assert len(children) == 4
    pairs = set()
    for run_id in children:
        params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
        pairs.add((float(params["retriever.lr"]), float(params["generator.lr"])))
        keys = {k for (k,) in db.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
        assert {"dev_em", "dev_nll", "score", "loss"} <= keys, keys
        (st,) = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()
        assert st in ("FINISHED", "KILLED")                            # KILLED: stopped early by ASHA
    assert pairs == {(r, g) for r in (1e-5, 3e-5) for g in (1e-3, 3e-3)}

    assert (out / "heatmap.png").stat().st_size > 1000
    assert len((out / "results.csv").read_text().splitlines()) == 5
    best = load_config(out / "best_config.yaml")
    assert (best.retriever.lr, best.generator.lr) in pairs
    assert best.data.corpus and best.data.train_qa and best.data.eval_qa
    artifacts = {p.name for p in (out / "mlartifacts").rglob("*") if p.is_file()}
    assert {"results.csv", "heatmap.png", "best_config.yaml"} <= artifacts

    # --resume: all trials finished, nothing reruns; same parent run
    assert tune.main(["--config", str(ROOT / "configs" / "tune.yaml"), "--output-dir", str(out), "--resume",
                      *TINY]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["parent_run_id"] == parent and again["trials"] == 4
    assert db.execute("select count(*) from tags where key='mlflow.parentRunId' and value=?",
                      (parent,)).fetchone()[0] == 4

    # the best config trains as is (2 steps, reusing the sweep's index)
    assert train.main(["--config", str(out / "best_config.yaml"), "--index", summary["index_dir"],
                       "--set", "train.max_steps=2"]) == 0
    assert json.loads((out / "best" / "metrics.json").read_text())["steps"] == 2
