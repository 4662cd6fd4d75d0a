"""Bad input to the CLI: a clear error naming what and where, exit 2, nothing left behind. No Ray needed."""
import json

import pytest

from jobs import cli, train


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    corpus = _write(tmp_path / "corpus.jsonl", [{"id": "p1", "text": "Alpha is red."}, {"id": "p2", "text": "Beta."}])
    qa = _write(tmp_path / "qa.jsonl", [{"question": "What is Alpha?", "answer": "red"}])
    return corpus, qa


def test_unknown_estimator(files, tmp_path, capsys):
    corpus, qa = files
    out = tmp_path / "out"
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa),
                     "--estimator", "magic", "--max-steps", "1", "--output-dir", str(out)])
    assert rc == 2
    assert "unknown estimator 'magic'" in capsys.readouterr().err
    assert not out.exists()


def test_malformed_qa_names_file_and_line(files, tmp_path, capsys):
    corpus, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    out = tmp_path / "out"
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(bad), "--eval-qa", str(bad),
                     "--max-steps", "1", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl" in err and "line 2" in err
    assert not out.exists()


def test_missing_corpus(files, tmp_path, capsys):
    _, qa = files
    rc = train.main(["--corpus", str(tmp_path / "nope.jsonl"), "--train-qa", str(qa), "--eval-qa", str(qa),
                     "--max-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err


def test_missing_generator_model_path(files, tmp_path, capsys):
    corpus, qa = files
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa), "--max-steps", "1",
                     "--output-dir", str(tmp_path / "out"), "--set", "retriever.encoder=/no/such/model"])
    assert rc == 2 and "/no/such/model" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "ingest", "index", "train", "eval"):
        assert name in out
    assert cli.main(["frobnicate"]) == 2


@pytest.mark.parametrize("command", ["demo", "ingest", "index", "train", "eval", "encode"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "--" in capsys.readouterr().out


# ---------------------------------------------------------------- config files (issue 15 item 4, issue 18 items 9-10)

@pytest.fixture
def no_ray(monkeypatch):
    """Config errors must come before Ray starts: starting it fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init called before the config was checked")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("text, expect", [
    ("train:\n  max_steps: abc\n", "train.max_steps: expected int, got 'abc'"),
    ("train:\n  max_steps: [1, 2]\n", "train.max_steps: expected int, got [1, 2]"),
    ("train:\n  max_steps: 2.5\n", "train.max_steps: expected int, got 2.5 (not a whole number)"),
    ("train:\n  max_stepz: 3\n", "train: unknown key(s) max_stepz (did you mean max_steps?)"),
    ("trian:\n  max_steps: 3\n", "top level: unknown key(s) trian (did you mean train?)"),
    ("index:\n  encode_batch_size: 64\n", "index.encode_batch_size: renamed to index.encode_map_batch_size"),
    ("train:\n  k: 3\n   max_steps: [1\n", "line 3, column 13: not valid YAML: mapping values are not allowed here"),
])
def test_train_config_errors_name_key_and_file_before_ray(files, tmp_path, capsys, no_ray, text, expect):
    corpus, qa = files
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    rc = train.main(["--config", str(config), "--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa),
                     "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {config}" in err and expect in err
    assert "Traceback" not in err and "<unicode string>" not in err
    assert not out.exists()


def test_yaml_numbers_pyyaml_reads_as_strings_reach_the_run_as_numbers(files, tmp_path, capsys, no_ray):
    corpus, qa = files
    config = tmp_path / "run.yaml"
    config.write_text("retriever:\n  lr: 1e-3\n  tau: 5e-2\ntrain:\n  max_steps: 1e2\nestimator:\n  vrag_beta: -1\n")
    rc = train.main(["--config", str(config), "--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa),
                     "--output-dir", str(tmp_path / "out")])
    # max_steps and tau are numbers now, so validation gets past them (no TypeError from comparing a string) to the
    # check after them, estimator.vrag_beta
    err = capsys.readouterr().err
    assert rc == 2 and "estimator.vrag_beta: must be >= 0, got -1.0" in err and "Traceback" not in err


def test_demo_malformed_config_names_file_and_line(tmp_path, capsys, no_ray):
    from jobs import demo

    config = tmp_path / "demo.yaml"
    config.write_text("train:\n\tk: 3\n")
    assert demo.main(["--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{config} line 2, column 1: not valid YAML" in err and "Traceback" not in err


# ---------------------------------------------------------------- index/encode --passages (issue 18 item 10)

@pytest.mark.parametrize("command", ["index", "encode"])
def test_passages_that_is_a_file_says_so_and_names_ingest(files, tmp_path, capsys, no_ray, command):
    corpus, _ = files
    out = tmp_path / "out"
    assert cli.main([command, "--passages", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{corpus} is a file, not a passage directory" in err and "latentrag ingest" in err
    assert "not found" not in err
    assert not out.exists()


def test_missing_passages_directory_names_ingest(tmp_path, capsys, no_ray):
    assert cli.main(["index", "--passages", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "passages directory not found" in err and "latentrag ingest" in err


@pytest.mark.parametrize("setting, key", [("train.k=10", "train.k=10"), ("eval.k=7", "eval.k=7"),
                                          ("retriever.hybrid_k=1", "train.k=2 + retriever.hybrid_k=1")])
def test_k_above_the_corpus_size_is_refused_before_ingest(files, tmp_path, capsys, no_ray, setting, key):
    corpus, qa = files                                   # two passages
    out = tmp_path / "out"
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(qa), "--eval-qa", str(qa), "--max-steps", "1",
                     "--output-dir", str(out), "--set", "train.k=2", "--set", "eval.k=2", "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2 and f"{key}: more passages per question than the corpus {corpus} holds (2)" in err
    assert not out.exists()                              # no config.yaml, passages/, index/ or mlflow.db
