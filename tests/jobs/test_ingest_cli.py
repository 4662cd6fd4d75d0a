import json

import pytest

from jobs.ingest import build_parser, main
from pipeline.data import read_jsonl, read_passages


def _corpus(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_help_on_every_flag():
    parser = build_parser()
    assert parser.description
    for action in parser._actions:
        assert action.help, action.dest


def test_ingest_writes_shards_and_summary(tmp_path, capsys):
    long_text = " ".join(f"w{i}" for i in range(30))
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": 1, "title": "T", "text": long_text}] +
                     [{"id": f"d{i}", "text": f"doc {i}"} for i in range(4)])
    out = tmp_path / "passages"
    rc = main(["--corpus", str(corpus), "--out", str(out), "--chunk-words", "10", "--chunk-overlap", "2",
               "--shard-size", "3"])
    assert rc == 0
    table = read_passages(out)
    ids = table.column("id").to_pylist()
    assert ids[:4] == ["1#0", "1#1", "1#2", "1#3"] and ids[4:] == ["d0", "d1", "d2", "d3"]
    assert set(table.column("doc_id").to_pylist()[:4]) == {"1"}
    manifest = json.loads((out / "passages.json").read_text())
    assert manifest["count"] == 8 and len(manifest["shards"]) == 3
    printed = capsys.readouterr().out
    assert "read 5 rows" in printed and "0 skipped" in printed and "wrote 8 passages" in printed
    assert "3 shard(s)" in printed


@pytest.mark.parametrize("rows, expect", [
    ([{"id": "a", "text": "x"}, '{"id": "b", "text"'], r"corpus.jsonl line 2: malformed JSON"),
    ([{"id": "a", "text": "x"}, {"id": "b"}], 'corpus.jsonl line 2: missing "text"'),
    ([{"id": "a", "text": "x"}, {"text": "y"}], 'corpus.jsonl line 2: missing "id"'),
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], 'corpus.jsonl line 2: duplicate id "a"'),
    ([], "corpus.jsonl: empty file"),
])
def test_ingest_bad_input_exit_2_and_nothing_written(tmp_path, capsys, rows, expect):
    corpus = _corpus(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "passages"
    assert main(["--corpus", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_ingest_unknown_format_exit_2(tmp_path, capsys):
    corpus = tmp_path / "corpus.xml"
    corpus.write_text("<x/>")
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "p")]) == 2
    assert "corpus.xml: unknown format" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_ingest_skip_mode_quarantine(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "a", "text": "x"}, {"id": "b"}, "{oops",
                                                 {"id": "c", "text": "z"}])
    out = tmp_path / "passages"
    assert main(["--corpus", str(corpus), "--out", str(out), "--on-bad-rows", "skip"]) == 0
    assert read_passages(out).column("id").to_pylist() == ["a", "c"]
    quarantine = tmp_path / "passages.quarantine.jsonl"
    bad = read_jsonl(quarantine)
    assert [(b["line"], b["file"]) for b in bad] == [(2, str(corpus)), (3, str(corpus))]
    printed = capsys.readouterr().out
    assert "2 skipped" in printed and str(quarantine) in printed


def test_ingest_skip_mode_all_bad_fails_without_output(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "b"}, {"id": "c"}])
    out = tmp_path / "passages"
    assert main(["--corpus", str(corpus), "--out", str(out), "--on-bad-rows", "skip"]) == 2
    assert "no valid rows" in capsys.readouterr().err
    assert not out.exists()
    assert len(read_jsonl(tmp_path / "passages.quarantine.jsonl")) == 2  # kept for diagnosis


def test_ingest_csv_with_text_field(tmp_path):
    corpus = tmp_path / "passages.csv"
    corpus.write_text("id,passage\n1,hello there\n2,general kenobi\n")
    out = tmp_path / "out"
    assert main(["--corpus", str(corpus), "--text-field", "passage", "--out", str(out)]) == 0
    assert read_passages(out).column("text").to_pylist() == ["hello there", "general kenobi"]


def test_ingest_failed_rerun_keeps_previous_output(tmp_path, capsys):
    good = _corpus(tmp_path / "good.jsonl", [{"id": "a", "text": "x"}])
    bad = _corpus(tmp_path / "bad.jsonl", [{"id": "a"}])
    out = tmp_path / "passages"
    assert main(["--corpus", str(good), "--out", str(out)]) == 0
    assert main(["--corpus", str(bad), "--out", str(out)]) == 2
    assert read_passages(out).column("id").to_pylist() == ["a"]


def test_ingest_refuses_foreign_out_dir(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "a", "text": "x"}])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["--corpus", str(corpus), "--out", str(foreign)]) == 2
    assert "refusing" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep"


def test_ingest_bad_flags_exit_2(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "a", "text": "x"}])
    with pytest.raises(SystemExit) as info:
        main(["--corpus", str(corpus), "--out", str(tmp_path / "p"), "--chunk-words", "10", "--chunk-overlap", "10"])
    assert info.value.code == 2


def test_cli_dispatches_ingest(tmp_path):
    from jobs.cli import main as cli_main

    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "a", "text": "x"}])
    assert cli_main(["ingest", "--corpus", str(corpus), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "passages.json").exists()


@pytest.mark.parametrize("foreign", ["dir", "file"])
def test_refused_out_leaves_no_quarantine_file(tmp_path, capsys, foreign):
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "a", "text": "x"}, {"id": "b"}])
    out = tmp_path / "mine"
    if foreign == "dir":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    else:
        out.write_text("keep")
    assert main(["--corpus", str(corpus), "--out", str(out), "--on-bad-rows", "skip"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert not (tmp_path / "mine.quarantine.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "mine"]


def test_failed_write_after_reading_leaves_no_quarantine_file(tmp_path, capsys):
    # a row "a" split into windows a#0, a#1 collides with a source row named "a#0": refused after the read
    long_text = " ".join(f"w{i}" for i in range(30))
    corpus = _corpus(tmp_path / "corpus.jsonl", [{"id": "a", "text": long_text}, {"id": "a#0", "text": "y"},
                                                 {"id": "bad"}])
    out = tmp_path / "passages"
    assert main(["--corpus", str(corpus), "--out", str(out), "--on-bad-rows", "skip", "--chunk-words", "20",
                 "--chunk-overlap", "5"]) == 2
    assert "collides" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "passages.quarantine.jsonl").exists()


def test_ingest_unterminated_csv_quote_exit_2_with_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text('id,text\np1,"Alpha is red.\np2,Beta is blue.\n')
    out = tmp_path / "p"
    assert main(["--corpus", str(corpus), "--out", str(out)]) == 2
    assert f"{corpus} line 2: unterminated quoted field" in capsys.readouterr().err
    assert not out.exists()
    assert main(["--corpus", str(corpus), "--out", str(out), "--on-bad-rows", "skip"]) == 0
    assert read_passages(out).column("id").to_pylist() == ["p2"]
    assert [b["line"] for b in read_jsonl(tmp_path / "p.quarantine.jsonl")] == [2]


def test_ingest_latin1_csv_names_the_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.csv"
    corpus.write_bytes("id,text\np1,Alpha\np2,Café\n".encode("latin-1"))
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"{corpus} line 3: not valid UTF-8" in err and "at byte" not in err
