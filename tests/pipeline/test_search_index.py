"""Every `SearchIndex` implementation answers alike: the memory-mapped `LoadedIndex` and the in-memory `ArrayIndex`
here (no Ray); `jobs.sharded_index.ShardedIndex` in tests/jobs/test_train_index_access.py (shared local Ray)."""
import numpy as np
import pytest
import torch

from pipeline.index import ArrayIndex, LoadedIndex, SearchIndex, load_index, write_index_version
from pipeline.rag import RagModel

N, D = 300, 16


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((N, D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(N)]
    titles = [f"T{i}" if i % 3 else "" for i in range(N)]
    texts = [f"passage {i}" for i in range(N)]
    root = tmp_path_factory.mktemp("search-index") / "index"
    write_index_version(root, emb, ids, "flat", encoder_fingerprint="enc", titles=titles, texts=texts)
    return emb, ids, titles, texts, root


@pytest.fixture(scope="module")
def indexes(written):
    emb, ids, titles, texts, root = written
    return {"mapped": load_index(root), "memory": ArrayIndex(emb, ids, texts=texts, titles=titles)}


def test_each_implementation_is_a_search_index(indexes):
    assert isinstance(indexes["mapped"], LoadedIndex)
    for name, index in indexes.items():
        assert isinstance(index, SearchIndex), name
        assert (len(index), index.dim, index.version, len(index.ids)) == (N, D, "v1", N), name
        assert index.manifest["count"] == N and index.manifest["dim"] == D, name

    class SearchOnly:                        # what a duck-typed stand-in used to offer: not enough any more
        ids = ["p0"]

        def search(self, q, k):
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)

    assert not isinstance(SearchOnly(), SearchIndex)


def test_same_rows_scores_passages_and_embeddings(indexes):
    mapped, memory = indexes["mapped"], indexes["memory"]
    q = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
    for k in (1, 7, 50):
        s_ref, r_ref = mapped.search(q, k)
        s, r = memory.search(q, k)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
    _, r_ref = mapped.search(q[:2], N + 3)           # more than the index holds: padded with row -1 alike
    s, r = memory.search(q[:2], N + 3)
    np.testing.assert_array_equal(r, r_ref)
    assert (r[:, N:] == -1).all() and np.isneginf(s[:, N:]).all()
    for row in (0, 1, 2, N - 1):
        assert memory.passage(row) == mapped.passage(row)
    assert memory.passage(1) == {"id": "p1", "title": "T1", "text": "passage 1"}
    np.testing.assert_array_equal(np.asarray(memory.embeddings[[3, 5]]), np.asarray(mapped.embeddings[[3, 5]]))
    with pytest.raises(IndexError, match="out of range"):
        memory.passage(N)
    with pytest.raises(ValueError, match="shape"):
        memory.search(np.zeros((1, D + 1), np.float32), 1)


def test_rag_model_retrieves_and_scores_alike_through_each(indexes):
    q = torch.from_numpy(np.random.default_rng(2).standard_normal((4, D)).astype(np.float32))
    a, b = (RagModel(torch.nn.Identity(), torch.nn.Identity(), indexes[n], tau=0.1) for n in ("mapped", "memory"))
    rows_a, rows_b = a.search_rows(q, 5), b.search_rows(q, 5)
    np.testing.assert_array_equal(rows_a, rows_b)
    assert torch.allclose(a.score_rows(q, rows_a), b.score_rows(q, rows_b))
    ca, cb = a.candidates(rows_a, q), b.candidates(rows_b, q)
    assert ca.ids == cb.ids and ca.texts == cb.texts


def test_array_index_l2_and_ties_by_row(tmp_path, written):
    x = written[0]
    q = x[::37] + 0.1
    mapped_l2 = load_index(write_index_version(tmp_path, x, written[1], "flat", metric="l2"))
    for k in (1, 10):
        s_ref, r_ref = mapped_l2.search(q, k)
        s, r = ArrayIndex(x, metric="l2").search(q, k)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)
    emb = np.array([[1, 0], [0, 1], [1, 0], [3, 0]], np.float32)
    index = ArrayIndex(emb)
    s, r = index.search(np.array([[1, 0]], np.float32), 3)
    assert r.tolist() == [[3, 0, 2]] and s.tolist() == [[3.0, 1.0, 1.0]]   # equal scores: lower row first
    l2 = ArrayIndex(emb, metric="l2")
    s, r = l2.search(np.array([[1, 0]], np.float32), 3)
    assert r.tolist() == [[0, 2, 1]] and s.tolist() == [[0.0, 0.0, 2.0]]   # squared distances, smallest first
    with pytest.raises(ValueError, match="without passage texts"):
        index.passage(0)
