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

    def set_index(self, index: SearchIndex) -> None:
        """Switch to another index version (an index refresh); call it between steps, never inside one."""
        self.index = index

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

    def retrieve(self, questions: list[str], k: int) -> Candidates:
        q = self.query_encoder(questions)
        return self.candidates(self.search_rows(q, k), q)

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

    def doc_scores(self, questions: list[str], cand: Candidates) -> torch.Tensor:
        return self.score_rows(cand.query_vectors, cand.rows)

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
