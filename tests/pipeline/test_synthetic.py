import re

import pytest

from pipeline.data import read_corpus, read_qa
from pipeline.synthetic import RELATIONS, generate_knowledge_base, write_knowledge_base


@pytest.fixture(scope="module")
def kb():
    return generate_knowledge_base(seed=0)


@pytest.fixture(scope="module")
def kb_alt():
    return generate_knowledge_base(seed=0, template_set="alt")


def _tokens(text):
    return re.findall(r"[a-z0-9]+", text.lower().replace("'s", " "))


def _ngrams(tokens, n):
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def test_default_sizes(kb):
    assert 1300 <= len(kb.passages) <= 1500
    assert len(kb.questions) == 400 * len(RELATIONS)
    assert len(kb.test) == len(kb.dev) == 320 and len(kb.train) == 2560


def test_deterministic_by_seed_and_seeds_differ(kb):
    again = generate_knowledge_base(seed=0)
    assert again.passages == kb.passages and again.train == kb.train and again.test == kb.test
    other = generate_knowledge_base(seed=1)
    assert other.passages != kb.passages
    assert {p["title"] for p in other.passages} != {p["title"] for p in kb.passages}


def test_rows_are_well_formed(kb):
    ids = [p["id"] for p in kb.passages]
    assert len(set(ids)) == len(ids)
    assert all(p["text"] and p["title"] for p in kb.passages)
    qids = [q["id"] for q in kb.questions]
    assert len(set(qids)) == len(qids)
    for q in kb.questions:
        assert q["question"].endswith("?") and len(q["gold_passage_ids"]) == 1
        assert 1 <= len(q["answers"][0].split()) <= 3


def test_answer_verbatim_in_gold_passage_and_entity_named(kb, kb_alt):
    for base in (kb, kb_alt):
        by_id = {p["id"]: p for p in base.passages}
        for q in base.questions:
            gold = by_id[q["gold_passage_ids"][0]]
            assert q["answers"][0] in gold["text"]
            assert gold["title"] in q["question"]  # the question names the entity


def test_each_entity_has_several_passages_with_two_or_three_facts(kb):
    per_title = {}
    for p in kb.passages:
        per_title.setdefault(p["title"], []).append(p)
    assert all(3 <= len(v) <= 4 for v in per_title.values())
    per_passage = {}
    for q in kb.questions:
        per_passage[q["gold_passage_ids"][0]] = per_passage.get(q["gold_passage_ids"][0], 0) + 1
    assert set(per_passage.values()) <= {2, 3} and len(per_passage) == len(kb.passages)


def test_questions_do_not_copy_passage_sentences(kb, kb_alt):
    for base in (kb, kb_alt):
        by_id = {p["id"]: p for p in base.passages}
        for q in base.questions:
            shared = _ngrams(_tokens(q["question"]), 4) & _ngrams(_tokens(by_id[q["gold_passage_ids"][0]]["text"]), 4)
            assert not shared, (q["question"], shared)


def test_question_paraphrases_vary_per_relation(kb):
    for relation in RELATIONS:
        forms = {re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+", "NAME", q["question"])
                 for q in kb.questions if q["relation"] == relation}
        assert 2 <= len(forms) <= 3, (relation, forms)


def test_splits_are_disjoint_and_cover_every_fact(kb):
    train, dev, test = ({q["id"] for q in s} for s in (kb.train, kb.dev, kb.test))
    assert not train & dev and not train & test and not dev & test
    assert len(train | dev | test) == len(kb.questions)


def test_alt_templates_change_wording_not_facts(kb, kb_alt):
    assert [p["id"] for p in kb_alt.passages] == [p["id"] for p in kb.passages]
    assert [p["title"] for p in kb_alt.passages] == [p["title"] for p in kb.passages]
    assert [q["id"] for q in kb_alt.test] == [q["id"] for q in kb.test]
    assert [q["answers"] for q in kb_alt.test] == [q["answers"] for q in kb.test]

    def skeletons(base, key, rows):
        out = set()
        for r in rows:
            text = r[key]
            for name in sorted({r.get("title", "")} | set(re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", text)), key=len,
                               reverse=True):
                if name:
                    text = text.replace(name, "X")
            out.add(re.sub(r"\b[A-Z][a-z]+\b|\d+", "X", text))
        return out

    assert not skeletons(kb, "question", kb.questions) & skeletons(kb_alt, "question", kb_alt.questions)
    def sentences(b):
        return {re.sub(r"\b[A-Z][a-z]+\b|\d+", "X", s) for p in b.passages for s in re.split(r"(?<=\.) ", p["text"])}
    assert not sentences(kb) & sentences(kb_alt)


def test_names_are_fictional(kb):
    names = {p["title"] for p in kb.passages}
    assert len(names) == 400
    common = {"john", "mary", "london", "paris", "smith", "guitar", "piano", "thames"}
    words = {w.lower() for n in names for w in n.split()}
    assert not words & common


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_knowledge_base(template_set="nope")
    with pytest.raises(ValueError):
        generate_knowledge_base(dev_fraction=0.5, test_fraction=0.5)


def test_write_knowledge_base_is_readable(tmp_path):
    small = generate_knowledge_base(seed=3, num_entities=20)
    paths = write_knowledge_base(small, tmp_path / "kb")
    assert sorted(paths) == ["corpus", "dev", "test", "train"]
    corpus = read_corpus(paths["corpus"])
    assert [r["id"] for r in corpus] == [p["id"] for p in small.passages]
    test = read_qa(paths["test"])
    assert [(q["id"], q["answers"], q["gold_passage_ids"]) for q in test] == \
        [(q["id"], q["answers"], q["gold_passage_ids"]) for q in small.test]
