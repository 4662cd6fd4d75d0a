"""The quality benchmark's zero-training rows and datasets on tiny data (no ../shared/data needed): the majority
answer, F1 split by answer type, the untrained reader on BM25's top-K, the rag-mini adapter, and the clear error
when the shared data is absent."""
import csv
import json

import pytest
import torch

from benchmarks.quality import Bm25, bm25_reader, main, majority_answer
from jobs.prepare_qa import fix_mojibake, prepare_rag_mini
from pipeline.config import load_config
from pipeline.index import load_index
from pipeline.metrics import answer_type, f1_by_answer_type
from testlib import PASSAGES, minilm_index


def test_f1_is_split_by_answer_type():
    assert answer_type(["Yes."]) == "yes/no" and answer_type(["no", "NO"]) == "yes/no"
    assert answer_type(["yes", "Meridale"]) == "other" and answer_type(["Meridale"]) == "other"
    out = f1_by_answer_type([1.0, 0.0, 0.5, 0.25], [["yes"], ["no"], ["Meridale"], ["the Orrin hill"]])
    assert out == {"f1_yes_no": 0.5, "f1_other": 0.375, "num_yes_no": 2}
    assert f1_by_answer_type([1.0], [["Meridale"]])["f1_yes_no"] is None


def test_majority_answer_gives_every_question_the_most_frequent_training_answer():
    train = [{"answers": ["Yes."]}, {"answers": ["yes"]}, {"answers": ["Meridale"]}, {"answers": ["no"]}]
    test = [{"answers": ["yes"]}, {"answers": ["no"]}, {"answers": ["yes", "Yes"]}, {"answers": ["a yes man"]}]
    m = majority_answer(train, test)
    assert m["answer"] == "yes"
    assert m["em"] == 0.5                                       # 2 of the 4 test answers are "yes"
    assert m["f1_yes_no"] == pytest.approx(2 / 3) and m["f1_other"] == pytest.approx(2 * (1 * 0.5) / 1.5)
    assert m["f1"] == pytest.approx((1 + 0 + 1 + 2 / 3) / 4)


def test_bm25_reader_reads_bm25_candidates_with_the_untrained_start(tmp_path):
    passages = PASSAGES + [{"id": "g", "title": "", "text": "Was Kela Dorn born beside Ashvane? yes, she was."}]
    index = load_index(minilm_index(tmp_path / "index", passages))
    cfg = load_config(None, ["generator.d_model=32", "generator.ffn_dim=64", "generator.encoder_layers=1",
                             "generator.decoder_layers=1", "generator.attention_heads=2", "eval.k=2"])
    data = {"train": [{"question": "Where was Varnel Ostrik born?", "answers": ["Meridale"]}]}
    test = [{"id": "t1", "question": "Where does Tamsin Vey sail the Gullwing boat?", "answers": ["Gullwing"],
             "gold_passage_ids": ["e"]},
            {"id": "t2", "question": "Did Kela Dorn grow up beside Ashvane?", "answers": ["yes"],
             "gold_passage_ids": ["d", "g"]}]
    bm25 = Bm25(passages)
    tops = [h[0] for h in bm25.search([t["question"] for t in test], 3)]
    assert tops[0] == "e" and tops[1] in ("d", "g")
    torch.manual_seed(0)
    metrics, predictions = bm25_reader(cfg, index, data, test, bm25)
    assert [p["top_passage"] for p in predictions] == tops          # the generator read BM25's first passage
    assert metrics["recall@1"] == 1.0 and metrics["num_questions"] == 2 and metrics["num_yes_no"] == 1
    assert metrics["f1_yes_no"] is not None and metrics["f1_other"] is not None
    assert 0.0 <= metrics["em"] <= metrics["f1"] <= 1.0


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rag_mini_is_prepared_with_articles_gold_ids_and_a_held_out_split(tmp_path):
    rag, cmu = tmp_path / "rag", tmp_path / "cmu"
    rag.mkdir()
    cmu.mkdir()
    articles = {f"Town {n}": [f"Town {n} lies on river number {n} and trades wool {w}." for w in range(3)]
                for n in range(12)}
    _write_jsonl(cmu / "passages.jsonl", [{"id": f"{t}-{i}", "doc_id": t, "title": t.replace(" ", "_"), "text": x}
                                          for t, texts in articles.items() for i, x in enumerate(texts)])
    with open(rag / "passages.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "passage"])
        n = 0
        for texts in articles.values():
            for x in texts:
                w.writerow([n, x])
                n += 1
        w.writerow([n, "RÃ\xado de la Plata"])                # mojibake, and no article of its own
    _write_jsonl(rag / "qa_s08.jsonl", [{"id": i, "question": f"Which river is near Town {i % 12}?", "answer": "yes",
                                         "article_title": f"Town_{i % 12}"} for i in range(48)])
    out = tmp_path / "out"
    summary = prepare_rag_mini(rag, cmu, out, chunk_words=100, chunk_overlap=20)
    assert summary["documents"] == 12 and summary["questions_without_document"] == 0
    assert 0 < len(summary["heldout_articles"]) < 12
    corpus = [json.loads(line) for line in (out / "source" / "corpus.jsonl").read_text().splitlines()]
    assert corpus[-1]["text"] == "Río de la Plata" and corpus[-1]["doc_id"] == "town 11"   # the one before it
    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "dev", "test")}
    id_to_doc = {r["id"]: r["doc_id"] for r in corpus}
    doc_of = lambda r: {id_to_doc[g] for g in r["gold_passage_ids"]}  # noqa: E731
    for split, qs in rows.items():
        for q in qs:
            town = q["question"].split("Town ")[1].rstrip("?")
            assert doc_of(q) == {f"town {town}"}                     # gold: the question's article's passages
            assert (f"town {town}" in summary["heldout_articles"]) == (split != "train")
    assert fix_mojibake("plain text") == "plain text"


def test_shared_datasets_that_are_absent_are_a_clear_error(tmp_path, capsys):
    rc = main(["--datasets", "rag-mini", "--rag-mini-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--datasets rag-mini" in err and "nowhere not found" in err and "--rag-mini-dir" in err
    rc = main(["--datasets", "cmu", "--cmu-dir", str(tmp_path / "no-cmu"), "--out-dir", str(tmp_path)])
    assert rc == 2 and "no-cmu not found" in capsys.readouterr().err


def _quality_json(d, label, seeds, f1s, steps=10):
    metric = lambda f1: {"step": steps, "em": 0.0, "f1": f1, "recall@1": 0.5, "recall@5": 0.9, "recall@20": 1.0,  # noqa: E731
                         "f1_yes_no": None, "f1_other": f1}
    runs = [{"label": label, "seed": s, "start": metric(0.1), "end": metric(f1), "curve": [metric(0.1), metric(f1)],
             "grad_norms": [{"step": 1, "retriever": 1.0}], "uses_gold_passages": False, "s_per_step": 2.0}
            for s, f1 in zip(seeds, f1s)]
    ds = {"name": "tiny", "key": "tiny", "steps": steps, "k": 5, "batch_size": 8, "num_train": 4, "num_test": 2,
          "num_passages": 9, "baselines": {"bm25": {"recall@1": 0.4}}, "runs": {label: runs}}
    d.mkdir()
    (d / "quality.json").write_text(json.dumps({"args": {}, "datasets": {"tiny": ds}}))


def test_merge_reports_runs_made_in_separate_processes_under_their_labels(tmp_path, capsys):
    _quality_json(tmp_path / "a", "jsa", [0], [0.4])
    _quality_json(tmp_path / "b", "jsa", [1], [0.6])
    _quality_json(tmp_path / "c", "jsa", [0], [0.2])
    out = tmp_path / "merged"
    assert main(["--merge", f"jsa={tmp_path / 'a'}", f"jsa={tmp_path / 'b'}",
                 f"jsa-flat0={tmp_path / 'c'}", "--out-dir", str(out)]) == 0
    merged = json.loads((out / "quality.json").read_text())["datasets"]["tiny"]
    assert [r["seed"] for r in merged["runs"]["jsa"]] == [0, 1] and len(merged["runs"]["jsa-flat0"]) == 1
    assert merged["summary"]["jsa"]["metrics"]["f1"]["mean"] == pytest.approx(0.5)
    table = (out / "quality.md").read_text()
    assert "| jsa | " in table and "| jsa-flat0 | " in table and "seeds [0, 1]" in table
    assert (out / "recall_tiny.png").is_file()
    # another test set (or steps) is refused, naming the file
    _quality_json(tmp_path / "d", "jsa", [2], [0.3], steps=20)
    assert main(["--merge", f"jsa={tmp_path / 'a'}", f"jsa={tmp_path / 'd'}", "--out-dir", str(out)]) == 2
    assert "differs from the first run in ['steps']" in capsys.readouterr().err
    # a label MLflow cannot name a metric with is refused before anything is written
    assert main(["--merge", f"jsa + x={tmp_path / 'a'}", "--out-dir", str(tmp_path / "never")]) == 2
    assert "LABEL may hold letters" in capsys.readouterr().err and not (tmp_path / "never").exists()
