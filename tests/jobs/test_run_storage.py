"""Output directories and checkpoint storage without Ray: a finished run is not silently replaced, OUTPUT_DIR/
checkpoint shares Ray Train's bytes, trainer_state.pt stores mostly-zero optimizer moments row-sparse (exactly),
and the code lineage a run logs."""
import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs import train
from pipeline.checkpoint import load_trainer_state, pack_state, unpack_state
from pipeline.config import ConfigError
from pipeline.tracking import code_lineage, git_commit


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_adamw_state_of_an_embedding_round_trips_bit_for_bit_and_smaller(tmp_path):
    """AdamW on a 30522 x 64 embedding of which a few rows saw tokens: trainer_state.pt keeps those rows only and
    loads back the identical state (a -0.0 in an otherwise zero row included), so a resumed step is the same."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30522, 64)
    head = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW([*emb.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        head(emb(torch.randint(0, 500, (8, 16)))).square().mean().backward()
        opt.step()
    state = {"step": 3, "optimizer": opt.state_dict(), "ranks": [{"rng": {"torch": torch.get_rng_state()}}]}
    state["optimizer"]["state"][0]["exp_avg"][20000, 5] = -0.0
    packed = pack_state(state)
    assert packed["optimizer"]["state"][0]["exp_avg"]["rows"].numel() <= 501      # rows < 500, and 20000
    assert _same(unpack_state(packed), state)
    (tmp_path / "plain").mkdir()
    (tmp_path / "packed").mkdir()
    torch.save(state, tmp_path / "plain" / "trainer_state.pt")
    torch.save(packed, tmp_path / "packed" / "trainer_state.pt")
    loaded = load_trainer_state(tmp_path / "packed")             # weights_only=True, and unpacked
    assert _same(loaded, state)
    assert (tmp_path / "packed" / "trainer_state.pt").stat().st_size * 10 < \
        (tmp_path / "plain" / "trainer_state.pt").stat().st_size
    assert _same(load_trainer_state(tmp_path / "plain"), state)  # an older, unpacked file loads as before

    # the same optimizer continues identically from either
    def step_from(st):
        e2, h2 = torch.nn.Embedding(30522, 64), torch.nn.Linear(64, 64)
        e2.load_state_dict(emb.state_dict())
        h2.load_state_dict(head.state_dict())
        o2 = torch.optim.AdamW([*e2.parameters(), *h2.parameters()], lr=1e-3)
        o2.load_state_dict(st["optimizer"])
        torch.manual_seed(1)
        o2.zero_grad()
        h2(e2(torch.randint(0, 500, (8, 16)))).square().mean().backward()
        o2.step()
        return e2.weight.detach().clone()
    assert torch.equal(step_from(state), step_from(loaded))


def test_a_finished_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    train.check_output_dir(out, resume=False, overwrite=False)          # empty: fine
    (out / "run.json").write_text(json.dumps({"status": "interrupted"}))
    train.check_output_dir(out, resume=False, overwrite=False)          # an interrupted run is not finished
    (out / "run.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(ConfigError, match="--overwrite") as err:
        train.check_output_dir(out, resume=False, overwrite=False)
    assert "--resume" in str(err.value) and "finished" in str(err.value)
    (out / "run.json").unlink()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="metrics.json"):
        train.check_output_dir(out, resume=False, overwrite=False)
    train.check_output_dir(out, resume=True, overwrite=False)
    train.check_output_dir(out, resume=False, overwrite=True)
    with pytest.raises(ConfigError, match="choose one"):
        train.check_output_dir(out, resume=True, overwrite=True)


def test_the_cli_refuses_a_finished_run_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"em": 1.0}')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "Varnel Ostrik was born in Meridale."}) + "\n"
                      + json.dumps({"id": "b", "text": "Kela Dorn plays the zumbrel."}) + "\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Where was Varnel Ostrik born?", "answers": ["Meridale"]}) + "\n")
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa), "--output-dir", str(out),
                     "--set", "train.k=2", "--set", "eval.k=2"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"em": 1.0}


def test_overwrite_clears_the_previous_run_but_keeps_index_and_mlflow(tmp_path):
    out = tmp_path / "run"
    for d in ("checkpoint", "ray_results/train-x/checkpoint_000000", "index/v1", "passages", "trace"):
        (out / d).mkdir(parents=True)
    for f in ("metrics.json", "predictions.jsonl", "run.json", "mlflow.db", "config.yaml"):
        (out / f).write_text("x")
    train.clear_previous_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "index", "mlflow.db", "passages"]


def test_the_kept_checkpoint_shares_ray_trains_bytes(tmp_path):
    """OUTPUT_DIR/checkpoint is a plain directory of hard links to the chosen Ray Train checkpoint: stored once,
    and it outlives Ray deleting its copy (num_to_keep)."""
    ray_ckpt = tmp_path / "ray_results" / "run" / "checkpoint_000001"
    (ray_ckpt / "generator").mkdir(parents=True)
    (ray_ckpt / "rag.json").write_text('{"step": 4}')
    (ray_ckpt / "generator" / "model.safetensors").write_bytes(b"w" * 1000)

    @contextmanager
    def as_directory():
        yield str(ray_ckpt)

    result = SimpleNamespace(checkpoint=SimpleNamespace(as_directory=as_directory))
    final = train._keep_checkpoint(result, use_dev=False, output_dir=tmp_path)
    for rel in ("rag.json", "generator/model.safetensors"):
        assert (final / rel).stat().st_ino == (ray_ckpt / rel).stat().st_ino
    assert (final / "rag.json").stat().st_nlink == 2
    import shutil
    shutil.rmtree(ray_ckpt)
    assert (final / "generator" / "model.safetensors").read_bytes() == b"w" * 1000


def test_code_lineage_names_the_package_and_commit(tmp_path):
    lineage = code_lineage()
    assert lineage["package_version"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(train.__file__).parent, capture_output=True,
                          text=True)
    if head.returncode == 0:                         # this checkout is a git repository
        assert lineage["git_commit"] == head.stdout.strip()
    assert git_commit(tmp_path) is None              # not a repository: absent, not an error


def test_serve_names_the_tracking_uri_of_a_model_it_cannot_find(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.serve import main as serve_main

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(db).search_experiments()                # the store exists; the model does not
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")   # restored after the test
    assert serve_main(["--checkpoint", "models:/nobody@champion", "--tracking-uri", db,
                       "--set", f"download_dir={tmp_path / 'dl'}"]) == 2
    err = capsys.readouterr().err
    assert db in err and "--tracking-uri" in err and "MLFLOW_TRACKING_URI" in err


def test_the_retriever_anchor_is_stored_as_a_reference_when_it_is_the_start_encoder(tmp_path):
    """train.retriever_anchor_kl's frozen start encoder: named (with its fingerprint) instead of 90 MB of weights
    when it is the configured encoder as shipped, and rebuilt bit for bit on load; any other anchor is kept."""
    from pipeline.checkpoint import anchor_by_reference
    from pipeline.models.retriever import TextEncoder

    start = TextEncoder("minilm").state_dict()
    state = {"step": 2, "anchor": {"weight": 0.1, "k": 3, "encoder": start}}
    by_ref = anchor_by_reference(state, "minilm")
    assert by_ref["anchor"]["encoder"]["__start_encoder__"] == "minilm"
    (tmp_path / "a").mkdir()
    torch.save(pack_state(by_ref), tmp_path / "a" / "trainer_state.pt")
    assert (tmp_path / "a" / "trainer_state.pt").stat().st_size < 10_000
    assert _same(load_trainer_state(tmp_path / "a"), state)

    moved = {k: v.clone() for k, v in start.items()}
    key = next(k for k, v in moved.items() if v.is_floating_point())
    moved[key].view(-1)[0] += 1e-3
    kept = anchor_by_reference({"anchor": {"weight": 0.1, "k": 3, "encoder": moved}}, "minilm")
    assert kept["anchor"]["encoder"] is moved
