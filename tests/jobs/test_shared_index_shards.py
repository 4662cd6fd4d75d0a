"""Index-shard actors shared by the training workers of a run (jobs.sharded_index with a group): one set per index
version however many processes open it, restarted by Ray when a shard's process dies (same results after), the old
version's set killed at a refresh switch. That a real run's workers share one set and leave none behind is
checked in tests/jobs/test_train_fault_tolerance.py (with a worker killed and restarted)."""
import os
import signal

import numpy as np
import pytest

NS = "latentrag-index"


def _write(root, n=600, d=16, seed=0):
    from pipeline.index import write_index_version

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return write_index_version(root, emb, [f"p{i}" for i in range(n)], "flat", encoder_name="x",
                               encoder_fingerprint="x", corpus_fingerprint="x", texts=[f"t{i}" for i in range(n)])


def _named(prefix):
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NS and a["name"].startswith(prefix))


@pytest.mark.ray
def test_shared_shards_one_set_across_processes_restarted_after_a_kill(ray_local, tmp_path):
    import ray

    from jobs.sharded_index import ShardedIndex, check_shard_room, release_shards
    from pipeline.config import ConfigError, load_config
    from pipeline.index import load_index

    version = _write(tmp_path / "index")
    q = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    ref_scores, ref_rows = load_index(version).search(q, 7)
    mine = ShardedIndex(version, num_shards=3, cpus_per_shard=0.1, group="t-shared")
    try:
        assert mine.names == [f"t-shared/v1/cluster/s{i}of3" for i in range(3)]
        before = mine.shard_memory()
        pids = [m["pid"] for m in before]
        assert len(set(pids)) == 3

        @ray.remote(num_cpus=0)
        def other_worker(path):   # another process of the run opens the same version: it gets the same actors
            index = ShardedIndex(path, num_shards=3, cpus_per_shard=0.1, group="t-shared")
            return [m["pid"] for m in index.shard_memory()], index.search(q, 7)

        other_pids, (s, r) = ray.get(other_worker.remote(str(version)))
        assert other_pids == pids
        np.testing.assert_array_equal(r, ref_rows)
        np.testing.assert_allclose(s, ref_scores, rtol=1e-6, atol=1e-6)
        assert _named("t-shared/") == sorted(mine.names)          # 3 actors, not 6
        # each holds its third of the vectors: the FAISS index's own bytes, not RSS
        assert [m["index_bytes"] for m in before] == [(hi - lo) * 16 * 4 for lo, hi in mine.bounds]
        assert sum(m["index_bytes"] for m in before) == 600 * 16 * 4

        os.kill(pids[1], signal.SIGKILL)                           # a shard's process dies mid-run
        s, r = mine.search(q, 7)                                   # retried on the restarted actor
        np.testing.assert_array_equal(r, ref_rows)
        np.testing.assert_allclose(s, ref_scores, rtol=1e-6, atol=1e-6)
        after = [m["pid"] for m in mine.shard_memory()]
        assert after[0] == pids[0] and after[2] == pids[2] and after[1] != pids[1]

        # a group name reused for another index is refused, not searched
        other = _write(tmp_path / "other", n=300, seed=2)
        with pytest.raises(ValueError, match="another index under the same group name"):
            ShardedIndex(other, num_shards=3, group="t-shared")
    finally:
        released = release_shards("t-shared")
    # shard actors that could never be placed are refused before a run starts, with the setting named
    with pytest.raises(ConfigError, match="index.shard_resource='index'"):
        check_shard_room(load_config(None, ["index.search_shards=2", "index.shard_resource=index"]).index, 0)
    with pytest.raises(ConfigError, match="need 4 logical CPUs beside the 1 of the train workers"):
        check_shard_room(load_config(None, ["index.search_shards=4", "index.cpus_per_shard=1"]).index, 1)
    with pytest.raises(ConfigError, match="index.shard_scope: 'rack'"):
        load_config(None, ["index.shard_scope=rack"])
    assert sorted(released) == sorted(mine.names)
    assert _named("t-shared/") == []


@pytest.mark.ray
def test_refresh_switch_kills_the_old_versions_shared_shards(ray_local, tmp_path):
    import ray

    from jobs.refresh import RefreshHook
    from jobs.sharded_index import ShardedIndex, release_shards
    from pipeline.index import load_index
    from pipeline.refresh import IndexRefresher, parse_refresh_schedule

    root = tmp_path / "index"
    _write(root, seed=0)
    v2 = _write(root, seed=3)              # what the refresh build made
    (root / "current").write_text("v1\n")

    class Builder:                          # submitted at step 1, done at once
        def submit(self, encoder_dir, step):
            return step

        def done(self, handle):
            return True

        def result(self, handle):
            return {"version_dir": str(v2), "build_seconds": 0.0}

    class Model:
        def __init__(self, index):
            self.index, self.passage_encoder = index, None

        def set_index(self, index):
            self.index = index

    def open_index(d):
        return ShardedIndex(d, num_shards=2, cpus_per_shard=0.1, group="t-refresh", scope="node")

    refresher = IndexRefresher(parse_refresh_schedule("1-2:1"), Builder(), tmp_path / "snap",
                               save_fn=lambda enc, d: d.mkdir(parents=True))
    hook = RefreshHook(refresher, root, 0, 1, log=lambda msg: None, open_index=open_index)
    model = Model(open_index(root))
    node = ray.get_runtime_context().get_node_id()
    try:
        assert model.index.names[0] == f"t-refresh/v1/node-{node[:12]}/s0of2"
        assert {m["node_id"] for m in model.index.shard_memory()} == {node}
        assert hook(model, 1) is None                           # snapshot + submit
        assert hook(model, 2) == str(v2)                        # switched
        assert _named("t-refresh/v1/") == []                    # the old version's set is gone
        assert len(_named("t-refresh/v2/")) == 2
        q = np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32)
        np.testing.assert_array_equal(model.index.search(q, 6)[1], load_index(v2).search(q, 6)[1])
    finally:
        release_shards("t-refresh")
    assert _named("t-refresh/") == []
