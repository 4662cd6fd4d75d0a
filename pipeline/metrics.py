"""Answer and retrieval metrics: SQuAD-style EM/F1 and recall@k."""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1 evaluation)."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_list(answers)))


def _f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: str | Sequence[str]) -> float:
    """Token-level F1 of the prediction against each answer; the maximum over answers."""
    answers = _as_list(answers)
    return max((_f1(prediction, a) for a in answers), default=0.0)


YES_NO = ("yes", "no")


def answer_type(answers: str | Sequence[str]) -> str:
    """"yes/no" when every gold answer normalises to yes or no, else "other": F1 is reported for each, because a
    reader that always says "yes" gets a fair F1 on yes/no questions and nothing on the rest."""
    normed = [normalize_answer(a) for a in _as_list(answers)]
    return "yes/no" if normed and all(a in YES_NO for a in normed) else "other"


def f1_by_answer_type(f1s: Sequence[float], answers: Sequence[Sequence[str]]) -> dict:
    """``f1_yes_no`` and ``f1_other``: mean F1 over the questions of each `answer_type` (None when there are none),
    and ``num_yes_no``."""
    groups: dict[str, list[float]] = {"yes/no": [], "other": []}
    for f1, a in zip(f1s, answers):
        groups[answer_type(a)].append(f1)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"f1_yes_no": mean(groups["yes/no"]), "f1_other": mean(groups["other"]),
            "num_yes_no": len(groups["yes/no"])}


def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold: Sequence[Sequence[str] | None], k: int) -> float | None:
    """Fraction of questions with any gold passage id among the first ``k`` retrieved ids.

    Questions without gold ids are left out; None when no question has any.
    """
    if len(retrieved_ids) != len(gold):
        raise ValueError(f"retrieved_ids has {len(retrieved_ids)} questions, gold has {len(gold)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = total = 0
    for retrieved, gold_ids in zip(retrieved_ids, gold):
        if not gold_ids:
            continue
        total += 1
        gold_set = {str(g) for g in gold_ids}
        hits += any(str(r) in gold_set for r in list(retrieved)[:k])
    return hits / total if total else None


def aggregate(predictions: Sequence[str] | None = None, answers: Sequence[Sequence[str]] | None = None,
              retrieved_ids: Sequence[Sequence[str]] | None = None,
              gold_passage_ids: Sequence[Sequence[str]] | None = None,
              ks: Sequence[int] = (1, 5, 20)) -> dict:
    """The metrics every run reports: ``em``, ``f1`` (means over questions, in [0, 1]), ``recall@k`` for each k
    in ``ks`` (None without gold ids or retrievals) and ``num_questions``."""
    out: dict = {"em": None, "f1": None}
    num = None
    if predictions is not None:
        if answers is None or len(answers) != len(predictions):
            raise ValueError("answers must be given, one list per prediction")
        num = len(predictions)
        if num:
            out["em"] = sum(exact_match(p, a) for p, a in zip(predictions, answers)) / num
            out["f1"] = sum(f1_score(p, a) for p, a in zip(predictions, answers)) / num
    for k in ks:
        out[f"recall@{k}"] = None
    if retrieved_ids is not None and gold_passage_ids is not None:
        if num is not None and len(retrieved_ids) != num:
            raise ValueError(f"{len(retrieved_ids)} retrievals for {num} predictions")
        num = len(retrieved_ids) if num is None else num
        for k in ks:
            out[f"recall@{k}"] = recall_at_k(retrieved_ids, gold_passage_ids, k)
    out["num_questions"] = num or 0
    return out
