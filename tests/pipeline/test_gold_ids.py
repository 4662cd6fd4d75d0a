"""Gold ids name rows of the user's corpus: every window of a row split by chunking counts as gold (recall@k in
evaluation, the independent strategy's positives), and a gold id that names no row is refused."""
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data import DataError, GoldPassages, chunk_passages
from pipeline.estimators.independent import Independent
from pipeline.index import ArrayIndex, load_index
from pipeline.metrics import recall_at_k
from pipeline.rag import RagModel
from testlib import PASSAGES, minilm_index

LONG = {"id": "ostrik", "title": "Varnel Ostrik",
        "text": "Varnel Ostrik was a clockmaker . He was born in the town of Meridale by the sea . "
                "He later moved north to work for the Quendle Guild as an apprentice ."}


def test_gold_passages_resolves_split_rows_to_their_windows():
    passages = chunk_passages([LONG, *PASSAGES[2:]], max_words=8, overlap=2)
    windows = [p["id"] for p in passages if p["doc_id"] == "ostrik"]
    assert len(windows) >= 3 and all(w.startswith("ostrik#") for w in windows)
    gold = GoldPassages(p["id"] for p in passages)
    assert gold.passages(["ostrik"]) == windows                 # the row: all its windows
    assert gold.passages(["c"]) == ["c"]                        # a row that was not split
    assert gold.passages(["ostrik#1", "c"]) == ["ostrik#1", "c"]   # one window named directly
    assert gold.unknown(["ostrik", "nope", "ostrik#99"]) == ["nope", "ostrik#99"]
    gold.check([{"question": "q", "gold_passage_ids": ["ostrik", "c"]}, {"question": "no gold"}], "qa.jsonl")
    with pytest.raises(DataError, match=r"qa\.jsonl: 1 gold_passage_ids in 1 question\(s\) name no row of the "
                                        r"corpus \(first: question 'q7', id 'ostrik-2'\)"):
        gold.check([{"id": "q1", "question": "a", "gold_passage_ids": ["ostrik"]},
                    {"id": "q7", "question": "b", "gold_passage_ids": ["c", "ostrik-2"]}], "qa.jsonl")


def test_recall_counts_a_window_of_the_gold_row(tmp_path):
    from pipeline.config import GeneratorConfig
    from pipeline.evaluation import evaluate
    from pipeline.models.generator import build_generator
    from pipeline.models.retriever import TextEncoder

    passages = chunk_passages([LONG, *PASSAGES[2:]], max_words=8, overlap=2)
    encoder = TextEncoder()
    index = load_index(minilm_index(tmp_path / "index", passages, encoder=encoder))
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(d_model=32, ffn_dim=64, encoder_layers=1, decoder_layers=1,
                                          attention_heads=2, max_target_length=4), ["Meridale"])
    model = RagModel(encoder, gen, index, tau=0.05)
    rows = [{"id": "q1", "question": "Where was Varnel Ostrik born?", "answers": ["Meridale"],
             "gold_passage_ids": ["ostrik"]}]
    metrics, predictions = evaluate(model, rows, k=2)
    top = predictions[0]["top_passage"]
    assert top.startswith("ostrik#")                            # a window of the gold row is retrieved first ...
    assert recall_at_k([[top]], [["ostrik"]], 1) == 0.0         # ... which the raw id never matched
    assert metrics["recall@1"] == 1.0
    with pytest.raises(DataError, match="id 'ostrik#40'"):      # refused before any decoding
        evaluate(model, [{**rows[0], "gold_passage_ids": ["ostrik#40"]}], k=2)


class _TableEncoder(nn.Module):
    """'q0' -> row 0 of a trainable score table (one score per passage)."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, texts):
        return self.table[[int(t[1:]) for t in texts]]


class _PassageGenerator(nn.Module):
    """log p(answer | passage) = one trainable number per passage text; records the passages it read."""

    def __init__(self, texts):
        super().__init__()
        self.of = {t: i for i, t in enumerate(texts)}
        self.logits = nn.Parameter(torch.zeros(len(texts)))
        self.read = []

    def encode_inputs(self, questions, passages):
        self.read += list(passages)
        return [self.of[p] for p in passages]

    def encode_targets(self, answers):
        return torch.zeros(len(answers), 1, dtype=torch.long), torch.ones(len(answers), 1, dtype=torch.long)

    def token_logprobs(self, inputs, labels):
        return nn.functional.logsigmoid(self.logits[inputs]).unsqueeze(1)


def test_independent_positives_are_every_window_of_the_gold_row():
    passages = chunk_passages([LONG, *PASSAGES[2:]], max_words=8, overlap=2)
    ids, texts = [p["id"] for p in passages], [p["text"] for p in passages]
    windows = [i for i, p in enumerate(passages) if p["doc_id"] == "ostrik"]
    holds = next(i for i in windows if "Meridale" in texts[i])
    assert holds != windows[0]                                  # the answer is not in the first window
    n = len(passages)
    table = torch.zeros(2, n)
    table[0, windows] = 1.0                                     # every window scores high for the question
    gen = _PassageGenerator(texts)
    model = RagModel(_TableEncoder(table), gen, ArrayIndex(np.eye(n, dtype=np.float32), ids=ids, texts=texts),
                     tau=1.0)
    rows = [{"id": "a", "question": "q0", "answers": ["Meridale"], "gold_passage_ids": ["ostrik"]},
            {"id": "b", "question": "q1", "answers": ["zumbrel"], "gold_passage_ids": ["c"]}]
    est = Independent(k=2, hard_negatives=3, temperature=1.0)
    out = est.loss(model, ["q0", "q1"], ["Meridale", "zumbrel"], rows)
    out.loss.backward()
    grad = model.query_encoder.table.grad[0]
    assert grad[holds] < 0                                      # pulled up: the window that holds the answer
    assert all(grad[w] == 0 for w in windows if w != holds)     # the row's other windows: never negatives
    assert grad[ids.index("c")] > 0                             # another row's gold: an in-batch negative
    assert gen.read[0] == texts[holds]                          # the generator reads the answer's window
    with pytest.raises(ValueError, match=r"gold_passage_ids \['ostrik#9'\] of row 'a' name no passage"):
        est.loss(model, ["q0"], ["Meridale"], [{**rows[0], "gold_passage_ids": ["ostrik#9"]}])


def test_train_refuses_a_gold_id_that_names_no_corpus_row_before_ingest(tmp_path, capsys):
    import json

    from jobs import train

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in [LONG, *PASSAGES[2:]]))
    ok = {"question": "Where was Varnel Ostrik born?", "answer": "Meridale", "gold_passage_ids": ["ostrik"]}
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(ok) + "\n")
    bad.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "id": "q2", "gold_passage_ids": ["ostrick"]}) + "\n")
    out = tmp_path / "out"
    rc = train.main(["--corpus", str(corpus), "--train-qa", str(good), "--eval-qa", str(bad), "--max-steps", "1",
                     "--output-dir", str(out), "--set", "data.chunk_words=8", "--set", "data.chunk_overlap=2"])
    err = capsys.readouterr().err
    assert rc == 2 and f"data.eval_qa ({bad})" in err and "question 'q2', id 'ostrick'" in err
    assert not out.exists()                                     # refused before ingest, encoding or Ray
