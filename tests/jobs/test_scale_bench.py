"""benchmarks/scale_bench.py at tiny sizes (no Ray, seconds): the power-law fit, and the JSON the README's
"Wikipedia scale" table is made from."""
import json

import numpy as np
import pytest


def test_fit_power_law_recovers_a_known_law():
    from benchmarks.scale_bench import fit_power_law, predict

    n = np.array([2e4, 5e4, 1e5, 3e5, 1e6])
    f = fit_power_law(n, 3.0 * n ** 1.5)
    assert f["b"] == pytest.approx(1.5, abs=1e-9) and f["a"] == pytest.approx(3.0, rel=1e-6) and f["r2"] == 1.0
    assert predict(f, 21e6) == pytest.approx(3.0 * 21e6 ** 1.5, rel=1e-6)
    noisy = 0.02 * n ** 0.5 * np.exp(np.random.default_rng(0).normal(0, 0.05, len(n)))
    f = fit_power_law(n, noisy)
    assert f["b"] == pytest.approx(0.5, abs=0.1) and 0.9 < f["r2"] < 1.0
    with pytest.raises(ValueError, match="2 distinct sizes"):
        fit_power_law([1e5, 1e5], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1e5, 2e5], [1.0, 0.0])


def test_tiny_run_writes_what_the_plan_table_needs(tmp_path):
    from benchmarks.scale_bench import NODE_GIB, PLAN_SHARDS, exact_top10, main
    from pipeline.index import write_index_version

    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 32)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    write_index_version(tmp_path / "real", real, [f"p{i}" for i in range(len(real))], "flat")
    # the ground truth is the exact top-10
    q = real[:5] + 0.1
    np.testing.assert_array_equal(exact_top10(real, q)[:, 0], np.argmax(q @ real.T, axis=1))

    out = tmp_path / "scale.json"
    assert main(["--sizes", "12000,24000", "--hnsw-sizes", "12000", "--queries", "50", "--search-batch", "25",
                 "--real-from", str(tmp_path / "real"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and [s["vectors"] for s in r["sizes"]] == [12000, 24000]
    assert "hnsw" in r["sizes"][0] and "hnsw" not in r["sizes"][1]
    for row in r["sizes"]:
        ivf = row["ivfpq"]
        assert ivf["build_cpu_seconds"] == pytest.approx(ivf["train_cpu_seconds"] + ivf["add_cpu_seconds"], abs=0.02)
        assert 0 <= ivf["recall@10"] <= 1 and ivf["search_cpu_ms_per_query"] > 0
        # serialized IVF-PQ: m code bytes + an 8-byte id per vector, plus the coarse centroids (and small tables)
        p = ivf["params"]
        assert ivf["index_bytes"] >= row["vectors"] * (p["m"] + 8) + p["nlist"] * 32 * 4
        assert ivf["index_bytes"] < 1.3 * (row["vectors"] * (p["m"] + 8) + p["nlist"] * 32 * 4) + 2 ** 20
        assert {s["nprobe"] for s in ivf["sweep"]} == {16, 32, 64, 128}
    assert r["sizes"][0]["hnsw"]["index_bytes"] > 12000 * 32 * 4            # HNSW keeps the vectors
    fit = r["fits"]["ivfpq"]["index_bytes"]
    assert fit["points"] == 2 and 0.5 < fit["b"] < 1.2

    plan = r["plan"]["corpora"]
    assert set(plan) == {"21M", "100M"}
    c = plan["21M"]
    assert [s["shards"] for s in c["shards"]] == list(PLAN_SHARDS)
    one, eight = c["shards"][0], c["shards"][1]
    assert one["bytes_per_shard"]["pq_and_float32_vectors"] == pytest.approx(
        c["ivfpq_bytes_fit"] + 21_000_000 * 32 * 4, rel=1e-6)
    assert eight["bytes_per_shard"]["pq_only"] == pytest.approx(one["bytes_per_shard"]["pq_only"] / 8, rel=1e-6)
    assert set(eight["shards_per_node"]) == {f"{g} GiB" for g in NODE_GIB}
    assert eight["shards_per_node"]["128 GiB"]["pq_only"] >= eight["shards_per_node"]["64 GiB"]["pq_only"]
    # encode hours at the measured H200 fp32 actor rate (4,254 passages/s), and the refresh rows from
    # encode_bench.refresh_costs with the training time that keeps a refresh under 5%
    assert c["encode_hours_one_gpu"]["NVIDIA H200 fp32"] == pytest.approx(21e6 / 4254.1 / 3600, abs=0.01)
    row = next(x for x in c["refresh"] if x["rate"] == "NVIDIA H200 fp32" and x["devices"] == 8)
    assert row["min_training_hours_between_refreshes"] == pytest.approx(row["refresh_minutes"] * 19 / 60, abs=0.01)
    assert c["build_core_hours"]["build"] > 0 and out.with_suffix(".png").is_file()
    md = out.with_suffix(".md").read_text()
    assert "| 12,000 |" in md and "21M passages" in md and "4,254 passages/s" in md

    # --resume keeps what the JSON holds and measures only what is missing (HNSW at 24k here)
    assert main(["--sizes", "12000,24000", "--hnsw-sizes", "12000,24000", "--queries", "50", "--search-batch", "25",
                 "--real-from", str(tmp_path / "real"), "--out", str(out), "--resume"]) == 0
    again = json.loads(out.read_text())
    assert [s["vectors"] for s in again["sizes"]] == [12000, 24000] and "hnsw" in again["sizes"][1]
    assert again["sizes"][1]["ivfpq"] == r["sizes"][1]["ivfpq"] and again["sizes"][0] == r["sizes"][0]
    assert again["fits"]["hnsw"]["index_bytes"]["points"] == 2
