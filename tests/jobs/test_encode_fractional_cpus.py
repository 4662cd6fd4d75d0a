"""jobs.encode on a cluster with less than one CPU free (issue #4, refresh during training).

On a 2-CPU machine a training run holds 1 CPU per train worker and the background refresh build a fraction; the
encode it runs must fit in what is left. `ray.data.read_parquet` could not: in Ray 2.60 its file-listing (or
sampling) task always reserves one whole CPU, whatever num_cpus says, so the re-encode waited forever.
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

HANG_GUARD_S = 240          # a generous bound on a job that takes seconds: a hang guard, not a timing assertion


def _write_row_group_shards(d, shards=2, per_shard=14, row_group_size=4):
    """Shards of several row groups each, integer ids in one shard and strings in the other, and an empty shard."""
    d.mkdir()
    rows = []
    for s in range(shards):
        part = [{"id": s * 1000 + i if s == 0 else f"s{s}-{i:03d}", "title": f"Title {i}" if i % 2 else None,
                 "text": f"Passage {i} of shard {s} talks about the number {i * 7 + s}."} for i in range(per_shard)]
        rows += part
        pq.write_table(pa.Table.from_pylist(part), d / f"passages-{s:05d}.parquet", row_group_size=row_group_size)
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                             "text": pa.array([], pa.string())}), d / f"passages-{shards:05d}.parquet")
    return rows


@pytest.mark.ray
def test_encode_runs_with_less_than_one_cpu_free(ray_local, tmp_path):
    import ray

    from jobs.encode import encode_passages, load_embeddings

    rows = _write_row_group_shards(tmp_path / "passages")
    out = tmp_path / "emb"
    total = ray.cluster_resources()["CPU"]
    hold = total - 0.5                               # like a train worker (1 CPU on the 2-CPU fixture)

    @ray.remote(num_cpus=hold)
    class CpuHolder:
        def ping(self):
            return True

    holder = CpuHolder.remote()
    ref = None
    try:
        assert ray.get(holder.ping.remote(), timeout=120)
        # the refresh build task's shape: the encode's driver is itself a task with a fraction of a CPU
        ref = ray.remote(encode_passages).options(num_cpus=0.1).remote(
            str(tmp_path / "passages"), str(out), batch_size=8, encode_batch_size=8, num_actors=1,
            threads_per_actor=1, cpus_per_actor=0.1, read_cpus=0.1, block_mb=0.001)
        ready, _ = ray.wait([ref], timeout=HANG_GUARD_S)
        assert ready, (f"the encode did not finish with {total - hold:g} CPU free beside a {hold:g}-CPU holder: "
                       f"some task of it asks for more than the 0.1 CPU it was given")
        stats = ray.get(ref)
    finally:
        if ref is not None:
            ray.cancel(ref, force=True)
        ray.kill(holder)

    assert stats["count"] == len(rows) and stats["dim"] == 384
    assert stats["shards_encoded"] == 2 and stats["shards_skipped"] == 0
    assert [s["rows"] for s in stats["shards"]] == [14, 14, 0]
    ids, emb = load_embeddings(out)
    assert sorted(ids) == sorted(str(r["id"]) for r in rows) and emb.shape == (len(rows), 384)
    summary = json.loads((out / "embeddings.json").read_text())
    assert summary["count"] == len(rows)
