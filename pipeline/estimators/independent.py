"""The `independent` strategy (Lawton et al. 2025): retriever and generator trained apart on context labels.

A strategy objective, not an estimator: `train.strategy=independent` trains this loss instead of train.estimator's
(which then only chooses the decoder). Its settings keep their keys in `train:` (train.independent_*).

- Retriever: InfoNCE over cosine scores / temperature: each question's gold passage against the other questions'
  gold passages (in-batch negatives) and its own top retrieved non-gold passages (hard negatives).
- Generator: NLL(y | x, gold passage).
A gold id names a corpus row; every window of a split row is gold (never a negative), and the one the loss pulls
towards and the generator reads is the first window that holds an answer (else the first).
Needs `gold_passage_ids` on every training row; `require_context_labels` fails with the file and field named.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data import GoldPassages
from pipeline.estimators.base import Estimator, EstimatorOutput, sequence_scores
from pipeline.estimators.registry import EstimatorSettings, register_strategy
from pipeline.metrics import normalize_answer


def require_context_labels(rows: list[dict], source: str = "the training data") -> None:
    missing = [i for i, r in enumerate(rows) if not r.get("gold_passage_ids")]
    if missing:
        first = rows[missing[0]]
        raise ValueError(
            f"train.strategy=independent needs context labels: {len(missing)} of {len(rows)} rows of {source} "
            f"have no 'gold_passage_ids' field (first: row {missing[0]}, question {first.get('question')!r}). "
            "Add gold_passage_ids to the QA file, or use train.strategy=joint or two-phase (answers only).")


@dataclass
class IndependentConfig(EstimatorSettings):
    # TrainConfig declares the same two keys (train.independent_*) with the same defaults (a test checks)
    prefix = "independent"
    section = "train"
    hard_negatives: int = 4            # top retrieved non-gold passages per question
    temperature: float = 0.05          # InfoNCE temperature over cosine scores

    def validate(self, config=None) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{self.key('temperature')}: must be > 0, got {self.temperature}")
        if self.hard_negatives < 0:
            raise ConfigError(f"{self.key('hard_negatives')}: must be >= 0")


@register_strategy("independent", "its own objective: retriever contrastive on gold_passage_ids + generator NLL "
                                  "on the gold passage (train.estimator only chooses the decoder)")
class Independent(Estimator):
    name = "independent"
    config = IndependentConfig
    needs_rows = True

    def __init__(self, k: int = 5, cfg=None, hard_negatives: int | None = None, temperature: float | None = None):
        super().__init__(k, cfg)
        self.hard_negatives = self.cfg.hard_negatives if hard_negatives is None else hard_negatives
        self.temperature = self.cfg.temperature if temperature is None else temperature
        self._row_of, self._row_of_index, self._gold_of = None, None, None

    @classmethod
    def for_strategy(cls, estimator, train_cfg, rows: list[dict], data_source: str = "the training data"):
        """The objective of train.strategy=independent, in place of `estimator` (whose k it keeps)."""
        require_context_labels(rows, data_source)
        return cls(k=getattr(estimator, "k", 5), cfg=IndependentConfig.from_flat(train_cfg))

    def _gold_rows(self, model, rows) -> list[list[int]]:
        """Each row's gold passages as index rows: every window of a split corpus row (`GoldPassages`)."""
        if self._row_of is None or self._row_of_index is not model.index:
            self._row_of = {str(pid): i for i, pid in enumerate(model.index.ids)}
            self._gold_of = GoldPassages(model.index.ids)
            self._row_of_index = model.index
        out = []
        for r in rows:
            name = repr(r.get("id") or r.get("question"))
            if not r.get("gold_passage_ids"):
                raise ValueError(f"train.strategy=independent: row {name} has no 'gold_passage_ids'")
            unknown = self._gold_of.unknown(r["gold_passage_ids"])
            if unknown:
                raise ValueError(f"train.strategy=independent: gold_passage_ids {unknown} of row {name} name no "
                                 "passage of the index")
            out.append([self._row_of[p] for p in self._gold_of.passages(r["gold_passage_ids"])])
        return out

    @staticmethod
    def _positive(model, golds: list[int], answers: list[str]) -> int:
        """The gold passage the loss pulls towards and the generator reads: the first that holds an answer (a
        long row's windows mostly do not), else the first."""
        if len(golds) == 1:
            return golds[0]
        wanted = [f" {normalize_answer(a)} " for a in answers if normalize_answer(a)]
        for row in golds:
            text = f" {normalize_answer(model.row_text(row))} "
            if any(a in text for a in wanted):
                return row
        return golds[0]

    def loss(self, model, questions, answers, rows=None):
        if rows is None:
            raise ValueError("train.strategy=independent needs the batch rows (gold_passage_ids)")
        b, h = len(questions), self.hard_negatives
        gold_lists = self._gold_rows(model, rows)
        gold = [self._positive(model, g, r.get("answers") or [a]) for g, r, a in zip(gold_lists, rows, answers)]
        q = model.query_encoder(questions)                                         # [B, d], grad -> retriever
        golds_of = [set(g) for g in gold_lists]                                    # never negatives
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
