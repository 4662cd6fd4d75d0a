"""pipeline.index: FAISS builds, version directories, the `current` pointer, loading and verification (no Ray)."""
import json

import numpy as np
import pytest

from pipeline.index import (IndexFormatError, IndexMismatchError, IndexVerificationError, build_faiss_index,
                            current_version, list_versions, load_index, passage_text, resolve_params, set_current,
                            verify_index, write_index_version)

N, D = 2000, 64


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors():
    """Clustered unit vectors (like text embeddings: topics) and noisy queries near some of them."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, D))
    x = _unit(centers[rng.integers(0, 40, N)] + 0.5 * rng.standard_normal((N, D)))
    q = _unit(x[rng.choice(N, 100, replace=False)] + 0.05 * rng.standard_normal((100, D)))
    return x, q


def _ids(n=N):
    return [f"p{i}" for i in range(n)]


def _recall(rows, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows, truth)]))


def test_passage_text():
    assert passage_text("Paris", "is the capital.") == "Paris. is the capital."
    assert passage_text("", "just text") == "just text"
    assert passage_text(None, "just text") == "just text"
    assert passage_text("  ", "just text") == "just text"


def test_flat_is_exact(vectors):
    x, q = vectors
    scores, rows = build_faiss_index(x, "flat").search(q, 10)
    brute = q @ x.T
    truth = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, truth, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_type,min_recall", [("hnsw", 0.9), ("ivfpq", 0.3)])
def test_approximate_recall_vs_flat(vectors, index_type, min_recall):
    x, q = vectors
    _, truth = build_faiss_index(x, "flat").search(q, 10)
    _, rows = build_faiss_index(x, index_type).search(q, 10)
    assert _recall(rows, truth) >= min_recall


def test_ivfpq_refine_through_loaded_index(tmp_path, vectors):
    x, q = vectors
    _, truth = build_faiss_index(x, "flat").search(q, 10)
    idx = load_index(write_index_version(tmp_path, x, _ids(), "ivfpq"))
    scores, rows = idx.search(q, 10)
    assert _recall(rows, truth) >= 0.85  # exact re-scoring of 4k candidates fixes most of PQ's ordering
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q, x[rows]), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_small_corpora_clamp_ivfpq_params():
    p = resolve_params("ivfpq", 50, 384)
    assert p["nlist"] == 1 and p["nprobe"] == 1 and 384 % p["m"] == 0 and 2 ** p["nbits"] <= 50
    x = _unit(np.random.default_rng(1).standard_normal((50, 32)))
    _, rows = build_faiss_index(x, "ivfpq").search(x[:3], 5)
    assert rows.shape == (3, 5) and (rows >= 0).all()
    with pytest.raises(IndexFormatError, match="unknown parameter"):
        build_faiss_index(x, "hnsw", nprobe=3)
    with pytest.raises(IndexFormatError, match="unknown index type"):
        build_faiss_index(x, "annoy")


def test_version_numbering_and_current_pointer(tmp_path, vectors):
    x, _ = vectors
    v1 = write_index_version(tmp_path, x[:100], _ids(100), "flat", encoder_name="minilm", encoder_fingerprint="e1",
                             corpus_fingerprint="c1", titles=["t"] * 100, texts=[f"text {i}" for i in range(100)])
    assert v1.name == "v1" and current_version(tmp_path) == "v1"
    v2 = write_index_version(tmp_path, x[:200], _ids(200), "hnsw", encoder_fingerprint="e1")
    assert v2.name == "v2" and current_version(tmp_path) == "v2"
    assert list_versions(tmp_path) == ["v1", "v2"]
    assert load_index(tmp_path).version == "v2"
    # make_current=False leaves the pointer; set_current moves it back
    v3 = write_index_version(tmp_path, x[:10], _ids(10), "flat", make_current=False)
    assert v3.name == "v3" and current_version(tmp_path) == "v2"
    set_current(tmp_path, "v1")
    idx = load_index(tmp_path)
    assert idx.version == "v1" and len(idx.ids) == 100 and idx.path == v1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    m = idx.manifest
    assert {k: m[k] for k in ("version", "type", "dim", "metric", "count", "corpus_fingerprint",
                              "encoder_fingerprint", "encoder")} == {
        "version": "v1", "type": "flat", "dim": D, "metric": "ip", "count": 100, "corpus_fingerprint": "c1",
        "encoder_fingerprint": "e1", "encoder": "minilm"}
    assert m["created"] and json.loads((v1 / "manifest.json").read_text()) == m
    assert idx.passage(7) == {"id": "p7", "title": "t", "text": "text 7"}
    np.testing.assert_array_equal(idx.embeddings[5], x[5])
    scores, rows = idx.search(x[[3, 9]], 1)
    assert rows[:, 0].tolist() == [3, 9] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        idx.search(np.zeros((1, D + 1), np.float32), 1)
    with pytest.raises(ValueError, match="without passage texts"):
        load_index(v2).passage(0)


def test_encoder_mismatch_refused(tmp_path, vectors):
    x, _ = vectors
    write_index_version(tmp_path, x[:20], _ids(20), encoder_fingerprint="aaaa1111")
    assert load_index(tmp_path, expected_encoder_fingerprint="aaaa1111").version == "v1"
    with pytest.raises(IndexMismatchError) as err:
        load_index(tmp_path, expected_encoder_fingerprint="bbbb2222")
    assert "aaaa1111" in str(err.value) and "bbbb2222" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("embeddings,ids,match", [
    (np.zeros((10, 8), np.float32), _ids(9), "9 ids for 10 embeddings"),
    (np.zeros((10,), np.float32), _ids(10), "2-D"),
    (np.zeros((0, 8), np.float32), [], "empty"),
    (np.full((2, 8), np.nan, np.float32), _ids(2), "NaN"),
    (np.zeros((3, 8), np.float32), ["a", "b", "a"], "unique"),
])
def test_bad_input_leaves_nothing(tmp_path, embeddings, ids, match):
    root = tmp_path / "index"
    with pytest.raises(IndexFormatError, match=match):
        write_index_version(root, embeddings, ids)
    assert not root.exists() or not any(root.iterdir())


def test_bad_texts_length_leaves_nothing(tmp_path):
    with pytest.raises(IndexFormatError, match="texts"):
        write_index_version(tmp_path, np.eye(4, dtype=np.float32), _ids(4), texts=["a", "b"])
    assert not any(tmp_path.iterdir())


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_index(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="current"):
        load_index(tmp_path)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_verify_ok(tmp_path, vectors, index_type):
    x, _ = vectors
    v = write_index_version(tmp_path, x[:500], _ids(500), index_type)
    report = verify_index(v, sample=50)
    assert report["ok"] and report["count"] == 500 and report["sampled_rows"] == 50 and report["checksum_checked"]


def test_verify_detects_corrupted_embeddings(tmp_path, vectors):
    x, _ = vectors
    v = write_index_version(tmp_path, x[:500], _ids(500), "flat")
    emb = np.load(v / "embeddings.npy")
    emb[::2] *= -1
    np.save(v / "embeddings.npy", emb)
    with pytest.raises(IndexVerificationError, match="checksum"):
        verify_index(v)
    # without the checksum the sampled vectors still disagree with the index
    with pytest.raises(IndexVerificationError, match="do not match"):
        verify_index(v, checksum=False)


def test_verify_detects_truncated_embeddings(tmp_path, vectors):
    x, _ = vectors
    v = write_index_version(tmp_path, x[:100], _ids(100), "flat")
    np.save(v / "embeddings.npy", x[:99])
    with pytest.raises(IndexVerificationError, match="counts disagree"):
        verify_index(tmp_path)


# ---------------------------------------------------------------------------------------- shard-parallel + sharded
@pytest.mark.parametrize("index_type", ["flat", "ivfpq"])
def test_parts_merged_in_order_equal_one_build(vectors, index_type):
    from pipeline.index import add_vectors, empty_index, merge_indexes, serialize_index

    x, q = vectors
    params = {"seed": 0} if index_type == "ivfpq" else {}
    empty, _ = empty_index(index_type, len(x), x, **params)
    parts = [add_vectors(serialize_index(empty), x[lo:hi]) for lo, hi in ((0, 700), (700, 1300), (1300, N))]
    merged = merge_indexes(parts)
    assert merged.ntotal == N
    one = build_faiss_index(x, index_type, **params)
    s1, r1 = merged.search(q, 10)
    s2, r2 = one.search(q, 10)
    np.testing.assert_array_equal(r1, r2)          # rows continue across parts: part 2 row 0 is global row 700
    np.testing.assert_allclose(s1, s2, rtol=1e-5)


def test_hnsw_cannot_merge_and_prebuilt_index_must_fit(tmp_path, vectors):
    from pipeline.index import empty_index

    x, _ = vectors
    with pytest.raises(IndexFormatError, match="hnsw index cannot be built shard-parallel"):
        empty_index("hnsw", len(x), x)
    wrong = build_faiss_index(x[:10], "flat")
    with pytest.raises(IndexFormatError, match="prebuilt index holds 10 vectors"):
        write_index_version(tmp_path / "idx", x, _ids(), "flat", index=wrong)
    assert not (tmp_path / "idx").exists() or list_versions(tmp_path / "idx") == []


def test_merge_topk_exact_with_ties_and_padding():
    from pipeline.index import merge_topk

    a = (np.array([[0.9, 0.5, 0.1]], np.float32), np.array([[3, 1, 0]]))
    b = (np.array([[0.5, 0.4]], np.float32), np.array([[7, 9]]))
    c = (np.array([[0.95, -np.inf]], np.float32), np.array([[20, -1]]))   # a shard with fewer than k rows
    s, r = merge_topk([a, b, c], 4)
    assert r.tolist() == [[20, 3, 1, 7]] and s.tolist()[0][:2] == pytest.approx([0.95, 0.9])  # tie 0.5: row 1 first
    s, r = merge_topk([a, c], 6)
    assert r.tolist() == [[20, 3, 1, 0, -1, -1]]
    d = (np.array([[0.2, 1.0]], np.float32), np.array([[5, 6]]))       # l2: smaller is better
    _, r = merge_topk([d, (np.array([[0.1]], np.float32), np.array([[8]]))], 2, metric="l2")
    assert r.tolist() == [[8, 5]]


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_sharded_search_identical_to_unsharded(tmp_path, vectors, num_shards):
    from pipeline.index import IndexShard, merge_topk, shard_bounds

    x, q = vectors
    root = tmp_path / "idx"
    write_index_version(root, x, _ids(), "flat", encoder_fingerprint="enc-a")
    full = load_index(root)
    shards = [IndexShard(root, lo, hi, expected_encoder_fingerprint="enc-a") for lo, hi in shard_bounds(N, num_shards)]
    assert sum(len(s) for s in shards) == N and max(len(s) for s in shards) <= -(-N // num_shards)
    for k in (1, 10, 50):
        s_ref, r_ref = full.search(q, k)
        s, r = merge_topk([sh.search(q, k) for sh in shards], k)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexMismatchError, match="queried with an encoder whose fingerprint is enc-b"):
        IndexShard(root, 0, 10, expected_encoder_fingerprint="enc-b")
    with pytest.raises(ValueError, match="num_shards=2001 is more than the 2000 rows"):
        shard_bounds(N, N + 1)
