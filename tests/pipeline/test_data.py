import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import (DataError, chunk_passages, iter_passage_batches, read_corpus, read_jsonl,
                           read_passages, read_qa, write_jsonl, write_passages)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [{"id": "a", "title": "A", "text": "alpha text"}, {"id": "b", "text": "beta text"}]


# ---------------------------------------------------------------- read_corpus: good input

def test_read_corpus_jsonl_fills_title_and_converts_int_ids(tmp_path):
    f = _jsonl(tmp_path / "corpus.jsonl", GOOD + [{"id": 7, "text": "gamma"}])
    rows = read_corpus(f)
    assert rows == [{"id": "a", "title": "A", "text": "alpha text"}, {"id": "b", "title": "", "text": "beta text"},
                    {"id": "7", "title": "", "text": "gamma"}]
    assert rows.num_read == 3 and rows.num_skipped == 0


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "json"])
def test_read_corpus_other_formats(tmp_path, ext):
    f = tmp_path / f"corpus.{ext}"
    if ext == "parquet":
        pq.write_table(pa.table({"id": [1, 2], "title": ["A", None], "text": ["x y", "z"]}), f)
    elif ext == "json":
        f.write_text(json.dumps([{"id": 1, "title": "A", "text": "x y"}, {"id": 2, "text": "z"}]))
    else:
        sep = "," if ext == "csv" else "\t"
        f.write_text(f"id{sep}title{sep}text\n1{sep}A{sep}x y\n2{sep}{sep}z\n")
    assert read_corpus(f) == [{"id": "1", "title": "A", "text": "x y"}, {"id": "2", "title": "", "text": "z"}]


def test_read_corpus_directory_sorted_and_explicit_format(tmp_path):
    _jsonl(tmp_path / "b.jsonl", [{"id": "2", "text": "second"}])
    _jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "first"}])
    assert [r["id"] for r in read_corpus(tmp_path)] == ["1", "2"]
    other = _jsonl(tmp_path / "data.txt", [{"id": "x", "text": "t"}])
    assert read_corpus(other, fmt="jsonl")[0]["id"] == "x"


def test_read_corpus_keeps_source_doc_id(tmp_path):
    f = _jsonl(tmp_path / "corpus.jsonl", [{"id": "p1", "doc_id": 12, "text": "x"}, {"id": "p2", "text": "y"}])
    rows = read_corpus(f)
    assert rows[0]["doc_id"] == "12" and "doc_id" not in rows[1]
    assert [r["doc_id"] for r in chunk_passages(rows)] == ["12", "p2"]


def test_read_corpus_text_field_alias(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,passage\n1,hello world\n")
    assert read_corpus(f, text_field="passage") == [{"id": "1", "title": "", "text": "hello world"}]
    with pytest.raises(DataError, match=r'p\.csv line 2: missing "text"'):
        read_corpus(f)


# ---------------------------------------------------------------- read_corpus: bad input names file and line

@pytest.mark.parametrize("bad_line, reason", [
    ('{"id": "x", "text": ', "malformed JSON"),
    ('{"id": "x"}', 'missing "text"'),
    ('{"id": "x", "text": "   "}', 'empty "text"'),
    ('{"id": "x", "text": null}', 'missing "text"'),
    ('{"id": "x", "text": 5}', '"text" must be a string'),
    ('{"text": "no id"}', 'missing "id"'),
    ('{"id": "", "text": "empty id"}', 'empty "id"'),
    ('{"id": "a", "text": "dup"}', 'duplicate id "a"'),
    ('["not", "an", "object"]', "expected an object"),
])
def test_read_corpus_bad_row_names_file_and_line(tmp_path, bad_line, reason):
    f = _jsonl(tmp_path / "corpus.jsonl", GOOD + [bad_line] + [{"id": "c", "text": "ok"}])
    with pytest.raises(DataError) as info:
        read_corpus(f)
    msg = str(info.value)
    assert "corpus.jsonl line 3: " in msg and reason in msg


def test_blank_lines_keep_physical_line_numbers(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"id": "a", "text": "t"}\n\n\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r'corpus\.jsonl line 4: missing "text"'):
        read_corpus(f)


def test_csv_bad_row_line_counts_header(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("id,text\n1,ok\n2,\n")
    with pytest.raises(DataError, match=r'c\.csv line 3: empty "text"'):
        read_corpus(f)


def test_parquet_bad_row_names_row(tmp_path):
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["1", None], "text": ["ok", "t"]}), f)
    with pytest.raises(DataError, match=r'c\.parquet row 2: missing "id"'):
        read_corpus(f)


def test_duplicate_across_files_names_both(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "first"}])
    _jsonl(tmp_path / "b.jsonl", [{"id": "1", "text": "again"}])
    with pytest.raises(DataError, match=r"b\.jsonl line 1: duplicate id \"1\" \(first seen at .*a\.jsonl line 1\)"):
        read_corpus(tmp_path)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("head.csv", "id,text\n")])
def test_empty_file_is_error(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: empty file"):
        read_corpus(f)


def test_unknown_format_and_missing_path(tmp_path):
    f = tmp_path / "corpus.xml"
    f.write_text("<x/>")
    with pytest.raises(DataError, match=r"corpus\.xml: unknown format"):
        read_corpus(f)
    with pytest.raises(DataError, match="unknown format 'yaml'"):
        read_corpus(f, fmt="yaml")
    with pytest.raises(DataError, match="no such file"):
        read_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no input files"):
        read_corpus(tmp_path)  # only corpus.xml inside


def test_corrupt_parquet_names_file(tmp_path):
    f = tmp_path / "broken.parquet"
    f.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        read_corpus(f)


# ---------------------------------------------------------------- skip mode

def test_skip_mode_quarantines_and_counts(tmp_path):
    f = _jsonl(tmp_path / "corpus.jsonl", GOOD + ['{"id": "x"', {"id": "y"}, {"id": "a", "text": "dup"},
                                                  {"id": "z", "text": "fine"}])
    q = tmp_path / "q.jsonl"
    rows = read_corpus(f, on_bad_rows="skip", quarantine_path=q)
    assert [r["id"] for r in rows] == ["a", "b", "z"]
    assert rows.num_read == 6 and rows.num_skipped == 3 and rows.quarantine_path == str(q)
    bad = read_jsonl(q)
    assert [b["line"] for b in bad] == [3, 4, 5]
    assert all(b["file"] == str(f) for b in bad)
    assert "malformed JSON" in bad[0]["reason"] and bad[0]["raw"] == '{"id": "x"'
    assert 'missing "text"' in bad[1]["reason"] and "duplicate" in bad[2]["reason"]


def test_skip_mode_all_bad_is_still_an_error(tmp_path):
    f = _jsonl(tmp_path / "corpus.jsonl", [{"id": "x"}, {"id": "y"}])
    q = tmp_path / "q.jsonl"
    with pytest.raises(DataError, match="no valid rows"):
        read_corpus(f, on_bad_rows="skip", quarantine_path=q)
    assert len(read_jsonl(q)) == 2


def test_skip_mode_without_quarantine_warns(tmp_path):
    f = _jsonl(tmp_path / "corpus.jsonl", GOOD + [{"id": "y"}])
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        rows = read_corpus(f, on_bad_rows="skip")
    assert rows.num_skipped == 1


# ---------------------------------------------------------------- chunking

def test_chunk_passages_windows_overlap_and_ids():
    words = [f"w{i}" for i in range(250)]
    rows = [{"id": "long", "title": "T", "text": " ".join(words)}, {"id": "short", "title": "", "text": "a b c"}]
    out = chunk_passages(rows, max_words=100, overlap=20)
    long = [r for r in out if r["doc_id"] == "long"]
    assert [r["id"] for r in long] == ["long#0", "long#1", "long#2"]
    assert [r["text"].split()[0] for r in long] == ["w0", "w80", "w160"]
    assert long[-1]["text"].split()[-1] == "w249"
    assert all(r["title"] == "T" for r in long)
    assert all(len(r["text"].split()) <= 100 for r in long)
    assert long[0]["text"].split()[-20:] == long[1]["text"].split()[:20]
    assert out[-1] == {"id": "short", "title": "", "text": "a b c", "doc_id": "short"}


def test_chunk_exact_fit_not_split_and_one_over_is():
    exact = {"id": "e", "text": " ".join(["x"] * 100)}
    assert [r["id"] for r in chunk_passages([exact], 100, 20)] == ["e"]
    over = {"id": "o", "text": " ".join(str(i) for i in range(101))}
    out = chunk_passages([over], 100, 20)
    assert [r["id"] for r in out] == ["o#0", "o#1"] and out[1]["text"].split()[-1] == "100"


def test_chunk_validation_and_collision():
    with pytest.raises(ValueError):
        chunk_passages([], max_words=10, overlap=10)
    with pytest.raises(DataError, match="collides"):
        chunk_passages([{"id": "a", "text": "x " * 30}, {"id": "a#0", "text": "y"}], max_words=10, overlap=0)


# ---------------------------------------------------------------- passages on disk

def _passages(n):
    return [{"id": f"p{i}", "title": f"t{i}", "text": f"text number {i}", "doc_id": f"d{i // 2}"} for i in range(n)]


def test_write_read_round_trip_and_shards(tmp_path):
    out = tmp_path / "passages"
    rows = _passages(25)
    manifest = write_passages(rows, out, shard_size=10)
    assert manifest["count"] == 25 and [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    assert sorted(p.name for p in out.iterdir()) == ["passages-00000.parquet", "passages-00001.parquet",
                                                     "passages-00002.parquet", "passages.json"]
    assert len(manifest["fingerprint"]) == 16
    assert json.loads((out / "passages.json").read_text()) == manifest
    table = read_passages(out)
    assert table.column_names == ["id", "title", "text", "doc_id"]
    assert table.to_pylist() == rows
    batches = list(iter_passage_batches(out, batch_size=7))
    assert [b.num_rows for b in batches] == [7, 7, 7, 4]
    assert [r for b in batches for r in b.to_pylist()] == rows
    assert [b.num_rows for b in iter_passage_batches(out, batch_size=100)] == [25]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_fingerprint_tracks_content(tmp_path):
    a = write_passages(_passages(3), tmp_path / "a")["fingerprint"]
    b = write_passages(_passages(3), tmp_path / "b", shard_size=1)["fingerprint"]
    changed = _passages(3)
    changed[1]["text"] = "different"
    c = write_passages(changed, tmp_path / "c")["fingerprint"]
    assert a == b != c


def test_write_passages_without_doc_id(tmp_path):
    write_passages([{"id": "1", "text": "x"}], tmp_path / "p")
    assert read_passages(tmp_path / "p").column_names == ["id", "title", "text"]


def test_write_passages_replaces_existing_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "p"
    write_passages(_passages(5), out)
    import pipeline.data as data

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data.pq, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_passages(_passages(9), out)
    monkeypatch.undo()
    assert read_passages(out).num_rows == 5  # the old set survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing half-written beside it
    write_passages(_passages(9), out, shard_size=100)
    assert read_passages(out).num_rows == 9
    assert sorted(p.name for p in out.iterdir()) == ["passages-00000.parquet", "passages.json"]


def test_write_passages_refuses_foreign_dir_and_bad_input(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_passages(_passages(2), foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(DataError, match='duplicate passage id "p0"'):
        write_passages(_passages(2) + _passages(1), tmp_path / "dup")
    with pytest.raises(DataError):
        write_passages([], tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_read_passages_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="not a passage directory"):
        read_passages(tmp_path)


# ---------------------------------------------------------------- QA

def test_read_qa_forms(tmp_path):
    f = _jsonl(tmp_path / "qa.jsonl", [
        {"id": "x", "question": "Q1?", "answers": ["a", "b"], "gold_passage_ids": ["p1"]},
        {"question": "Q2?", "answer": "c"},
        {"question": "Q3?", "answers": [1999]},
    ])
    assert read_qa(f) == [
        {"id": "x", "question": "Q1?", "answers": ["a", "b"], "gold_passage_ids": ["p1"]},
        {"id": "q2", "question": "Q2?", "answers": ["c"], "gold_passage_ids": []},
        {"id": "q3", "question": "Q3?", "answers": ["1999"], "gold_passage_ids": []},
    ]


def test_read_qa_csv_and_parquet(tmp_path):
    c = tmp_path / "qa.csv"
    c.write_text('question,answers,gold_passage_ids\nWho?,"[""x"", ""y""]","[""p1""]"\nWhat?,z,\n')
    assert read_qa(c) == [{"id": "q2", "question": "Who?", "answers": ["x", "y"], "gold_passage_ids": ["p1"]},
                          {"id": "q3", "question": "What?", "answers": ["z"], "gold_passage_ids": []}]
    p = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"id": ["a"], "question": ["Q?"], "answers": [["ans"]]}), p)
    assert read_qa(p) == [{"id": "a", "question": "Q?", "answers": ["ans"], "gold_passage_ids": []}]


@pytest.mark.parametrize("bad_line, reason", [
    ('{"answers": ["a"]}', 'missing "question"'),
    ('{"question": "  ", "answers": ["a"]}', 'empty "question"'),
    ('{"question": "Q?"}', 'missing "answers"'),
    ('{"question": "Q?", "answers": []}', 'missing "answers"'),
    ('{"question": "Q?", "answers": [""]}', 'empty "answers"'),
    ('{"question": "Q?", "answers": ', "malformed JSON"),
    ('{"id": "k", "question": "Q?", "answer": "a"}', 'duplicate id "k"'),
])
def test_read_qa_bad_rows_name_file_and_line(tmp_path, bad_line, reason):
    f = _jsonl(tmp_path / "qa.jsonl", [{"id": "k", "question": "ok?", "answer": "y"}, bad_line])
    with pytest.raises(DataError) as info:
        read_qa(f)
    assert "qa.jsonl line 2: " in str(info.value) and reason in str(info.value)


def test_read_qa_empty_file(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match=r"qa\.jsonl: empty file"):
        read_qa(f)


# ---------------------------------------------------------------- write_jsonl

def test_write_jsonl_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "rows.jsonl"
    assert write_jsonl([{"a": 1}, {"b": "é"}], path) == 2
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]

    def rows():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(rows(), path)
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]  # old content intact
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # temp file removed


# ---------------------------------------------------------------- CSV/TSV read strictly (issue 18 item 10)

def test_unterminated_csv_quote_fails_with_file_and_line(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text('id,text\np1,"Alpha is red.\np2,Beta is blue.\np3,Gamma.\n')
    with pytest.raises(DataError, match=r'c\.csv line 2: unterminated quoted field \(a quote opened on line 2'):
        read_corpus(f)


def test_unterminated_csv_quote_is_quarantined_and_the_rows_after_it_kept(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text('id,text\np1,"Alpha is red.\np2,Beta is blue.\n\np3,"Gamma\nspans two lines"\n')
    q = tmp_path / "q.jsonl"
    rows = read_corpus(f, on_bad_rows="skip", quarantine_path=q)
    assert [(r["id"], r["text"]) for r in rows] == [("p2", "Beta is blue."), ("p3", "Gamma\nspans two lines")]
    [bad] = read_jsonl(q)
    assert bad["line"] == 2 and "quote opened on line 2" in bad["reason"] and bad["raw"] == 'p1,"Alpha is red.'


def test_text_after_a_closing_quote_is_a_bad_row(tmp_path):
    f = tmp_path / "c.tsv"
    f.write_text('id\ttext\np1\t"Alpha"x\np2\tBeta\n')
    with pytest.raises(DataError, match=r"c\.tsv line 2: malformed tsv"):
        read_corpus(f)
    rows = read_corpus(f, on_bad_rows="skip", quarantine_path=tmp_path / "q.jsonl")
    assert [r["id"] for r in rows] == ["p2"]


def test_quoted_multiline_field_and_crlf_still_read(tmp_path):
    f = tmp_path / "c.csv"
    f.write_bytes(b'id,text\r\np1,"two\r\nlines"\r\np2,plain\r\n')
    rows = read_corpus(f)
    assert [(r["id"], r["text"]) for r in rows] == [("p1", "two\r\nlines"), ("p2", "plain")]


def test_latin1_csv_names_the_line_not_a_byte_offset(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes("id,text\np1,Alpha\np2,Café au lait\np3,Gamma\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_corpus(f)
    message = str(info.value)
    assert message.startswith(f"{f} line 3: not valid UTF-8 (byte 0xe9") and "at byte" not in message
    rows = read_corpus(f, on_bad_rows="skip", quarantine_path=tmp_path / "q.jsonl")
    assert [r["id"] for r in rows] == ["p1", "p3"]
    assert [b["line"] for b in read_jsonl(tmp_path / "q.jsonl")] == [3]


def test_latin1_qa_csv_and_json_array_name_the_line(tmp_path):
    qa = tmp_path / "qa.csv"
    qa.write_bytes("question,answer\nwho?,Zoë\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"qa\.csv line 2: not valid UTF-8"):
        read_qa(qa)
    arr = tmp_path / "c.json"
    arr.write_bytes('[{"id": "a", "text": "x"},\n {"id": "b", "text": "café"}]\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"c\.json line 2: not valid UTF-8 \(byte 0xe9"):
        read_corpus(arr)


def test_deferred_quarantine_is_written_by_the_caller(tmp_path):
    from pipeline.data import write_quarantine

    f = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "b"}])
    q = tmp_path / "q.jsonl"
    rows = read_corpus(f, on_bad_rows="skip", quarantine_path=q, defer_quarantine=True)
    assert not q.exists() and rows.num_skipped == 1 and rows.bad[0]["line"] == 2
    write_quarantine(rows, q)
    assert read_jsonl(q)[0]["reason"] == 'missing "text"' and rows.quarantine_path == str(q)
    all_bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "b"}])
    with pytest.raises(DataError, match="no valid rows"):
        read_corpus(all_bad, on_bad_rows="skip", quarantine_path=tmp_path / "q2.jsonl", defer_quarantine=True)
    assert len(read_jsonl(tmp_path / "q2.jsonl")) == 1      # the failure's explanation is still written
