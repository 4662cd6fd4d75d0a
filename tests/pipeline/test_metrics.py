import pytest

from pipeline.metrics import aggregate, exact_match, f1_score, normalize_answer, recall_at_k


def test_normalize_answer():
    assert normalize_answer("  The  Quorvane-Lens!! ") == "quorvanelens"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("Theory") == "theory"  # 'the' only as a word


def test_exact_match():
    assert exact_match("the Brannock Guild", ["Brannock Guild"]) == 1.0
    assert exact_match("Brannock", ["Brannock Guild", "x"]) == 0.0
    assert exact_match("x", "X.") == 1.0


def test_f1_partial_and_max_over_answers():
    assert f1_score("Brannock", ["Brannock Guild"]) == pytest.approx(2 / 3)
    assert f1_score("Brannock Guild", ["nothing", "Brannock Guild"]) == 1.0
    assert f1_score("foo", ["bar"]) == 0.0
    assert f1_score("", [""]) == 1.0 and f1_score("", ["b"]) == 0.0
    assert f1_score("a a b", ["a b b"]) == pytest.approx(2 / 3)


def test_recall_at_k():
    retrieved = [["p1", "p2", "p3"], ["p4", "p5", "p6"], ["p7", "p8", "p9"], ["x"]]
    gold = [["p1"], ["p6", "zz"], ["nope"], []]
    assert recall_at_k(retrieved, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, gold, 3) == pytest.approx(2 / 3)
    assert recall_at_k(retrieved, gold, 20) == pytest.approx(2 / 3)
    assert recall_at_k(retrieved, [[], None, [], []], 5) is None
    with pytest.raises(ValueError):
        recall_at_k(retrieved, gold[:2], 1)


def test_aggregate():
    out = aggregate(["Meridale", "wrong"], [["Meridale"], ["Right answer"]],
                    [["a", "b"], ["c", "d"]], [["a"], ["d"]])
    assert out == {"em": 0.5, "f1": 0.5, "recall@1": 0.5, "recall@5": 1.0, "recall@20": 1.0, "num_questions": 2}
    only_answers = aggregate(["x"], [["x"]])
    assert only_answers["em"] == 1.0 and only_answers["recall@1"] is None and only_answers["num_questions"] == 1
    only_retrieval = aggregate(retrieved_ids=[["a"]], gold_passage_ids=[["b"]])
    assert only_retrieval["em"] is None and only_retrieval["recall@5"] == 0.0
    with pytest.raises(ValueError):
        aggregate(["x"], [])
