"""RagModel: the retriever (query encoder over a FAISS index version) and the generator, seen as one model.

Estimators use three calls:
    cand = model.retrieve(questions, k)                 # top-K rows from the index (search without gradient)
    model.doc_scores(questions, cand) -> [B, K]         # score / tau, differentiable in the query encoder
    model.answer_token_logprobs(questions, cand, answers) -> ([B, K, T], mask [B, T])   # one generator pass
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.index import passage_text
from pipeline.models.generator import Generator
from pipeline.models.retriever import TextEncoder


@dataclass
class Candidates:
    rows: np.ndarray                     # [B, K] row numbers in the index
    ids: list[list[str]]                 # passage ids
    texts: list[list[str]]               # passage texts as the generator reads them
    query_vectors: torch.Tensor          # [B, d], with gradient when the query encoder trains


class RagModel(nn.Module):
    def __init__(self, query_encoder: TextEncoder, generator: Generator, index, tau: float = 0.05):
        super().__init__()
        self.query_encoder = query_encoder
        self.generator = generator
        self.index = index               # pipeline.index.LoadedIndex (not a module: it is not trained here)
        self.tau = tau

    def retrieve(self, questions: list[str], k: int) -> Candidates:
        q = self.query_encoder(questions)
        _, rows = self.index.search(q.detach().float().cpu().numpy().astype(np.float32), k)
        rows = np.asarray(rows)
        if (rows < 0).any():
            raise ValueError(f"index returned fewer than k={k} passages: the index holds {len(self.index.ids)}")
        ids = [[str(self.index.ids[r]) for r in row] for row in rows]
        texts = []
        for row in rows:
            passages = [self.index.passage(int(r)) for r in row]
            texts.append([passage_text(p.get("title", ""), p["text"]) for p in passages])
        return Candidates(rows=rows, ids=ids, texts=texts, query_vectors=q)

    def doc_scores(self, questions: list[str], cand: Candidates) -> torch.Tensor:
        emb = torch.from_numpy(np.asarray(self.index.embeddings[cand.rows.reshape(-1)], dtype=np.float32))
        emb = emb.view(*cand.rows.shape, -1).to(cand.query_vectors.device)
        return (cand.query_vectors.unsqueeze(1) * emb).sum(-1) / self.tau

    def answer_token_logprobs(self, questions: list[str], cand: Candidates, answers: list[str]):
        k = cand.rows.shape[1]
        flat_q = [q for q in questions for _ in range(k)]
        flat_p = [p for row in cand.texts for p in row]
        flat_a = [a for a in answers for _ in range(k)]
        inputs = self.generator.encode_inputs(flat_q, flat_p)
        labels, mask = self.generator.encode_targets(flat_a)
        token_lp = self.generator.token_logprobs(inputs, labels)
        b = len(questions)
        return token_lp.view(b, k, -1), mask.view(b, k, -1)[:, 0]
