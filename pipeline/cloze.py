"""Reading practice from a corpus without labels: salient-span cloze questions (after REALM's salient span masking).

A sentence of a passage with one salient span (a run of capitalised words that does not start the sentence, or a
number or year) replaced by "what", read against that passage, with the span as the answer:

    passage  "... Lincoln was born in Hodgenville, Kentucky, in 1809. ..."
    question "Lincoln was born in what, Kentucky, in 1809?"          answer "Hodgenville"

REALM found the spans with a named-entity tagger and a date regex; no tagger ships offline here, so capitalisation
and digits stand in for it. The reader learns to find the span whose context matches the question's, which is what
extractive questions about a passage ask of it. No Ray and no torch here: `jobs.pretrain_reader` maps it over the
corpus with Ray Data.
"""
from __future__ import annotations

import random
import re
import zlib

MASK = "what"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# a run of capitalised words (with inner "of", "the", "de", ... allowed), or a number / year
_CAPITALISED = re.compile(r"\b[A-Z][\w'\-]*(?:\s+(?:of|the|de|von|van|and|du|la)?\s*[A-Z][\w'\-]*)*")
_NUMBER = re.compile(r"\b\d[\d,.]*\d\b|\b\d\b")
_REFERENCE = re.compile(r"\bURL\b|https?://|\bISBN\b|\bRetrieved\b|\baccessed\b")   # citations, not prose
MIN_SENTENCE_WORDS, MAX_SENTENCE_WORDS, MAX_SPAN_WORDS = 6, 40, 4


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def salient_spans(sentence: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the salient spans of a sentence: capitalised runs not at its start, and
    numbers; at most MAX_SPAN_WORDS words each."""
    spans = []
    for m in _CAPITALISED.finditer(sentence):
        if m.start() == 0 or len(m.group().split()) > MAX_SPAN_WORDS:
            continue
        spans.append((m.start(), m.end()))
    spans += [(m.start(), m.end()) for m in _NUMBER.finditer(sentence)]
    return sorted(set(spans))


def cloze_examples(passage_id: str, title: str, text: str, per_passage: int = 2, seed: int = 0) -> list[dict]:
    """Up to `per_passage` (question, passage, answer) examples from one passage: each from a different sentence of
    MIN..MAX_SENTENCE_WORDS words, one salient span of it masked. Deterministic in (seed, passage_id), so every
    Ray task and every rerun makes the same examples."""
    rng = random.Random(zlib.crc32(f"{seed}:{passage_id}".encode()))
    candidates = []
    for s in sentences(text):
        words = len(s.split())
        if MIN_SENTENCE_WORDS <= words <= MAX_SENTENCE_WORDS and not _REFERENCE.search(s):
            spans = salient_spans(s)
            if spans:
                candidates.append((s, spans))
    rng.shuffle(candidates)
    out = []
    for s, spans in candidates[:per_passage]:
        start, end = rng.choice(spans)
        answer = s[start:end]
        question = (s[:start] + MASK + s[end:]).rstrip(" .!;:")
        out.append({"passage_id": passage_id, "question": question + "?", "passage_title": title,
                    "passage": text, "answer": answer})
    return out
