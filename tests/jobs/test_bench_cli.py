"""`latentrag bench`: dispatch to benchmarks/ of the checkout, clear errors; the quality benchmark's baselines."""
import sys
from pathlib import Path

from jobs.bench import main

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_bench_lists_the_benchmarks(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "quality" in out and "estimator" in out and "common" not in out.split("benchmarks:")[-1]


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert main(["no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no-such-bench'" in err and "quality" in err


def test_bench_passes_flags_through_to_the_script(capsys):
    assert main(["quality", "--help"]) == 0
    assert "--estimators" in capsys.readouterr().out


def test_bm25_baseline_finds_the_passage_that_shares_the_words():
    from benchmarks.quality import bm25_recall, canonical_answer

    passages = [{"id": "a", "title": "Zorvik", "text": "Zorvik was born in Tallow Creek and built a loom."},
                {"id": "b", "title": "Mella", "text": "Mella studied under Quint at the Harbour Academy."},
                {"id": "c", "title": "Quint", "text": "Quint played the grylute and lived by the river Oss."}]
    test = [{"question": "Where was Zorvik born?", "gold_passage_ids": ["a"]},
            {"question": "Which instrument did Quint play, the grylute?", "gold_passage_ids": ["c"]}]
    r = bm25_recall(passages, test)
    assert r["recall@1"] == 1.0
    assert canonical_answer("Yes.") == "yes" and canonical_answer("NO") == "no"
    assert canonical_answer("Harbour Academy") == "Harbour Academy"


def test_truth_bench_statistics_match_direct_computation():
    """--truth streams gradients (a retriever gradient has ~22M entries); its statistics equal those of the stacked
    vectors: cosine and relative error of the mean, tr Cov / ||g*||^2, and the Monte-Carlo error of the mean."""
    import torch

    from benchmarks.estimator_bench import GradStats, truth_runs

    g = torch.Generator().manual_seed(0)
    exact = torch.randn(50, generator=g, dtype=torch.float64)
    samples = exact + 0.3 + torch.randn(7, 50, generator=g, dtype=torch.float64)      # biased and noisy
    stats = GradStats()
    for s in samples:
        stats.add(s)
    r = stats.against(exact)
    mean = samples.mean(0)
    assert abs(r["cos"] - torch.nn.functional.cosine_similarity(mean, exact, 0).item()) < 1e-12
    assert abs(r["rel_err_mean"] - float((mean - exact).norm() / exact.norm())) < 1e-12
    assert abs(r["rel_var"] - float(samples.var(0, unbiased=True).sum() / exact.pow(2).sum())) < 1e-9
    assert abs(r["mc_error_of_mean"] ** 2 - r["rel_var"] / 7) < 1e-12 and r["repeats"] == 7
    # equal compute: K rows per example for every estimator, then rag-sequence at the other K of the sweep
    runs = {label: (name, over, k) for label, name, over, k in truth_runs(["rag-sequence", "vrag-sampled", "jsa"], 5,
                                                                         [2, 5, 20])}
    assert runs["vrag-sampled"] == ("vrag", {"vrag_mode": "sampled", "vrag_num_samples": 5}, 5)
    assert runs["jsa"][1]["jsa_num_proposals"] == 5 and set(runs) == {"rag-sequence", "vrag-sampled", "jsa",
                                                                      "rag-sequence K=2", "rag-sequence K=20"}
