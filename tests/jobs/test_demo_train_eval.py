"""End to end on the shared local Ray: demo (synthetic KB -> ingest -> Ray Data encode -> index -> Ray Train ->
eval -> MLflow), then `latentrag eval` on its checkpoint, then `latentrag train --resume` from it."""
import json
import sqlite3

import pytest

from jobs import demo, eval as eval_job, train

TINY = ["--set", "data.synthetic_entities=25", "--set", "train.max_steps=4", "--set", "train.batch_size=4",
        "--set", "train.log_every=2", "--set", "eval.max_questions=12", "--set", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--output-dir", str(out), *TINY]) == 0
    return out


@pytest.mark.ray
def test_demo_writes_metrics_checkpoint_and_mlflow(demo_run):
    m = json.loads((demo_run / "metrics.json").read_text())
    for key in ("em", "f1", "recall@1", "recall@5", "recall@20", "num_questions", "estimator", "index_version"):
        assert key in m, key
    assert m["estimator"] == "rag-sequence" and m["num_questions"] == 12 and m["steps"] == 4
    assert set(m["initial"]) >= {"em", "f1", "recall@1", "recall@5", "recall@20"}
    assert 0.0 <= m["recall@1"] <= 1.0
    ckpt = demo_run / "checkpoint"
    for name in ("rag.json", "config.yaml", "trainer_state.pt", "query_encoder", "generator"):
        assert (ckpt / name).exists(), name
    manifest = json.loads((demo_run / "index" / m["index_version"] / "manifest.json").read_text())
    assert manifest["count"] > 0 and manifest["dim"] == 384
    db = sqlite3.connect(demo_run / "mlflow.db")
    (status,) = db.execute("select status from runs where run_uuid=?", (m["mlflow_run_id"],)).fetchone()
    params = dict(db.execute("select key, value from params where run_uuid=?", (m["mlflow_run_id"],)).fetchall())
    metric_keys = {k for (k,) in db.execute("select distinct key from metrics where run_uuid=?",
                                            (m["mlflow_run_id"],))}
    assert status == "FINISHED"
    assert params["retriever.lr"] != params["generator.lr"]
    assert {"loss", "em", "recall_at_1", "initial_recall_at_1", "grad_norm/retriever"} <= metric_keys
    # the logged model is a loadable checkpoint
    import mlflow.artifacts

    from pipeline.checkpoint import load_checkpoint

    local = mlflow.artifacts.download_artifacts(run_id=m["mlflow_run_id"], artifact_path="model",
                                                tracking_uri=f"sqlite:///{demo_run / 'mlflow.db'}",
                                                dst_path=str(demo_run / "downloaded"))
    model, cfg, meta = load_checkpoint(local)
    assert meta["step"] == 4 and cfg.train.estimator == "rag-sequence" and model.index.version == m["index_version"]


@pytest.mark.ray
def test_eval_cli_on_the_checkpoint(demo_run, tmp_path):
    rc = eval_job.main(["--checkpoint", str(demo_run / "checkpoint"), "--eval-qa", str(demo_run / "data" / "test.jsonl"),
                        "--output-dir", str(tmp_path)])
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_questions"] > 0 and m["estimator"] == "rag-sequence" and m["index_version"]


@pytest.mark.ray
def test_train_cli_resumes_from_checkpoint(demo_run, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(demo_run / "checkpoint", out / "checkpoint")
    data = demo_run / "data"
    rc = train.main(["--corpus", str(demo_run / "passages"), "--train-qa", str(data / "train.jsonl"),
                     "--eval-qa", str(data / "test.jsonl"), "--estimator", "rag-sequence", "--max-steps", "6",
                     "--output-dir", str(out), "--index", str(demo_run / "index"), "--resume",
                     "--set", "train.batch_size=4", "--set", "eval.max_questions=8"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6                       # 4 steps from the demo + 2 more, not 6 from scratch


@pytest.mark.ray
def test_train_with_hybrid_candidates_records_them_and_its_model_loads_them(demo_run, tmp_path):
    """retriever.hybrid_k through the real job: the driver builds the version's BM25 index once, the Ray Train worker
    loads it, metrics say how many candidates were read, and the checkpoint loads with BM25."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.index.bm25 import BM25_DIR

    out, data = tmp_path / "hybrid", demo_run / "data"
    rc = train.main(["--corpus", str(demo_run / "passages"), "--train-qa", str(data / "train.jsonl"),
                     "--eval-qa", str(data / "test.jsonl"), "--estimator", "jsa", "--max-steps", "2",
                     "--output-dir", str(out), "--index", str(demo_run / "index"), "--set", "retriever.hybrid_k=2",
                     "--set", "train.batch_size=2", "--set", "eval.max_questions=4", "--set", "train.k=3",
                     "--set", "eval.k=3", "--set", "estimator.jsa_num_proposals=2"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["hybrid_k"] == 2 and m["candidates"] == 5 and m["initial"]["candidates"] == 5 and m["steps"] == 2
    assert (demo_run / "index" / m["index_version"] / BM25_DIR).is_dir()
    model, cfg, _ = load_checkpoint(out / "checkpoint")
    assert cfg.retriever.hybrid_k == 2 and model.bm25 is not None and model.retrieve(["Who?"], 3).rows.shape == (1, 5)
