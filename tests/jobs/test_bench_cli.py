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
