"""benchmarks/retriever_signal.py on the six-passage fixture (no ../shared/data): the answer teacher marks the
passages that contain the answer, its quality is counted against gold ids, and training the query encoder on it moves
the marked passage to the top."""
from benchmarks.retriever_signal import (Teacher, answer_teacher_quality, build_retriever, contains_answer, main,
                                         ranked_ids, train_retriever)
from pipeline.config import load_config
from pipeline.index import load_index
from testlib import minilm_index

# MiniLM ranks "Kela Dorn grew up beside the river Ashvane" (d) first for this one; the answer is in passage a
GREW_UP = {"question": "Where did he grow up?", "answers": ["Meridale"], "gold_passage_ids": ["a"]}
# the answer's passage (a) is not among the top 3: no teacher over the candidates can say anything
OUT_OF_REACH = {"question": "Which town is the guild member from?", "answers": ["Meridale"],
                "gold_passage_ids": ["a"]}


def test_an_answer_is_found_as_whole_normalised_words_and_never_as_yes_or_no():
    passages = ["Varnel Ostrik was born in the town of Meridale.", "The Meridales are a family.", "Yes, he was."]
    assert contains_answer(passages, ["meridale"]) == [True, False, False]
    assert contains_answer(passages, ["The Meridale!"]) == [True, False, False]    # articles, punctuation, case
    assert contains_answer(passages, ["Yes.", ""]) == [False, False, False]


def test_the_answer_teacher_is_scored_against_gold_and_moves_its_passage_to_the_top(tmp_path):
    model = build_retriever(load_config(None, ["train.k=3"]), load_index(minilm_index(tmp_path / "index")))
    ranked = ranked_ids(model, [GREW_UP["question"], OUT_OF_REACH["question"]])
    assert ranked[0][:2] == ["d", "a"] and "a" not in ranked[1][:3]
    quality = answer_teacher_quality(model, [GREW_UP, OUT_OF_REACH], k=3)
    assert quality == {"questions": 2, "speaks": 1, "prior_top1_gold": 0.0, "teacher_gold": 1.0}

    curve = train_retriever(model, Teacher("answer", model), [GREW_UP], [GREW_UP], [OUT_OF_REACH], k=3, steps=20,
                            lr=1e-4, batch_size=1, eval_every=10, seed=0, log=lambda line: None)
    assert [p["step"] for p in curve] == [0, 10, 20] and curve[-1]["taught"] == 20
    assert curve[0]["test"] == 0.0 and curve[-1]["test"] == 1.0
    assert ranked_ids(model, [GREW_UP["question"]])[0][0] == "a"


def test_missing_shared_data_is_a_clear_error(tmp_path, capsys):
    assert main(["--datasets", "cmu", "--cmu-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)]) == 2
    assert "nowhere not found" in capsys.readouterr().err
