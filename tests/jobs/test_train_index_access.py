"""Index access in training workers: the memory-mapped version, or search through index-shard actors
(index.search_shards) with the scored rows read from the memory-mapped embeddings: same retrieval, same scores."""
import numpy as np
import pytest
import torch

from pipeline.config import load_config


@pytest.mark.ray
def test_sharded_train_index_retrieves_and_scores_like_the_mapped_one(ray_local, tmp_path):
    from jobs.train import ShardedTrainIndex, open_train_index
    from pipeline.index import write_index_version
    from pipeline.rag import RagModel

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    write_index_version(tmp_path / "index", emb, [f"p{i}" for i in range(300)], "flat", encoder_name="x",
                        encoder_fingerprint="x", corpus_fingerprint="x", titles=[""] * 300,
                        texts=[f"passage {i}" for i in range(300)])
    mapped = open_train_index(tmp_path / "index", load_config(None, []))
    sharded = open_train_index(tmp_path / "index", load_config(None, ["index.search_shards=3"]))
    assert isinstance(sharded, ShardedTrainIndex) and len(sharded.sharded.shards) == 3
    assert not isinstance(mapped, ShardedTrainIndex)
    a = RagModel(torch.nn.Identity(), torch.nn.Identity(), mapped, tau=0.1)
    b = RagModel(torch.nn.Identity(), torch.nn.Identity(), sharded, tau=0.1)
    q = torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32))
    rows_a, rows_b = a.search_rows(q, 5), b.search_rows(q, 5)
    assert np.array_equal(rows_a, rows_b)
    assert torch.allclose(a.score_rows(q, rows_a), b.score_rows(q, rows_b))
    assert a.candidates(rows_a, q).texts == b.candidates(rows_b, q).texts
    assert b.index.version == mapped.version and b.index.manifest["count"] == 300
    sharded.shutdown()
