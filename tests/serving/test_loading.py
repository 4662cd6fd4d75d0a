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
