"""`latentrag train` -> `latentrag eval` through the CLI on a tiny causal model with LoRA (a tiny Qwen2 saved to a tmp
dir and named by path as generator.name_or_path), on the shared local Ray: 4 JSA steps, then eval of the checkpoint
gives the train job's own final predictions."""
import json

import pytest
from test_hf_causal_helpers import save_tiny_base
from testlib import PASSAGES

QA = [("Where was Varnel Ostrik born?", "Meridale", "a"), ("Who employed Varnel Ostrik?", "Quendle Guild", "b"),
      ("What does Kela Dorn play?", "zumbrel", "c"), ("Where did Kela Dorn grow up?", "Ashvane", "d")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.ray
def test_train_then_eval_a_lora_causal_generator_through_the_cli(ray_local, tmp_path, monkeypatch):
    import torch

    from jobs import cli
    from pipeline.models.generator import load_generator
    from serving.loading import load_generator_part, resolve_model_ref

    base = save_tiny_base(tmp_path / "tiny-qwen2", "qwen2", pad=False)
    corpus = _jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a, "gold_passage_ids": [g]} for q, a, g in QA])
    out = tmp_path / "train"
    settings = ["generator.kind=hf-causal", f"generator.name_or_path={base}", "generator.lora.r=4",
                "generator.lora.alpha=8", "generator.lora.target_modules=q_proj,v_proj",
                "generator.max_source_length=64", "generator.max_target_length=6", "generator.lr=1e-2",
                "train.batch_size=2", "train.k=2", "eval.k=2", "train.warmup_steps=0", "train.log_every=1",
                "train.cpus_per_worker=1", "train.torch_threads=1", "estimator.jsa_num_proposals=2"]
    rc = cli.main(["train", "--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa),
                   "--estimator", "jsa", "--max-steps", "4", "--output-dir", str(out),
                   *[x for s in settings for x in ("--set", s)]])
    assert rc == 0
    gen_dir = out / "checkpoint" / "generator"
    meta = json.loads((gen_dir / "generator.json").read_text())
    assert meta["kind"] == "hf-causal" and meta["lora"]["r"] == 4 and meta["base"] == str(base)
    assert (gen_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (gen_dir / "base").exists() and not (gen_dir / "model").exists()     # adapter only
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["estimator"] == "jsa" and trained["num_questions"] == len(QA)

    ev = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint"), "--eval-qa", str(qa),
                     "--output-dir", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["num_questions"] == len(QA) and metrics["k"] == 2

    def answers(path):
        return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]

    assert answers(ev / "predictions.jsonl") == answers(out / "predictions.jsonl")

    # MLflow's model/ (what `latentrag serve --checkpoint runs:/<id>/model` loads): base + the trained adapter
    run = json.loads((out / "run.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run["tracking_uri"])
    served = load_generator_part(resolve_model_ref(f"runs:/{run['mlflow_run_id']}/model",
                                                   download_dir=str(tmp_path / "dl")))
    local = load_generator(gen_dir).eval()
    inputs = local.encode_inputs([q for q, _, _ in QA], [p["text"] for p in PASSAGES[:4]])
    labels, _ = local.encode_targets([a for _, a, _ in QA])
    with torch.no_grad():
        trained = local.token_logprobs(inputs, labels)
        assert torch.equal(served.token_logprobs(inputs, labels), trained)
        with local.model.disable_adapter():                              # the adapter did learn something
            assert not torch.allclose(local.token_logprobs(inputs, labels), trained, atol=1e-4)


def test_lora_targets_that_match_nothing_stop_train_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import ray

    from jobs import train

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init called before the generator settings were checked")

    monkeypatch.setattr(ray, "init", refuse)
    base = save_tiny_base(tmp_path / "tiny-llama", "llama")
    corpus = _jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a, _ in QA])
    out = tmp_path / "out"
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa), "--output-dir", str(out),
                     "--set", "generator.kind=hf-causal", "--set", f"generator.name_or_path={base}",
                     "--set", "generator.lora.target_modules=query,value", "--set", "train.k=2", "--set", "eval.k=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "generator.lora.target_modules" in err and "match no module" in err
    assert not out.exists()
