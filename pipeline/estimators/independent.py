"""The `independent` strategy (Lawton et al. 2025): retriever and generator trained apart on context labels.

- Retriever: InfoNCE over cosine scores / temperature: each question's gold passage against the other questions'
  gold passages (in-batch negatives) and its own top retrieved non-gold passages (hard negatives).
- Generator: NLL(y | x, gold passage).
Needs `gold_passage_ids` on every training row; `require_context_labels` fails with the file and field named.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.estimators.base import Estimator, EstimatorOutput, sequence_scores


def require_context_labels(rows: list[dict], source: str = "the training data") -> None:
    missing = [i for i, r in enumerate(rows) if not r.get("gold_passage_ids")]
    if missing:
        first = rows[missing[0]]
        raise ValueError(
            f"train.strategy=independent needs context labels: {len(missing)} of {len(rows)} rows of {source} "
            f"have no 'gold_passage_ids' field (first: row {missing[0]}, question {first.get('question')!r}). "
            "Add gold_passage_ids to the QA file, or use train.strategy=joint or two-phase (answers only).")


class Independent(Estimator):
    name = "independent"
    needs_rows = True

    def __init__(self, k: int = 5, cfg=None, hard_negatives: int = 4, temperature: float = 0.05):
        super().__init__(k, cfg)
        self.hard_negatives, self.temperature = hard_negatives, temperature
        self._row_of, self._row_of_index = None, None

    def _gold_rows(self, model, rows) -> list[int]:
        if self._row_of is None or self._row_of_index is not model.index:
            self._row_of = {str(pid): i for i, pid in enumerate(model.index.ids)}
            self._row_of_index = model.index
        out = []
        for r in rows:
            if not r.get("gold_passage_ids"):
                raise ValueError(f"train.strategy=independent: row {r.get('id') or r.get('question')!r} has no "
                                 "'gold_passage_ids'")
            found = [self._row_of[str(g)] for g in r["gold_passage_ids"] if str(g) in self._row_of]
            if not found:
                raise ValueError(f"train.strategy=independent: none of the gold_passage_ids {r['gold_passage_ids']} "
                                 f"of row {r.get('id') or r.get('question')!r} is in the index")
            out.append(found[0])
        return out

    def loss(self, model, questions, answers, rows=None):
        if rows is None:
            raise ValueError("train.strategy=independent needs the batch rows (gold_passage_ids)")
        b, h = len(questions), self.hard_negatives
        gold = self._gold_rows(model, rows)
        q = model.query_encoder(questions)                                         # [B, d], grad -> retriever
        golds_of = [{self._row_of[str(g)] for g in r["gold_passage_ids"] if str(g) in self._row_of} for r in rows]
        hard = []
        if h:
            retrieved = model.search_rows(q, min(h + 4, len(model.index.ids)))
            for i in range(b):
                neg = [int(r) for r in retrieved[i] if int(r) not in golds_of[i]][:h]
                hard.append(neg + [gold[i]] * (h - len(neg)))                      # padding masked below
        cols = np.array([gold + (hard[i] if h else []) for i in range(b)], dtype=np.int64)   # [B, B + h]
        scores = model.score_rows(q, cols) * model.tau / self.temperature
        valid = torch.ones(b, cols.shape[1], dtype=torch.bool, device=q.device)
        for i in range(b):
            for j in range(cols.shape[1]):
                if j != i and int(cols[i, j]) in golds_of[i]:                          # a positive, not a negative
                    valid[i, j] = False
        ret_loss = -torch.log_softmax(scores.masked_fill(~valid, float("-inf")), -1)[torch.arange(b), torch.arange(b)]
        token_lp, mask = model.pair_logprobs(questions, [model.row_text(g) for g in gold], answers)
        gen_loss = -sequence_scores(token_lp, mask)
        with torch.no_grad():
            acc = float((scores.masked_fill(~valid, float("-inf")).argmax(-1) == torch.arange(b)).float().mean())
            diag = {"nll": float(gen_loss.mean()), "retriever_loss": float(ret_loss.mean()),
                    "retriever_accuracy": acc}
        return EstimatorOutput((ret_loss + gen_loss).mean(), diag)
