"""RagModel: the retriever (query encoder over a FAISS index version) and the generator, seen as one model.

Estimators use three calls:
    cand = model.retrieve(questions, k)                 # top-K rows from the index (search without gradient)
    model.doc_scores(questions, cand) -> [B, K]         # score / tau, differentiable in the query encoder
    model.answer_token_logprobs(questions, cand, answers) -> ([B, K, T], mask [B, T])   # one generator pass

VRAG and JSA also use a posterior retriever q(z|x,y): `posterior_encoder`, its own query encoder over
"question [SEP] answer" (initialised from the prior's weights), searching the same index:
    cand = model.retrieve_posterior(questions, answers, k)
    model.score_rows(query_vectors, rows) -> [B, M]     # score / tau of any rows, differentiable in the query
Ragged sets of (question, passage, answer) triples are scored with `model.pair_logprobs`.

Hybrid candidates (`retriever.hybrid_k` = H > 0, `attach_bm25`): `retrieve(questions, K)` returns K + H rows, the
dense top-K united with BM25's top-H (`hybrid_union`), ordered by the prior's score. By default BM25 only proposes:
p(z|x) is softmax(dense score / tau) over those rows. With `retriever.bm25_weight` w > 0 the prior is fused,
softmax(dense score / tau + w * BM25 score) (`prior_scores`), and the query encoder is still what trains. The
posterior keeps its own dense search and scores (`retrieve_posterior`), and so do the anchor and the independent
strategy's negatives (`search_rows`, `score_rows`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.index import SearchIndex, passage_text
from pipeline.models.generator import Generator
from pipeline.models.retriever import TextEncoder


@dataclass
class Candidates:
    rows: np.ndarray                     # [B, K] row numbers in the index
    ids: list[list[str]]                 # passage ids
    texts: list[list[str]]               # passage texts as the generator reads them
    query_vectors: torch.Tensor          # [B, d], with gradient when the query encoder trains

    def top(self, k: int) -> "Candidates":
        """The first k of each question's candidates (they are ranked by score)."""
        if k > self.rows.shape[1]:
            raise ValueError(f"asked for the top {k} of {self.rows.shape[1]} retrieved passages")
        return Candidates(self.rows[:, :k], [r[:k] for r in self.ids], [t[:k] for t in self.texts],
                          self.query_vectors)


POSTERIOR_SEP = " [SEP] "


def posterior_query(question: str, answer: str) -> str:
    """The text the posterior retriever q(z|x,y) encodes."""
    return f"{question}{POSTERIOR_SEP}{answer}"


def hybrid_union(dense: np.ndarray, sparse: np.ndarray, k: int) -> np.ndarray:
    """[B, k + H] rows: the dense top-k, then BM25's hits (`sparse` [B, H], -1 = no hit) that are not among them,
    then the next dense rows (`dense` [B, >= k + H], best first) until k + H distinct rows. Not yet ordered by
    score (`RagModel.prior_rows` does that)."""
    h = sparse.shape[1]
    width = k + h
    if dense.shape[1] < width:
        raise ValueError(f"hybrid candidates need the dense top-{width}, got {dense.shape[1]} rows")
    out = np.empty((dense.shape[0], width), dtype=np.int64)
    for i in range(dense.shape[0]):
        members = dict.fromkeys(int(r) for r in dense[i, :k])
        for r in sparse[i]:
            if r >= 0:
                members.setdefault(int(r))
        for r in dense[i, k:]:
            if len(members) == width:
                break
            members.setdefault(int(r))
        out[i] = list(members)[:width]
    return out


class RagModel(nn.Module):
    def __init__(self, query_encoder: TextEncoder, generator: Generator, index: SearchIndex, tau: float = 0.05,
                 posterior_encoder: TextEncoder | None = None, passage_encoder: TextEncoder | None = None,
                 rerank_top_m: int = 0):
        super().__init__()
        self.query_encoder = query_encoder
        self.generator = generator
        self.posterior_encoder = posterior_encoder     # q(z|x,y) for vrag / jsa; None otherwise
        # a passage encoder that trains (retriever.train_passage_encoder): scores then use fresh passage vectors
        # (with gradient) instead of the index's, and the index is refreshed in the background (pipeline.refresh)
        self.passage_encoder = passage_encoder
        self.rerank_top_m = int(rerank_top_m)          # > k: re-rank the index's top-M with the passage encoder
        self.index = index               # a SearchIndex (not a module: it is not trained here)
        self.tau = tau
        self.hybrid_k = 0                # H: BM25's top-H join the dense top-K (attach_bm25)
        self.bm25_weight = 0.0           # w of the fused prior (attach_bm25); 0 = BM25 only proposes
        self.bm25 = None                 # pipeline.index.bm25.Bm25Index over the index's rows

    def set_index(self, index: SearchIndex) -> None:
        """Switch to another index version (an index refresh); call it between steps, never inside one."""
        old, self.index = self.index, index
        # a refreshed version holds the same passages in the same rows: its BM25 is the one we have
        if self.bm25 is not None and list(old.ids) != list(index.ids):
            self.attach_bm25(self.hybrid_k, self.bm25_weight)

    def attach_bm25(self, hybrid_k: int, weight: float = 0.0) -> "RagModel":
        """Hybrid candidates: BM25's top-`hybrid_k` join the dense top-K in `retrieve` (0 = dense only), and with
        `weight` > 0 the prior adds weight * BM25 score to the dense score / tau. The BM25 index is loaded from the
        index version's `bm25/`, or built there once."""
        from pipeline.index.bm25 import open_bm25     # bm25s (and scipy): only where hybrid candidates are used

        self.hybrid_k = int(hybrid_k)
        self.bm25_weight = float(weight) if self.hybrid_k > 0 else 0.0
        self.bm25 = open_bm25(self.index) if self.hybrid_k > 0 else None
        return self

    def width(self, k: int) -> int:
        """How many candidates `retrieve(questions, k)` returns: k, or k + H with hybrid candidates."""
        return k + (self.hybrid_k if self.bm25 is not None else 0)

    def add_posterior_encoder(self) -> TextEncoder:
        """Create q(z|x,y) as a copy of the prior query encoder (same weights), unless there is one already."""
        if self.posterior_encoder is None:
            self.posterior_encoder = copy.deepcopy(self.query_encoder)
        return self.posterior_encoder

    # ----------------------------------------------------------------------------------------- retrieval
    def search_rows(self, query_vectors: torch.Tensor, k: int) -> np.ndarray:
        m = min(self.rerank_top_m, len(self.index.ids))
        if self.passage_encoder is None or m == 0:
            return self._search(query_vectors, k)
        # the index's vectors are stale while the passage encoder trains: re-rank its top-M with the current one.
        # Asked for more than M (evaluation reads 20 for recall@20), the first M are the re-ranked ones, so the
        # first train.k rows are the ones training and serving use
        from pipeline.refresh import rerank_rows

        rows = self._search(query_vectors, max(m, k))
        texts = [[self.row_text(int(r)) for r in row[:m]] for row in rows]
        head = rerank_rows(query_vectors, rows[:, :m], texts, self.passage_encoder, min(m, k))[0]
        return np.concatenate([head, rows[:, m:k]], axis=1) if k > m else head

    def _search(self, query_vectors: torch.Tensor, k: int) -> np.ndarray:
        _, rows = self.index.search(query_vectors.detach().float().cpu().numpy().astype(np.float32), k)
        rows = np.asarray(rows)
        if (rows < 0).any():
            raise ValueError(f"index returned fewer than k={k} passages: the index holds {len(self.index.ids)}")
        return rows

    def candidates(self, rows: np.ndarray, query_vectors: torch.Tensor) -> Candidates:
        rows = np.asarray(rows)
        ids = [[str(self.index.ids[r]) for r in row] for row in rows]
        texts = [[self.row_text(int(r)) for r in row] for row in rows]
        return Candidates(rows=rows, ids=ids, texts=texts, query_vectors=query_vectors)

    def row_text(self, row: int) -> str:
        p = self.index.passage(int(row))
        return passage_text(p.get("title", ""), p["text"])

    def prior_rows(self, questions: list[str], query_vectors: torch.Tensor, k: int) -> np.ndarray:
        """The prior's candidate rows [B, width(k)]: the dense top-k, or with hybrid candidates the dense top-k
        united with BM25's top-H (`hybrid_union`), ordered by the prior's score (`prior_scores`)."""
        if self.bm25 is None or self.hybrid_k <= 0:
            return self.search_rows(query_vectors, k)
        width = self.width(k)
        if width > len(self.index.ids):
            raise ValueError(f"k={k} + retriever.hybrid_k={self.hybrid_k} candidates: more than the index holds "
                             f"({len(self.index.ids)})")
        dense = self.search_rows(query_vectors, width)
        _, sparse = self.bm25.search(questions, self.hybrid_k)
        rows = hybrid_union(dense, sparse, k)
        with torch.no_grad():
            scores = self.prior_scores(questions, query_vectors.detach(), rows).float().cpu().numpy()
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(rows, order, axis=1)

    def retrieve(self, questions: list[str], k: int) -> Candidates:
        """The prior's candidates: the top-k (with hybrid candidates, k + H: see `prior_rows`)."""
        q = self.query_encoder(questions)
        return self.candidates(self.prior_rows(questions, q, k), q)

    def posterior_vectors(self, questions: list[str], answers: list[str]) -> torch.Tensor:
        if self.posterior_encoder is None:
            raise ValueError("this estimator needs a posterior retriever: call model.add_posterior_encoder()")
        return self.posterior_encoder([posterior_query(q, a) for q, a in zip(questions, answers)])

    def retrieve_posterior(self, questions: list[str], answers: list[str], k: int) -> Candidates:
        q = self.posterior_vectors(questions, answers)
        return self.candidates(self.search_rows(q, k), q)

    def score_rows(self, query_vectors: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """[B, M] score / tau of index rows [B, M], differentiable in the query vectors."""
        rows = np.asarray(rows)
        if self.passage_encoder is not None:      # fresh passage vectors, differentiable in the passage encoder
            emb = self.passage_encoder([self.row_text(int(r)) for r in rows.reshape(-1)])
        else:
            emb = torch.from_numpy(np.asarray(self.index.embeddings[rows.reshape(-1)], dtype=np.float32))
        # at least fp32: under bf16 autocast the query vectors are bf16, and score / tau (tau ~ 0.05) in bf16 keeps
        # only ~3 significant digits of scores that differ in the third
        dtype = torch.promote_types(query_vectors.dtype, torch.float32)
        emb = emb.view(*rows.shape, -1).to(device=query_vectors.device, dtype=dtype)
        return (query_vectors.to(dtype).unsqueeze(1) * emb).sum(-1) / self.tau

    def prior_scores(self, questions: list[str], query_vectors: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """[B, M] logits of p(z|x) over rows [B, M]: score / tau, plus bm25_weight * BM25 score when the prior is
        fused (the BM25 part is a constant: the gradient reaches the query encoder only)."""
        scores = self.score_rows(query_vectors, rows)
        if self.bm25 is None or self.bm25_weight == 0:
            return scores
        sparse = torch.from_numpy(self.bm25.scores(questions, rows)).to(device=scores.device, dtype=scores.dtype)
        return scores + self.bm25_weight * sparse

    def doc_scores(self, questions: list[str], cand: Candidates) -> torch.Tensor:
        return self.prior_scores(questions, cand.query_vectors, cand.rows)

    # ----------------------------------------------------------------------------------------- generator
    def pair_logprobs(self, questions: list[str], passages: list[str], answers: list[str]):
        """Flat triples -> (token log-probs [N, T], target mask [N, T]) in one generator pass."""
        inputs = self.generator.encode_inputs(questions, passages)
        labels, mask = self.generator.encode_targets(answers)
        return self.generator.token_logprobs(inputs, labels), mask

    def answer_token_logprobs(self, questions: list[str], cand: Candidates, answers: list[str]):
        k = cand.rows.shape[1]
        flat_q = [q for q in questions for _ in range(k)]
        flat_p = [p for row in cand.texts for p in row]
        flat_a = [a for a in answers for _ in range(k)]
        token_lp, mask = self.pair_logprobs(flat_q, flat_p, flat_a)
        b = len(questions)
        return token_lp.view(b, k, -1), mask.view(b, k, -1)[:, 0]
