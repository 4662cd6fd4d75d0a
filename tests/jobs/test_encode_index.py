"""jobs.encode + jobs.index end to end on the shared local Ray with the embedded MiniLM (about 50 tiny passages)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.index import main as index_main

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
THINGS = ["river", "mountain", "violin", "bicycle", "volcano"]


def _write_passages(d, n=50):
    d.mkdir()
    rows = [{"id": f"doc-{i:03d}", "title": f"{THINGS[i % 5].title()} {i}" if i % 3 else "",
             "text": f"The {COLOURS[i % 10]} {THINGS[(i // 10) % 5]} number {i} was seen near town {i * 7}."}
            for i in range(n)]
    # two shards, ids deliberately not in sorted order within a shard
    half = n // 2
    pq.write_table(pa.Table.from_pylist(rows[half:][::-1]), d / "passages-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:half]), d / "passages-00001.parquet")
    (d / "passages.json").write_text(json.dumps({"count": n, "shards": 2, "fingerprint": "corpus-fp-1"}))
    return rows


def test_missing_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "index"
    assert index_main(["--passages", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
    _write_passages(tmp_path / "passages", n=3)
    assert index_main(["--passages", str(tmp_path / "passages"), "--out", str(out),
                       "--encoder", str(tmp_path / "no-such-model")]) == 2
    assert "encoder model path does not exist" in capsys.readouterr().err and not out.exists()
    assert index_main(["--passages", str(tmp_path / "passages"), "--out", str(out), "--param", "nprobe=4"]) == 2
    assert "unknown parameter(s) nprobe for a flat index" in capsys.readouterr().err and not out.exists()
    assert index_main(["--verify", "--out", str(out)]) == 2


@pytest.mark.ray
def test_encode_and_index_with_minilm(ray_local, tmp_path, capsys):
    from pipeline.index import load_index, passage_text
    from pipeline.models.retriever import TextEncoder, encoder_fingerprint

    rows = _write_passages(tmp_path / "passages")
    root = tmp_path / "index"
    assert index_main(["--passages", str(tmp_path / "passages"), "--out", str(root), "--batch-size", "16",
                       "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"index version: {root / 'v1'}" in out and '"ok": true' in out
    assert sorted(p.name for p in root.iterdir()) == ["current", "v1"]  # scratch embeddings removed

    index = load_index(root, expected_encoder_fingerprint=encoder_fingerprint("minilm"))
    m = index.manifest
    assert (m["version"], m["type"], m["dim"], m["metric"], m["count"]) == ("v1", "flat", 384, "ip", 50)
    assert m["corpus_fingerprint"] == "corpus-fp-1" and m["encoder"] == "minilm"
    assert m["encoder_fingerprint"] == encoder_fingerprint("minilm")
    assert sorted(index.ids) == sorted(r["id"] for r in rows)

    encoder = TextEncoder("minilm")
    probe = [rows[i] for i in (0, 1, 17, 33, 49)]
    q = encoder.encode([passage_text(r["title"], r["text"]) for r in probe]).numpy()
    scores, found = index.search(q, 3)
    for r, row, s in zip(probe, found, scores):
        assert index.ids[row[0]] == r["id"]
        assert index.passage(row[0]) == r
        assert s[0] == pytest.approx(1.0, abs=1e-3)

    assert index_main(["--verify", "--out", str(root)]) == 0
    assert '"count": 50' in capsys.readouterr().out
