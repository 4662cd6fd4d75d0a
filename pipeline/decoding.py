"""Decoding a RagModel.

- RAG-Sequence: beam search under each of the K passages, then each distinct answer y is scored by
  log sum_k p(z_k|x) p(y|x,z_k): `fast` sums only over the passages whose beams produced y,
  `thorough` rescores every distinct answer under all K passages (one batched pass).
- RAG-Token: beam search over the marginal next-token distribution sum_k p(z_k|x) p(y_t|x,z_k,y_<t).
Each returns the answer, its score (a log-probability) and the K passages with p(z|x) and p(z|x,y).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodedAnswer:
    answer: str
    score: float
    passages: list[dict] = field(default_factory=list)   # {id, text, probability, posterior}


def beam_search(step, n: int, start_id: int, eos_id: int, pad_id: int, num_beams: int, max_len: int,
                device=None) -> list[list[tuple[list[int], float]]]:
    """Generic beam search. `step(prefix [n*num_beams, t]) -> [n*num_beams, V]` log-probabilities.

    Returns, per source, the beams as (token ids without start/eos, total log-probability), best first.
    """
    nb = num_beams
    prefix = torch.full((n * nb, 1), start_id, dtype=torch.long, device=device)
    scores = torch.zeros(n, nb, device=device)
    scores[:, 1:] = float("-inf")                 # all beams start identical: keep one
    finished = torch.zeros(n * nb, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logp = step(prefix).float()
        vocab = logp.size(-1)
        if finished.any():
            logp[finished] = float("-inf")
            logp[finished, pad_id] = 0.0          # a finished beam only extends with padding, at no cost
        total = (scores.view(-1, 1) + logp).view(n, nb * vocab)
        top_scores, top_idx = total.topk(nb, dim=-1)
        beam = torch.div(top_idx, vocab, rounding_mode="floor")
        tokens = top_idx % vocab
        rows = (torch.arange(n, device=device).unsqueeze(1) * nb + beam).view(-1)
        prefix = torch.cat([prefix[rows], tokens.view(-1, 1)], dim=1)
        finished = finished[rows] | tokens.view(-1).eq(eos_id)
        scores = top_scores
        if bool(finished.all()):
            break
    out = []
    for i in range(n):
        beams = []
        for j in range(nb):
            ids = []
            for tok in prefix[i * nb + j, 1:].tolist():
                if tok in (eos_id, pad_id):
                    break
                ids.append(tok)
            if scores[i, j] > float("-inf"):
                beams.append((ids, float(scores[i, j])))
        out.append(beams)
    return out


def _passages(cand, b: int, doc_logprobs: torch.Tensor, posterior: torch.Tensor | None) -> list[dict]:
    return [{"id": cand.ids[b][k], "text": cand.texts[b][k], "probability": float(doc_logprobs[b, k].exp()),
             "posterior": None if posterior is None else float(posterior[k])}
            for k in range(len(cand.ids[b]))]


def _retrieve_and_encode(model, questions: list[str], k: int, candidates):
    """Top-k candidates, log p(z|x) [B, K], and generator inputs for every (question, passage) pair."""
    cand = model.retrieve(questions, k) if candidates is None else candidates.top(k)
    doc_lp = torch.log_softmax(model.doc_scores(questions, cand), -1)
    inputs = model.generator.encode_inputs([q for q in questions for _ in range(k)],
                                           [p for row in cand.texts for p in row])
    return cand, doc_lp, inputs


@torch.no_grad()
def rag_sequence_decode(model, questions: list[str], k: int = 5, num_beams: int = 1, max_len: int | None = None,
                        thorough: bool = False, candidates=None) -> list[DecodedAnswer]:
    """`candidates`: an earlier `model.retrieve(questions, >= k)`, reused instead of retrieving again."""
    gen = model.generator
    max_len = max_len or gen.max_target_length
    cand, doc_lp, inputs = _retrieve_and_encode(model, questions, k, candidates)
    b = len(questions)
    state = gen.start_decoding(inputs)
    state = gen.select_state(state, torch.arange(b * k, device=inputs["input_ids"].device).repeat_interleave(num_beams))
    beams = beam_search(lambda prefix: gen.decode_step(state, prefix), b * k, gen.start_token_id, gen.eos_token_id,
                        gen.tokenizer.pad_token_id, num_beams, max_len, device=inputs["input_ids"].device)
    results = []
    for i in range(b):
        # answer text -> list of (passage, log p(y|x,z_k)) from the beams that produced it
        produced: dict[str, dict[int, float]] = {}
        for kk in range(k):
            for ids, lp in beams[i * k + kk]:
                text = gen.decode(ids)
                produced.setdefault(text, {})
                produced[text][kk] = max(lp, produced[text].get(kk, float("-inf")))
        texts = list(produced)
        if thorough:
            seq_lp = _score_answers(model, questions[i], cand.texts[i], texts)           # [A, K]
        else:
            seq_lp = torch.full((len(texts), k), float("-inf"))
            for a, text in enumerate(texts):
                for kk, lp in produced[text].items():
                    seq_lp[a, kk] = lp
        joint = seq_lp + doc_lp[i].cpu().unsqueeze(0)
        scores = torch.logsumexp(joint, dim=1)
        best = int(scores.argmax())
        posterior = torch.softmax(joint[best], 0)
        results.append(DecodedAnswer(texts[best], float(scores[best]), _passages(cand, i, doc_lp.cpu(), posterior)))
    return results


def _score_answers(model, question: str, passages: list[str], answers: list[str]) -> torch.Tensor:
    """[A, K] log p(answer_a | question, passage_k), in one batched forward pass."""
    gen = model.generator
    k = len(passages)
    inputs = gen.encode_inputs([question] * (len(answers) * k), passages * len(answers))
    labels, mask = gen.encode_targets([a for a in answers for _ in range(k)])
    token_lp = gen.token_logprobs(inputs, labels)
    return (token_lp * mask).sum(-1).view(len(answers), k).cpu()


@torch.no_grad()
def rag_token_decode(model, questions: list[str], k: int = 5, num_beams: int = 1,
                     max_len: int | None = None, candidates=None) -> list[DecodedAnswer]:
    gen = model.generator
    max_len = max_len or gen.max_target_length
    cand, doc_lp, inputs = _retrieve_and_encode(model, questions, k, candidates)
    b = len(questions)
    device = inputs["input_ids"].device
    state = gen.start_decoding(inputs)
    # rows ordered (question, beam, passage): every beam of a question sees all K passages
    order = (torch.arange(b, device=device).view(b, 1, 1) * k
             + torch.arange(k, device=device).view(1, 1, k)).expand(b, num_beams, k).reshape(-1)
    state = gen.select_state(state, order)
    prior = doc_lp.to(device).repeat_interleave(num_beams, 0)             # [b*nb, K]

    def step(prefix):
        logp = gen.decode_step(state, prefix.repeat_interleave(k, 0))       # [b*nb*K, V]
        logp = logp.view(prefix.size(0), k, -1)
        return torch.logsumexp(logp + prior.unsqueeze(-1), dim=1)

    beams = beam_search(step, b, gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams,
                        max_len, device=device)
    results = []
    for i in range(b):
        ids, score = beams[i][0]
        results.append(DecodedAnswer(gen.decode(ids), score, _passages(cand, i, doc_lp.cpu(), None)))
    return results
