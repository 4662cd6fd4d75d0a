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
    import numpy as np
    import torch

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
    enc = m["build"]["encode"]      # the CPU default on the tests' 2-CPU Ray: two one-thread actors
    assert (enc["num_actors"], enc["threads_per_actor"]) == (2, 1)
    # passage-shard order, though the tokenize stage hands the encoder rows sorted by token count
    assert index.ids == [r["id"] for r in rows[25:][::-1] + rows[:25]]

    encoder = TextEncoder("minilm")
    # the vectors of the library's encoder, one passage at a time (no padding)
    by_id = {r["id"]: r for r in rows}
    ref = encoder.encode([passage_text(by_id[i]["title"], by_id[i]["text"]) for i in index.ids], batch_size=1)
    assert float((torch.as_tensor(np.array(index.embeddings)) * ref).sum(1).min()) >= 0.99999
    probe = [rows[i] for i in (0, 1, 17, 33, 49)]
    q = encoder.encode([passage_text(r["title"], r["text"]) for r in probe]).numpy()
    scores, found = index.search(q, 3)
    for r, row, s in zip(probe, found, scores):
        assert index.ids[row[0]] == r["id"]
        assert index.passage(row[0]) == r
        assert s[0] == pytest.approx(1.0, abs=1e-3)

    assert index_main(["--verify", "--out", str(root)]) == 0
    assert '"count": 50' in capsys.readouterr().out


def _write_many_shards(d, shards=4, per_shard=12):
    d.mkdir()
    rows = [{"id": f"p-{i:04d}", "title": "", "text": f"The {COLOURS[i % 10]} {THINGS[i % 5]} number {i} "
             f"was seen near town {i * 7}."} for i in range(shards * per_shard)]
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s * per_shard:(s + 1) * per_shard]), d / f"passages-{s:05d}.parquet")
    return rows


@pytest.mark.ray
def test_encode_killed_mid_job_keeps_finished_shards_and_resumes(ray_local, tmp_path):
    """SIGKILL a real `python -m jobs.encode` driver (attached to the session's Ray) after its first shard is
    committed; the rerun keeps that shard untouched, encodes only the rest, and matches a clean encode."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from jobs.encode import encode_passages
    from pipeline.embeddings import SUMMARY_NAME, load_embeddings

    passages = tmp_path / "passages"
    _write_many_shards(passages)
    out = tmp_path / "emb"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "LATENTRAG_ENCODE_TEST_PAUSE_S": "600", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.encode", "--passages", str(passages), "--out", str(out),
                             "--batch-size", "4"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("emb-*.parquet")) and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(out.glob("emb-*.parquet"))
    assert len(done) == 1 and not (out / SUMMARY_NAME).exists()   # one finished shard, the job never finished
    kept = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in done}

    stats = encode_passages(passages, out, batch_size=4)          # resumes by default
    assert (stats["shards_skipped"], stats["shards_encoded"], stats["encoded"], stats["count"]) == (1, 3, 36, 48)
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob(done[0].name)} == kept
    assert sorted(f.name for f in out.glob("emb-*.parquet")) == [f"emb-passages-{s:05d}.parquet" for s in range(4)]
    assert not list(out.glob(".tmp-*")) and stats["encoder_peak_rss_mb"] > 0
    assert 1 <= stats["encoder_actors_seen"] <= stats["num_actors"] == 2      # the CPU default: one per CPU
    assert stats["actor_busy_seconds"] > 0                                      # where the time went
    assert stats["actor_ready_after_seconds"] > 0 and 0 < stats["actor_utilisation"] <= 1

    again = encode_passages(passages, out)                        # nothing left to do
    assert (again["shards_skipped"], again["encoded"]) == (4, 0)
    clean = encode_passages(passages, tmp_path / "clean", batch_size=16, block_mb=0.01)
    assert clean["output_blocks"] >= 3          # output streams batch by batch, not as one block at the end
    ids, emb = load_embeddings(out)
    ids2, emb2 = load_embeddings(tmp_path / "clean")
    assert ids == ids2 and len(ids) == 48
    np.testing.assert_allclose(emb, emb2, atol=1e-5)
    with pytest.raises(FileExistsError, match="cannot resume .* dtype='float32' but this run has 'float16'"):
        encode_passages(passages, out, dtype="float16")          # resuming with other settings is refused


@pytest.mark.ray
def test_bad_embedding_shards_give_no_index_and_ivfpq_builds_shard_parallel(ray_local, tmp_path):
    import numpy as np

    from jobs.encode import encode_passages
    from pipeline.embeddings import EmbeddingsFormatError
    from jobs.index import build_index, scratch_dir
    from pipeline.index import build_faiss_index, list_versions, load_index

    passages = tmp_path / "passages"
    _write_many_shards(passages, shards=3, per_shard=20)
    root = tmp_path / "index"
    scratch = scratch_dir(root, passages, "minilm")
    with pytest.raises(ValueError, match=r"need 3 logical CPUs, the cluster has 2 on nodes of 2 "
                                         r"\(room for 1 such actor\(s\)\): the job would wait forever"):
        encode_passages(passages, tmp_path / "never", num_actors=1, cpus_per_actor=2)
    encode_passages(passages, scratch)                            # what a crashed build leaves; build_index resumes it
    shard = scratch / "emb-passages-00001.parquet"
    good = pq.read_table(shard)

    ids = good.column("id").to_pylist()
    pq.write_table(good.set_column(0, "id", pa.array(ids[:-1] + ["stranger"])), shard)
    with pytest.raises(EmbeddingsFormatError, match=r"emb-passages-00001.parquet: its ids disagree with passage "
                                                    r"shard passages-00001.parquet .*'stranger'"):
        build_index(passages, root)
    emb = np.asarray(good.column("embedding").combine_chunks().flatten()).reshape(len(ids), -1)[:, :383]
    pq.write_table(pa.table({"id": good.column("id"), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1)), 383)}), shard)
    with pytest.raises(EmbeddingsFormatError, match="emb-passages-00001.parquet: embedding dimension 383 "
                                                    "disagrees with dim 384"):
        build_index(passages, root)
    assert list_versions(root) == [] and not (root / "current").exists()

    pq.write_table(good, shard)
    version = build_index(passages, root, index_type="ivfpq", verify=True, parallel_min_vectors=0)
    index = load_index(version)
    m = index.manifest
    assert m["build"]["build"] == {**m["build"]["build"], "shard_parallel": True, "shards": 3}
    assert m["build"]["encode"]["shards_skipped"] == 3 and not scratch.exists()
    assert index.ids == [f"p-{i:04d}" for i in range(60)]          # shard order, then the order inside a shard
    one = build_faiss_index(np.asarray(index.embeddings), "ivfpq", **{k: v for k, v in m["params"].items()
                                                                       if k != "refine_factor"})
    q = np.asarray(index.embeddings[::7])
    np.testing.assert_array_equal(index.index.search(q, 5)[1], one.search(q, 5)[1])


@pytest.mark.ray
def test_sharded_index_actors_identical_to_unsharded(ray_local, tmp_path):
    import numpy as np

    from jobs.sharded_index import ShardedIndex
    from pipeline.index import IndexMismatchError, load_index, write_index_version

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3001, 32)).astype(np.float32)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    root = tmp_path / "idx"
    write_index_version(root, x, [f"d{i}" for i in range(len(x))], "flat", encoder_fingerprint="enc-a",
                        texts=[f"text {i}" for i in range(len(x))])
    with pytest.raises(IndexMismatchError, match="queried with an encoder whose fingerprint is enc-b"):
        ShardedIndex(root, num_shards=3, expected_encoder_fingerprint="enc-b")
    sharded = ShardedIndex(root, num_shards=3, expected_encoder_fingerprint="enc-a")
    try:
        full = load_index(root)
        for k in (1, 10, 100):
            s_ref, r_ref = full.search(q, k)
            s, r = sharded.search(q, k)
            np.testing.assert_array_equal(r, r_ref)
            np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-6)
        assert sharded.passage(r[0, 0]) == full.passage(r_ref[0, 0])
        assert [b - a for a, b in sharded.bounds] == [1000, 1000, 1001]
    finally:
        sharded.shutdown()


@pytest.mark.ray
def test_refresh_builds_in_background_and_switches_at_a_step_boundary(ray_local, tmp_path):
    """The train loop's hook on one rank: snapshot at step 2, a Ray task re-encodes with the snapshot and builds v2
    while steps go on, the switch happens at a step boundary, and v2 holds the snapshot's vectors."""
    import time

    import numpy as np
    import torch

    from jobs.index import build_index
    from jobs.refresh import make_refresh_hook
    from pipeline.models.assembly import attach_passage_encoder
    from pipeline.config import load_config
    from pipeline.index import current_version, load_index, passage_text
    from pipeline.rag import RagModel

    rows = _write_passages(tmp_path / "passages", n=30)
    root = tmp_path / "index"
    v1 = build_index(tmp_path / "passages", root)
    cfg = load_config(None, ["retriever.train_passage_encoder=true", "index.refresh_schedule=0-:2",
                             "index.rerank_top_m=8", "index.refresh_cpus=0.3", "train.cpus_per_worker=1"])
    model = attach_passage_encoder(RagModel(None, None, load_index(v1)), cfg)
    assert model.rerank_top_m == 8
    with torch.no_grad():                                   # "training" moved the passage encoder
        for p in model.passage_encoder.model.encoder.layer[0].parameters():
            p.mul_(0.9)
    crowded = load_config(None, ["retriever.train_passage_encoder=true", "index.refresh_schedule=0-:2",
                                 "train.cpus_per_worker=2"])
    with pytest.raises(ValueError, match=r"a refresh build needs 3 logical CPUs .* beside the 2 of the train "
                                         r"workers, but the cluster has 2"):
        make_refresh_hook(crowded, v1, tmp_path / "run", rank=0, world=1)
    logged, lines = [], []
    hook = make_refresh_hook(cfg, v1, tmp_path / "run", rank=0, world=1,
                             log_metrics=lambda m, step: logged.append((step, m)), log=lines.append)
    assert hook(model, 1) is None and hook.refresher.in_flight is None
    assert hook(model, 2) is None and hook.refresher.in_flight is not None   # submitted, training goes on
    step, switched = 2, None
    deadline = time.time() + 300
    while switched is None and time.time() < deadline:
        step += 1
        switched = hook(model, step)
        if step % 2 == 1:
            time.sleep(0.5)
    assert switched is not None and switched.endswith("v2"), lines
    assert model.index.version == "v2" and current_version(root) == "v2"
    m = model.index.manifest
    assert m["encoder"] == "passage-encoder@step2" and m["build"]["refresh_step"] == 2
    assert m["encoder_fingerprint"] != load_index(v1).manifest["encoder_fingerprint"]
    probe = [rows[i] for i in (0, 7, 29)]
    fresh = model.passage_encoder.encode([passage_text(r["title"], r["text"]) for r in probe]).numpy()
    got = np.asarray(model.index.embeddings)[[model.index.ids.index(r["id"]) for r in probe]]
    np.testing.assert_allclose(got, fresh, atol=1e-4)                       # v2 = the snapshot's vectors
    stale = np.asarray(load_index(v1).embeddings)[[load_index(v1).ids.index(r["id"]) for r in probe]]
    assert np.abs(stale - fresh).max() > 1e-3
    (s, metrics), = [x for x in logged if "refresh_build_seconds" in x[1]]
    assert s == step and metrics["refresh_steps_on_stale_index"] == step - 2 and metrics["refresh_build_seconds"] > 0
    hook.close()
