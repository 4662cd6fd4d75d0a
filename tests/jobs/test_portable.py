"""A trained run is portable and registered (ray: in-process on the shared local Ray, 4 steps).

Train a tiny run with `--strategy joint --register tiny --alias champion`; its MLflow run carries the lineage and
`models:/tiny@champion` resolves to its model and is served over HTTP; then move the whole run directory
elsewhere: `latentrag eval`, the serving loading code and the served application from the new place give the
metrics and answers of the train job; a missing index is
named with --index; a finished run is refused without --overwrite, and --overwrite trains it anew."""
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch

from jobs import eval as eval_job, train
from pipeline.checkpoint import load_checkpoint, read_checkpoint_meta
from pipeline.synthetic import generate_knowledge_base, write_knowledge_base

KEYS = ("em", "f1", "recall@1", "recall@5", "recall@20", "num_questions")
N_EVAL = 6


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--corpus", str(data / "corpus.jsonl"), "--train-qa", str(data / "train.jsonl"),
            "--eval-qa", str(data / "eval.jsonl"), "--output-dir", str(out), "--estimator", "rag-sequence",
            "--set", "train.batch_size=2", "--set", "train.k=3", "--set", "eval.k=3", "--set", "train.log_every=2",
            "--set", "train.warmup_steps=1", "--set", "train.torch_threads=1", "--set", "index.threads_per_actor=1",
            "--set", "generator.max_source_length=64", *extra]


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    kb = generate_knowledge_base(seed=0, num_entities=12)
    data = root / "data"
    write_knowledge_base(kb, data)
    with open(data / "eval.jsonl", "w") as f:           # what the train job evaluates (eval.max_questions)
        for r in kb.test[:N_EVAL]:
            f.write(json.dumps(r) + "\n")
    out = root / "place-a" / "run"
    assert train.main(_args(data, out, "--max-steps", "4", "--strategy", "joint", "--register", "tiny",
                            "--alias", "champion")) == 0
    return root, data, out


def _serve_answers(checkpoint: str, questions: list[str], **kw):
    from serving.app import _decode_group, _retrieve_group
    from serving.batching import AnswerItem, RetrieveItem
    from serving.loading import load_generator_part, load_retriever_part, resolve_model_ref

    ref = resolve_model_ref(checkpoint, **kw)
    retrieved = _retrieve_group(load_retriever_part(ref), [RetrieveItem(ref.to_dict(), q, ref.eval_k, "t")
                                                           for q in questions])
    items = [AnswerItem(ref.to_dict(), q, ref.decoder, ref.eval_k, ref.num_beams, None, "t", r)
             for q, r in zip(questions, retrieved)]
    answers = _decode_group(load_generator_part(ref), items, thorough=ref.decode == "thorough")
    return ref, [a.answer for a in answers], [[p["id"] for p in r.passages] for r in retrieved]


def _http_answers(checkpoint: str, questions: list[str], **args) -> list[str]:
    """The answers of `latentrag serve`'s application for `checkpoint`, over HTTP on 127.0.0.1 (Serve on the
    shared Ray; shut down afterwards so the serving tests start their own)."""
    import socket

    import requests
    from ray import serve

    from serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    zero = {name: {"ray_actor_options": {"num_cpus": 0}} for name in ("Ingress", "Retriever", "Generator")}
    try:
        serve.run(build_app({"checkpoint": checkpoint, "generator_threads": 1, **args}, zero), name="portable",
                  route_prefix="/portable")
        out = []
        for q in questions:          # mode, k and beams left to the checkpoint's own eval settings
            r = requests.post(f"http://127.0.0.1:{port}/portable/v1/answer", json={"question": q}, timeout=120)
            assert r.status_code == 200, r.text
            out.append(r.json()["answer"])
        return out
    finally:
        serve.shutdown()


@pytest.mark.ray
def test_lineage_strategy_and_the_registry(run, monkeypatch):
    root, data, out = run
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == "joint" and m["registered_model"] == "tiny" and m["registered_version"] == "1"
    db = sqlite3.connect(out / "mlflow.db")
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (m["mlflow_run_id"],)).fetchall())
    params = dict(db.execute("select key, value from params where run_uuid=?", (m["mlflow_run_id"],)).fetchall())
    manifest = json.loads((out / "index" / m["index_version"] / "manifest.json").read_text())
    assert tags["lineage.corpus_fingerprint"] == manifest["corpus_fingerprint"]
    assert tags["lineage.passage_count"] == str(manifest["count"]) == str(m["lineage"]["passage_count"])
    assert tags["lineage.index_version"] == m["index_version"]
    assert tags["lineage.index_embeddings_sha256"] == manifest["embeddings_sha256"]
    assert tags["lineage.index_encoder_fingerprint"] == manifest["encoder_fingerprint"]
    for key in ("retriever_start_fingerprint", "query_encoder_fingerprint", "generator_fingerprint",
                "package_version"):
        assert tags[f"lineage.{key}"], key
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(train.__file__).parent, capture_output=True,
                          text=True)
    assert tags.get("lineage.git_commit") == (head.stdout.strip() if head.returncode == 0 else None)
    assert params["train.strategy"] == "joint" and params["mlflow.register_as"] == "tiny"

    # models:/NAME@ALIAS end to end against the SQLite store: what serving loads answers as the train job did
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ref, answers, _ = _serve_answers("models:/tiny@champion", [p["question"] for p in predictions],
                                     download_dir=str(root / "dl"))
    assert ref.index_version == m["index_version"] and ref.source == "models:/tiny@champion"
    assert answers == [p["prediction"] for p in predictions]
    # a small index travels inside model/: the download finds it there, not in the run directory
    assert Path(ref.index_dir).is_relative_to((root / "dl").resolve())
    # and `latentrag serve --checkpoint models:/tiny@champion` answers the same over HTTP
    assert _http_answers("models:/tiny@champion", [p["question"] for p in predictions],
                         download_dir=str(root / "dl-http")) == [p["prediction"] for p in predictions]


@pytest.mark.ray
def test_the_checkpoint_is_stored_once(run):
    _, _, out = run
    ckpt = out / "checkpoint"
    ray_copies = [p for p in (out / "ray_results").rglob("rag.json") if p.parent != ckpt]
    assert len(ray_copies) == 1
    for rel in ("rag.json", "trainer_state.pt", "query_encoder/model.safetensors"):
        assert (ckpt / rel).stat().st_ino == (ray_copies[0].parent / rel).stat().st_ino, rel
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    packed = [v for s in state["optimizer"]["state"].values() for v in s.values()
              if isinstance(v, dict) and v.get("__row_sparse__")]
    assert packed and all(v["rows"].numel() * 2 <= v["shape"][0] for v in packed)   # the word embeddings' moments


@pytest.mark.ray
def test_moved_run_evaluates_and_serves_as_before(run, capsys):
    root, data, out = run
    m = json.loads((out / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    new = root / "place-b" / "moved-run"
    new.parent.mkdir()
    shutil.move(str(out), str(new))
    assert not out.exists()

    assert eval_job.main(["--checkpoint", str(new / "checkpoint"), "--eval-qa", str(data / "eval.jsonl"),
                          "--output-dir", str(root / "eval-b")]) == 0
    em = json.loads((root / "eval-b" / "metrics.json").read_text())
    assert {k: em[k] for k in KEYS} == {k: m[k] for k in KEYS} and em["index_version"] == m["index_version"]
    got = [json.loads(line) for line in (root / "eval-b" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in got] == [p["prediction"] for p in predictions]

    ref, answers, ids = _serve_answers(str(new / "checkpoint"), [p["question"] for p in predictions])
    assert Path(ref.index_dir) == (new / "index" / m["index_version"]).resolve()
    assert answers == [p["prediction"] for p in predictions]
    assert [i[0] for i in ids] == [p["top_passage"] for p in predictions]
    assert _http_answers(str(new / "checkpoint"), [p["question"] for p in predictions]) == \
        [p["prediction"] for p in predictions]                            # and over HTTP, as `latentrag serve`
    # MLflow's model/ under the moved run (mlartifacts/<run>/artifacts/model) finds the run's index
    model_dir = next(new.glob("mlartifacts/**/artifacts/model"))
    shutil.rmtree(model_dir / "index")
    model, _, _ = load_checkpoint(model_dir)
    assert Path(model.index.path) == (new / "index" / m["index_version"]).resolve()

    # no index anywhere: the error names what is missing and --index
    shutil.move(str(new / "index"), str(root / "index-kept"))
    assert eval_job.main(["--checkpoint", str(new / "checkpoint"), "--eval-qa", str(data / "eval.jsonl"),
                          "--output-dir", str(root / "eval-c")]) == 2
    err = capsys.readouterr().err
    assert "--index" in err and m["index_version"] in err and "not found" in err
    assert eval_job.main(["--checkpoint", str(new / "checkpoint"), "--eval-qa", str(data / "eval.jsonl"),
                          "--output-dir", str(root / "eval-c"), "--index", str(root / "index-kept")]) == 0
    shutil.move(str(root / "index-kept"), str(new / "index"))
    assert read_checkpoint_meta(new / "checkpoint")["index_ref"]["run_relative"] == f"index/{m['index_version']}"


@pytest.mark.ray
def test_a_finished_run_is_refused_then_overwritten(run, capsys):
    root, data, _ = run
    new = root / "place-b" / "moved-run"
    before = sorted(str(p.relative_to(new)) for p in new.rglob("*"))
    assert train.main(_args(data, new, "--max-steps", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(str(p.relative_to(new)) for p in new.rglob("*")) == before
    old_runs = {p.name for p in (new / "ray_results").iterdir()}
    assert train.main(_args(data, new, "--max-steps", "2", "--overwrite")) == 0
    m = json.loads((new / "metrics.json").read_text())
    assert m["steps"] == 2
    assert not old_runs & {p.name for p in (new / "ray_results").iterdir()}      # the old Ray copies are gone
