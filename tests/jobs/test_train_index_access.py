"""Index access in training workers: the memory-mapped version, or search through index-shard actors
(index.search_shards) with the scored rows read from the memory-mapped embeddings: same retrieval, same scores.
Both, and the in-memory ArrayIndex, are `SearchIndex`es that answer alike (tests/pipeline/test_search_index.py
compares the two that need no Ray)."""
import numpy as np
import pytest
import torch

from pipeline.config import load_config


@pytest.mark.ray
def test_sharded_train_index_retrieves_and_scores_like_the_mapped_one(ray_local, tmp_path):
    from jobs.sharded_index import ShardedIndex, open_search_index
    from pipeline.index import ArrayIndex, LoadedIndex, SearchIndex, write_index_version
    from pipeline.rag import RagModel

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    write_index_version(tmp_path / "index", emb, [f"p{i}" for i in range(300)], "flat", encoder_name="x",
                        encoder_fingerprint="x", corpus_fingerprint="x", titles=[""] * 300,
                        texts=[f"passage {i}" for i in range(300)])
    mapped = open_search_index(tmp_path / "index", load_config(None, []).index.search_shards)
    sharded = open_search_index(tmp_path / "index", load_config(None, ["index.search_shards=3"]).index.search_shards)
    try:
        assert isinstance(sharded, ShardedIndex) and len(sharded.shards) == 3
        assert not isinstance(mapped, ShardedIndex) and isinstance(mapped, LoadedIndex)
        memory = ArrayIndex(emb, mapped.ids, texts=[f"passage {i}" for i in range(300)], titles=[""] * 300)
        for index in (mapped, sharded, memory):
            assert isinstance(index, SearchIndex)
            assert (len(index), index.dim, index.version) == (300, 16, "v1")
        q = torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32))
        a, b, c = (RagModel(torch.nn.Identity(), torch.nn.Identity(), i, tau=0.1) for i in (mapped, sharded, memory))
        rows_a, rows_b, rows_c = a.search_rows(q, 5), b.search_rows(q, 5), c.search_rows(q, 5)
        assert np.array_equal(rows_a, rows_b) and np.array_equal(rows_a, rows_c)
        assert torch.allclose(a.score_rows(q, rows_a), b.score_rows(q, rows_b))
        assert torch.allclose(a.score_rows(q, rows_a), c.score_rows(q, rows_c))
        assert a.candidates(rows_a, q).texts == b.candidates(rows_b, q).texts == c.candidates(rows_c, q).texts
        assert b.index.version == mapped.version and b.index.manifest["count"] == 300
        s_ref, r_ref = mapped.search(q.numpy(), 310)           # beyond the index: padded with row -1 alike
        s, r = sharded.search(q.numpy(), 310)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_allclose(s[:, :300], s_ref[:, :300], rtol=1e-6, atol=1e-6)
        assert (r[:, 300:] == -1).all()
    finally:
        sharded.shutdown()
