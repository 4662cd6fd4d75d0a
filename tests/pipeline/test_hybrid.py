"""Hybrid candidates (retriever.hybrid_k): BM25's top-H united with the dense top-K; the prior is the dense score, or
with retriever.bm25_weight w the fused dense score / tau + w * BM25 score.

The dense side is a lookup table (question i -> a score row over the passages, ArrayIndex of unit vectors), so which
passages dense ranks where is known exactly; the BM25 side is real bm25s over the passages' words. No Ray.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Config, ConfigError, EstimatorConfig, GeneratorConfig, from_dict
from pipeline.estimators import REGISTRY, build_estimator
from pipeline.decoding import rag_sequence_decode
from pipeline.evaluation import evaluate
from pipeline.index import ArrayIndex, IndexFormatError, load_index, write_index_version
from pipeline.index.bm25 import BM25_DIR, BM25_META, Bm25Index, open_bm25
from pipeline.models.generator import build_generator
from pipeline.rag import POSTERIOR_SEP, RagModel, hybrid_union

# passage i starts with "p<i>:" (the fake generator reads its number); the words are what BM25 sees
TEXTS = ["p0: the lighthouse keeper Orla paints seashells",
         "p1: a miller grinds barley near the weir",
         "p2: the weir floods every spring",
         "p3: barley bread is baked on Sundays",
         "p4: the harbour master counts boats",
         "p5: Quillan the glassblower lives in Tarrow",
         "p6: boats leave the harbour at dawn",
         "p7: the miller sells bread at the market"]
QUESTIONS = ["q0: where does the glassblower Quillan live?",      # BM25's top-1 is p5 (glassblower, Quillan)
             "q1: who grinds barley?"]
# dense scores: q0 ranks p5 last (dense alone never finds it), q1 ranks the miller's passages first
DENSE = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, -0.9, 0.4, 0.3],
                      [0.2, 0.9, 0.1, 0.8, 0.0, -0.5, -0.1, 0.7]], dtype=torch.float64)


class TableEncoder(nn.Module):
    """'q<i>: ...' (or 'q<i>: ... [SEP] answer') -> row i of a score table (dot product with unit passage vectors)."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, texts):
        return self.table[[int(t.split(POSTERIOR_SEP)[0].split(":")[0][1:]) for t in texts]]


class TableGenerator(nn.Module):
    """log p(y_t | q<i>, p<j>) = logsigmoid(table[i, j, t]); a DRO list 'p1... | p4...' reads as its mean."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def encode_inputs(self, questions, passages):
        return {"q": [int(q.split(":")[0][1:]) for q in questions],
                "p": [[int(x.strip().split(":")[0][1:]) for x in p.split(" | ")] for p in passages]}

    def encode_targets(self, answers):
        return torch.zeros(len(answers), 2, dtype=torch.long), torch.ones(len(answers), 2, dtype=torch.long)

    def token_logprobs(self, inputs, labels):
        logp = nn.functional.logsigmoid(self.logits)
        return torch.stack([torch.logsumexp(logp[q, ps], 0) - np.log(len(ps)) for q, ps in zip(inputs["q"],
                                                                                                   inputs["p"])])


def table_model(hybrid_k=2, generator=None, bm25_weight=0.0):
    index = ArrayIndex(np.eye(len(TEXTS), dtype=np.float32), ids=[f"p{i}" for i in range(len(TEXTS))], texts=TEXTS)
    g = torch.Generator().manual_seed(0)
    generator = generator or TableGenerator(torch.randn(2, len(TEXTS), 2, generator=g, dtype=torch.float64))
    model = RagModel(TableEncoder(DENSE), generator, index, tau=0.5)
    model.posterior_encoder = TableEncoder(DENSE + torch.randn(DENSE.shape, generator=g, dtype=torch.float64))
    return model.attach_bm25(hybrid_k, bm25_weight)


# ------------------------------------------------------------------------------------------------ the union
def test_hybrid_union_shape_rule():
    dense = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    sparse = np.array([[7, 1], [2, -1]])        # row 0: one new hit, one already there; row 1: one hit, one none
    rows = hybrid_union(dense, sparse, 2)
    assert rows.shape == (2, 4)
    assert rows[0].tolist() == [0, 1, 7, 2]      # the dense top-2, BM25's new hit, then the next dense row
    assert rows[1].tolist() == [0, 1, 2, 3]      # BM25's hit is the 3rd dense row; filled with the 4th
    with pytest.raises(ValueError, match="dense top-4"):
        hybrid_union(dense[:, :3], sparse, 2)


def test_prior_rows_hold_dense_top_k_and_bm25_top_h_ordered_by_dense_score():
    model = table_model(hybrid_k=2)
    k = 3
    q = model.query_encoder(QUESTIONS)
    rows = model.prior_rows(QUESTIONS, q, k)
    assert rows.shape == (2, k + 2) and model.width(k) == k + 2
    _, bm25_rows = model.bm25.search(QUESTIONS, 2)
    assert bm25_rows[0, 0] == 5                  # BM25 finds the glassblower's passage ...
    for i in range(2):
        dense_top = torch.topk(DENSE[i], k).indices.tolist()
        assert len(set(rows[i].tolist())) == k + 2                                  # no duplicates
        assert set(dense_top) <= set(rows[i].tolist())                              # the dense top-K
        assert {int(r) for r in bm25_rows[i] if r >= 0} <= set(rows[i].tolist())     # BM25's top-H
        scores = DENSE[i, rows[i]].tolist()
        assert scores == sorted(scores, reverse=True) and rows[i, 0] == dense_top[0]  # by dense score
    assert 5 not in torch.topk(DENSE[0], k + 2).indices.tolist() and rows[0, -1] == 5   # ... dense never would
    cand = model.retrieve(QUESTIONS, k)
    assert cand.rows.tolist() == rows.tolist() and cand.ids[0][-1] == "p5"
    model.attach_bm25(0)                         # off: dense top-k only
    assert model.retrieve(QUESTIONS, k).rows.tolist() == [torch.topk(DENSE[i], k).indices.tolist() for i in range(2)]


def test_prior_is_the_dense_score_over_the_union_and_trains_the_query_encoder():
    model = table_model(hybrid_k=2)
    cand = model.retrieve(QUESTIONS, 3)
    scores = model.doc_scores(QUESTIONS, cand)
    expected = torch.stack([DENSE[i, cand.rows[i]] for i in range(2)]) / model.tau
    assert torch.allclose(scores.double(), expected)
    out = build_estimator("rag-sequence", k=3).loss(model, QUESTIONS, ["a", "a"])
    out.loss.backward()
    grad = model.query_encoder.table.grad
    assert grad is not None and grad[0, 5].abs() > 0      # BM25's proposal p5 gets gradient through the dense prior
    assert grad[0, 7].abs() == 0                          # a passage outside the union gets none


def test_bm25_scores_of_given_rows_are_its_search_scores():
    bm25 = table_model(hybrid_k=2).bm25
    scores, rows = bm25.search(QUESTIONS, 4, with_zero_scores=True)
    assert np.allclose(bm25.scores(QUESTIONS, rows), scores)
    assert bm25.scores(QUESTIONS, np.array([[5, -1], [5, 1]])).tolist()[0][1] == 0.0     # -1: no row, no score
    assert bm25.scores(["the a of"], np.array([[0, 1]])).tolist() == [[0.0, 0.0]]      # stopwords only


def test_a_fused_prior_adds_the_weighted_bm25_score_ranks_by_it_and_trains_only_the_query_encoder():
    w = 3.0
    model = table_model(hybrid_k=2, bm25_weight=w)
    cand = model.retrieve(QUESTIONS, 3)
    scores = model.doc_scores(QUESTIONS, cand)
    sparse = torch.from_numpy(model.bm25.scores(QUESTIONS, cand.rows)).double()
    dense = torch.stack([DENSE[i, cand.rows[i]] for i in range(2)]) / model.tau
    assert sparse.abs().sum() > 0 and torch.allclose(scores.double(), dense + w * sparse)
    fused = (dense + w * sparse).tolist()
    assert all(row == sorted(row, reverse=True) for row in fused)          # candidates in fused order
    assert cand.rows[0, 0] == 5        # BM25's glassblower passage, dense's last, is the fused prior's first
    out = build_estimator("rag-sequence", k=3).loss(model, QUESTIONS, ["a", "a"])
    out.loss.backward()
    assert model.query_encoder.table.grad[0, 5].abs() > 0
    model.attach_bm25(2, 0.0)          # weight 0: BM25 only proposes, the dense order is back
    assert model.retrieve(QUESTIONS, 3).rows[0, -1] == 5


def test_bm25_weight_needs_hybrid_candidates():
    with pytest.raises(ConfigError, match="retriever.bm25_weight"):
        from_dict({"retriever": {"bm25_weight": 1.0}}).validate()
    with pytest.raises(ConfigError, match="retriever.bm25_weight"):
        from_dict({"retriever": {"hybrid_k": 2, "bm25_weight": -1.0}}).validate()
    assert from_dict({"retriever": {"hybrid_k": 2, "bm25_weight": 1.0}}).validate().retriever.bm25_weight == 1.0


@pytest.mark.parametrize("bm25_weight", [0.0, 3.0])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_estimator_runs_on_hybrid_candidates(name, bm25_weight):
    model = table_model(hybrid_k=2, bm25_weight=bm25_weight)
    cfg = EstimatorConfig(jsa_num_proposals=4, dro_list_length=2, dro_num_lists=3, vrag_candidates="union")
    est = build_estimator(name, k=3, cfg=cfg)
    torch.manual_seed(0)
    out = est.loss(model, QUESTIONS, ["a", "a"], rows=None) if est.needs_rows else \
        est.loss(model, QUESTIONS, ["a", "a"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.query_encoder.table.grad.abs().sum() > 0


def test_hybrid_k_is_validated_and_recorded_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match="retriever.hybrid_k"):
        from_dict({"retriever": {"hybrid_k": -1}}).validate()
    cfg = from_dict({"retriever": {"hybrid_k": 5}}).validate()
    assert cfg.retriever.hybrid_k == 5 and Config().retriever.hybrid_k == 0


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluation_reads_the_passage_bm25_found_and_dense_did_not():
    gen = build_generator(GeneratorConfig(d_model=32, ffn_dim=64, encoder_layers=1, decoder_layers=1,
                                          attention_heads=2, max_target_length=4), ["Tarrow"])
    rows = [{"question": QUESTIONS[0], "answers": ["Tarrow"], "gold_passage_ids": ["p5"]}]
    model = table_model(hybrid_k=0, generator=gen)
    dense, _ = evaluate(model, rows, k=3)
    model.attach_bm25(2)
    hybrid, _ = evaluate(model, rows, k=3)
    assert dense["candidates"] == 3 and hybrid["candidates"] == 5
    assert dense["recall@candidates"] == 0.0 and hybrid["recall@candidates"] == 1.0
    # recall@k is still the dense ranking's; a fused prior ranks BM25's find first
    assert hybrid["recall@5"] == dense["recall@5"] == 0.0
    model.attach_bm25(2, 3.0)
    fused, _ = evaluate(model, rows, k=3)
    assert fused["recall@1"] == 1.0 and fused["recall@candidates"] == 1.0
    model.attach_bm25(2)
    with pytest.raises(ValueError, match="model.width"):       # decoding k passages of a k + H set is refused
        rag_sequence_decode(model, QUESTIONS[:1], k=3)
    assert len(rag_sequence_decode(model, QUESTIONS[:1], k=5, candidates=model.retrieve(QUESTIONS[:1], 3))[0]
               .passages) == 5


# ------------------------------------------------------------------------------------------------ on disk
def test_bm25_round_trips_through_the_index_version(tmp_path):
    ids = [f"p{i}" for i in range(len(TEXTS))]
    version = write_index_version(tmp_path / "index", np.eye(len(TEXTS), dtype=np.float32), ids, texts=TEXTS)
    index = load_index(version)
    built = open_bm25(index)                                   # built and saved beside the FAISS index
    assert built.path == version / BM25_DIR and (version / BM25_DIR / BM25_META).is_file()
    assert json.loads((version / BM25_DIR / BM25_META).read_text())["k1"] == 0.9
    assert not [p for p in version.iterdir() if p.name.startswith(".")]      # nothing half-written left
    loaded = open_bm25(load_index(version))                    # loaded, not rebuilt
    assert isinstance(loaded, Bm25Index) and loaded.retriever is not built.retriever
    for a, b in zip(built.search(QUESTIONS, 3), loaded.search(QUESTIONS, 3)):
        assert np.array_equal(a, b)
    # a BM25 index of other passages is refused, naming it
    other = write_index_version(tmp_path / "index", np.eye(3, dtype=np.float32), ["x", "y", "z"],
                                texts=TEXTS[:3])
    (version / BM25_DIR).rename(other / BM25_DIR)
    with pytest.raises(IndexFormatError, match="other passages"):
        open_bm25(load_index(other))
