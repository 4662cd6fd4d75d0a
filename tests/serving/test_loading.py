"""Resolving what to serve (no Ray): checkpoint directories, index overrides and mismatches, MLflow run URIs laid
out the way `latentrag train` logs them."""
import json
import shutil

import pytest
import yaml

from serving.loading import ServingLoadError, load_generator_part, load_retriever_part, resolve_model_ref


def test_checkpoint_directory_and_index_override(tiny_checkpoints):
    a, b, root = tiny_checkpoints
    ref = resolve_model_ref(str(a))
    assert ref.index_version == "v1" and ref.step == 10 and ref.model_version.startswith("step10-")
    assert ref.index_count == 6 and ref.tau == 0.05
    moved = resolve_model_ref(str(a), index=str(root))           # an index root: its `current` version (v2)
    assert moved.index_version == "v2" and moved.key != ref.key and moved.model_version == ref.model_version
    assert resolve_model_ref(str(b)).model_version != ref.model_version


def test_refusals_name_the_problem(tiny_checkpoints, tmp_path):
    a, _, root = tiny_checkpoints
    with pytest.raises(ServingLoadError, match="not a directory"):
        resolve_model_ref(str(tmp_path / "nope"))
    with pytest.raises(ServingLoadError, match="rag.json"):
        resolve_model_ref(str(tmp_path))
    other = tmp_path / "index"
    shutil.copytree(root / "v1", other / "v1")
    manifest = json.loads((other / "v1" / "manifest.json").read_text())
    manifest["encoder_fingerprint"] = "something-else"
    (other / "v1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServingLoadError, match="fingerprint"):
        resolve_model_ref(str(a), index=str(other / "v1"))


def test_mlflow_run_uri_rebuilds_a_checkpoint(tiny_checkpoints, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    a, _, root = tiny_checkpoints
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run = client.create_run(client.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts")))
    run_id = run.info.run_id
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["output_dir"] = str(root.parent)                        # where the train job built its index
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    # exactly what jobs/train.py logs
    client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    client.log_artifacts(run_id, str(a / "generator"), "model/generator")
    client.log_artifacts(run_id, str(a / "query_encoder"), "model/query_encoder")
    client.log_artifact(run_id, str(root / "v1" / "manifest.json"), "model/index")

    ref = resolve_model_ref(f"runs:/{run_id}", download_dir=str(tmp_path / "dl"))
    assert ref.index_version == "v1" and ref.index_dir == str((root / "v1").resolve())
    assert ref.source == f"runs:/{run_id}" and ref.tau == cfg["retriever"]["tau"]
    retriever = load_retriever_part(ref)
    assert len(retriever.retrieve(["Where was Varnel Ostrik born?"], 2).ids[0]) == 2
    assert load_generator_part(ref).max_target_length == 8


def test_a_failed_mlflow_resolve_leaves_no_files(tiny_checkpoints, tmp_path, monkeypatch):
    """No `latentrag-serve-*` download directory and no `mlflow.db` in the working directory after a runs:/ URI
    that cannot be served: without a tracking URI, and with one whose run does not exist."""
    import tempfile

    from mlflow.tracking import MlflowClient

    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ServingLoadError, match="MLFLOW_TRACKING_URI"):
        resolve_model_ref("runs:/0123456789abcdef")
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == []

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    MlflowClient().search_experiments()                          # the store exists, the run does not
    with pytest.raises(ServingLoadError, match="cannot download"):
        resolve_model_ref("runs:/0123456789abcdef")
    with pytest.raises(ServingLoadError):
        resolve_model_ref("runs:/0123456789abcdef", download_dir=str(tmp_path / "dl"))
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == [] and list((tmp_path / "dl").iterdir()) == []


def test_public_versions_hold_no_paths(tiny_checkpoints):
    a, _, root = tiny_checkpoints
    ref = resolve_model_ref(str(a))
    assert set(ref.public()) == {"model_version", "index_version", "step"}
    assert str(root) not in json.dumps(ref.public()) and str(a) not in json.dumps(ref.public())
    assert ref.admin()["checkpoint"] == str(a)                   # what a reload's (authenticated) answer shows


def test_an_unresolvable_mlflow_uri_names_the_tracking_uri_and_how_to_set_it(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    MlflowClient().search_experiments()                          # the store exists, the model does not
    with pytest.raises(ServingLoadError) as err:
        resolve_model_ref("models:/nobody@champion", download_dir=str(tmp_path / "dl"))
    assert f"sqlite:///{db}" in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    assert "--tracking-uri" in str(err.value)


def test_a_checkpoint_finds_its_index_after_the_run_directory_moved(tmp_path):
    """rag.json's reference relative to the run directory, checked by fingerprint; the error names what is
    missing and --index."""
    import torch
    from serve_testlib_ckpt import tiny_model

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config

    run = tmp_path / "run"
    model = tiny_model(run / "index")
    cfg = Config(output_dir=str(run))
    ckpt = save_checkpoint(run / "checkpoint", model, cfg, step=3)
    meta = json.loads((ckpt / "rag.json").read_text())
    assert meta["index_ref"]["run_relative"] == "index/v1" and meta["index_ref"]["embeddings_sha256"]
    before = resolve_model_ref(str(ckpt))
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(run), str(moved))
    ref = resolve_model_ref(str(moved / "checkpoint"))
    assert ref.index_dir == str((moved / "index" / "v1").resolve()) and ref.index_version == before.index_version
    q = ["Where was Varnel Ostrik born?"]
    with torch.no_grad():
        assert load_retriever_part(ref).retrieve(q, 3).ids == model.eval().retrieve(q, 3).ids
    # another index in the relative place is not taken
    shutil.move(str(moved / "index"), str(tmp_path / "kept"))
    tiny_model(moved / "index", passages=2)
    with pytest.raises(ServingLoadError, match="another index") as err:
        resolve_model_ref(str(moved / "checkpoint"))
    assert "--index" in str(err.value) and "index/v1" in str(err.value)
    assert resolve_model_ref(str(moved / "checkpoint"), index=str(tmp_path / "kept" / "v1")).index_count == 6


def test_serving_answers_and_scores_as_evaluation_with_a_trained_passage_encoder(tmp_path):
    """Train-serve parity: a checkpoint with a passage encoder (different from the index's) and re-rank, eval
    settings k=3, thorough, 2 beams, rag-token: the serving code path (loading + _retrieve_group +
    _decode_group, with the request defaults) gives evaluation's passages, scores and answers."""
    import torch
    from serve_testlib_ckpt import tiny_model

    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.config import Config
    from pipeline.evaluation import evaluate
    from pipeline.models.assembly import attach_passage_encoder
    from pipeline.rag import RagModel
    from pipeline.synthetic import generate_knowledge_base
    from serving.app import _decode_group, _retrieve_group
    from serving.batching import AnswerItem, RetrieveItem
    from serving.schemas import AnswerRequest, ServeArgs
    from serving.loading import app_defaults, request_defaults

    kb = generate_knowledge_base(seed=0, num_entities=12)
    model = tiny_model(tmp_path / "index", passages=kb.passages)
    cfg = Config(output_dir=str(tmp_path))
    cfg.index.rerank_top_m = 30                    # > the 20 evaluation retrieves for recall: it re-ranks too
    cfg.eval.k, cfg.eval.decode, cfg.eval.num_beams, cfg.train.estimator = 3, "thorough", 2, "rag-token"
    attach_passage_encoder(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():                          # a passage encoder that has moved away from the index's
        for p in model.passage_encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, step=5)
    rows = kb.test[:6]
    questions = [r["question"] for r in rows]

    ref = resolve_model_ref(str(ckpt))
    assert (ref.rerank_top_m, ref.eval_k, ref.decode, ref.num_beams, ref.decoder) == (30, 3, "thorough", 2,
                                                                                       "rag-token")
    args = ServeArgs(checkpoint=str(ckpt))
    assert app_defaults(args, ref) == {"default_k": 3, "decode": "thorough"}
    assert app_defaults(ServeArgs(checkpoint=str(ckpt), default_k=2, decode="fast"), ref) == {}
    req = request_defaults(AnswerRequest(question=questions[0]), ref)
    assert (req.mode, req.num_beams) == ("rag-token", 2)
    assert request_defaults(AnswerRequest(question="q", mode="rag-sequence"), ref).mode == "rag-sequence"

    # in-process evaluation of the checkpoint
    loaded, lcfg, _ = load_checkpoint(ckpt)
    loaded.eval()
    _, predictions = evaluate(loaded, rows, k=lcfg.eval.k, estimator=lcfg.train.estimator, decode=lcfg.eval.decode,
                              num_beams=lcfg.eval.num_beams)
    with torch.no_grad():
        cand = loaded.retrieve(questions, 3)
        scores = loaded.doc_scores(questions, cand)

    # the serving code path
    retriever = load_retriever_part(ref)
    assert retriever.passage_encoder is not None and retriever.rerank_top_m == 30
    retrieved = _retrieve_group(retriever, [RetrieveItem(ref.to_dict(), q, ref.eval_k, "r") for q in questions])
    assert [[p["id"] for p in r.passages] for r in retrieved] == cand.ids
    served_scores = torch.tensor([[p["score"] for p in r.passages] for r in retrieved])
    assert torch.allclose(served_scores, scores.float(), atol=1e-5)
    gen = load_generator_part(ref)
    items = [AnswerItem(ref.to_dict(), q, req.mode, ref.eval_k, req.num_beams, None, "r", r)
             for q, r in zip(questions, retrieved)]
    answers = _decode_group(gen, items, thorough=app_defaults(args, ref)["decode"] == "thorough")
    assert [a.answer for a in answers] == [p["prediction"] for p in predictions]

    # without the passage encoder the scores (the index's vectors) are not evaluation's: the check above can fail
    plain = RagModel(retriever.query_encoder, None, retriever.index, tau=ref.tau).eval()
    with torch.no_grad():
        plain_scores = plain.doc_scores(questions, plain.retrieve(questions, 3)).float()
    assert not torch.allclose(plain_scores, scores.float(), atol=1e-3)
