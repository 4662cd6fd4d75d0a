"""jobs.encode.EncoderActor without Ray (the callable Ray Data runs in each actor), and the encode benchmark's
deterministic parts (padding account, index vectors)."""
import numpy as np
import pyarrow as pa


def test_encoder_actor_sorts_by_tokens_and_returns_rows_in_input_order():
    import torch

    from jobs.encode import _ACTOR_COL, _BUSY_COL, _INIT_COL, _RSS_COL, _STARTED_COL, EncoderActor
    from pipeline.index import passage_text

    torch.set_num_threads(1)
    words = "river mountain violin bicycle volcano harbour lantern".split()
    texts = [" ".join(words[(i + j) % 7] for j in range(1 + (i * 5) % 23)) for i in range(11)]
    titles = ["" if i % 3 else f"Title {i}" for i in range(11)]
    ids = [f"doc-{10 - i}" for i in range(11)]                         # ids deliberately not in sorted order
    paths = [f"/x/passages-{i % 2}.parquet" for i in range(11)]
    batch = pa.table({"id": ids, "title": titles, "text": texts, "path": paths})
    actor = EncoderActor("minilm", threads=1, encode_batch_size=4, device="cpu")
    lengths = [len(i) for i in actor.tokenize([passage_text(t, x) for t, x in zip(titles, texts)])["input_ids"]]
    assert len(set(lengths)) > 5                                      # the sort has something to do
    out = actor(batch)
    assert out.column("id").to_pylist() == ids
    assert out.column("path").to_pylist() == batch.column("path").to_pylist()
    emb = np.asarray(out.column("embedding").combine_chunks().flatten()).reshape(11, -1)
    ref = actor.encoder.encode([passage_text(t, x) for t, x in zip(titles, texts)], batch_size=1).numpy()
    np.testing.assert_allclose(emb, ref, atol=2e-5)                   # padding to a sub-batch changes nothing
    assert out.column(_BUSY_COL)[0].as_py() > 0 and out.column(_INIT_COL)[0].as_py() > 0
    assert out.column(_RSS_COL)[0].as_py() > 0 and out.column(_ACTOR_COL)[0].as_py() > 0
    assert out.column(_STARTED_COL)[0].as_py() > 1e9
    busy = out.column(_BUSY_COL)[0].as_py()
    assert actor(batch.slice(0, 3)).column(_BUSY_COL)[0].as_py() > busy     # cumulative per actor


def test_padding_account_and_index_vectors():
    from benchmarks.encode_bench import index_vectors, padding_accounting

    texts = [" ".join(["harbour"] * (3 + (i * 7) % 40)) for i in range(200)]
    pad = padding_accounting(texts, st_batch_size=16, batch_size=50, encode_batch_size=16)
    assert pad["single_process_tokens_per_real"] >= 1.0 and pad["ray_data_tokens_per_real"] >= 1.0
    whole = padding_accounting(texts, st_batch_size=16, batch_size=200, encode_batch_size=16)
    assert whole["ray_data_tokens_per_real"] <= pad["ray_data_tokens_per_real"]   # bigger sort window, less padding

    rng = np.random.default_rng(1)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    x, q, what = index_vectors(1000, 50, "real-mix", real)
    assert x.shape == (1000, 16) and q.shape == (50, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:300], real)                      # the real vectors first, as they are
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert "300 real" in what and "700" in what
    x, q, what = index_vectors(500, 20, "synthetic", None, d=16)
    assert x.shape == (500, 16) and what.startswith("synthetic")
