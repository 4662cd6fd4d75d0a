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
