"""`jsa`: joint stochastic approximation for RAG (JSA-RAG, arXiv 2508.18168).

Per example:
  1. C = prior top-K (with `retriever.hybrid_k`, the prior's hybrid K + H) ∪ posterior top-K (∪ the cached passage of this example, when it has one), searched
     without gradient; p(z|x) and q(z|x,y) are softmax(score / tau) normalised over C (as in the reference code).
  2. n proposals h'_1..h'_n ~ q(z|x,y) (with replacement). Every distinct proposal (and the chain's start) is scored
     once, in one batched no-grad generator pass: l(h) = log p(y|x,h), exact (sum over tokens) or length-normalised
     (per-token mean), `estimator.jsa_likelihood`.
  3. Metropolis independence sampler with q as proposal: from state h, accept h' with probability
        min(1, [p(h') e^{l(h')} / q(h')] / [p(h) e^{l(h)} / q(h)]).
     The chain starts from the example's cache (the passage it last accepted, as in the original JSA algorithm),
     or, with no cache, the first proposal is taken as the start. The chain's stationary law is the posterior
     p(z|x,y) ∝ p(z|x) p(y|x,z) over C (exact likelihood). States after each of the n proposals are kept.
  4. loss = sum_u w_u [NLL(y|x,u) - log p(u|x) - log q(u|x,y)] over the distinct accepted states u, w_u = their
     frequency among the n states. One generator pass with gradient over those distinct states. Prior, posterior
     and generator all learn from the accepted states (stochastic approximation of the posterior's moments).
  5. Optionally (`estimator.jsa_flat_nats` > 0), an example whose scored candidates' log-likelihoods all lie within
     that many nats of each other (the generator cannot tell its passages apart: yes/no answers) keeps its
     generator and posterior terms but not its prior term: there the posterior equals the prior over C, so
     E[grad log p(u|x)] = 0 and the term is zero-mean noise in the retriever's gradient. Measured on cmu_qa_wiki with the MiniLM reader at the start:
     yes/no answers spread 0.03 nats (median; 96% under 0.5), other answers 43 (90% over 1). Off by default: 0.5
     changed nothing measurable there (benchmarks/results/quality_cmu_minilm, 240 steps, 2 seeds).
  The cache (question id, or the question text when rows carry no id -> passage id of the last state) is in
  `state_dict`, so a resumed run continues every chain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.estimators.base import Estimator, EstimatorOutput, entropy, masked_log_softmax, sequence_scores
from pipeline.estimators.registry import EstimatorSettings, register


@dataclass
class JsaConfig(EstimatorSettings):
    prefix = "jsa"
    num_proposals: int = 20            # Metropolis independence sampler steps (proposals) per example
    likelihood: str = "exact"          # exact | normalized (per-token mean log-likelihood in the ratio)
    cache: bool = True                 # start each chain from the example's last accepted passage
    flat_nats: float = 0.0             # prior term dropped below this log-likelihood spread (0 = never)

    def validate(self, config=None) -> None:
        if self.likelihood not in ("exact", "normalized"):
            raise ConfigError(f"{self.key('likelihood')}: {self.likelihood!r}; choose exact or normalized")
        if self.flat_nats < 0:
            raise ConfigError(f"{self.key('flat_nats')}: must be >= 0, got {self.flat_nats}")
        if self.num_proposals < 1:
            raise ConfigError(f"{self.key('num_proposals')}: must be >= 1, got {self.num_proposals}")


def mis_chain(log_w: torch.Tensor, proposals: torch.Tensor, init: torch.Tensor, uniforms: torch.Tensor):
    """Metropolis independence sampler, vectorised over B chains.

    log_w [B, M]: log [target(h) / proposal(h)] up to a constant per row (only entries that are proposed or the
    start are read); proposals [B, n] indices into M; init [B] start index, -1 = take the first proposal;
    uniforms [B, n] in (0, 1). Returns (states [B, n], accepted [B, n] bool, tested [B, n] bool)."""
    b, n = proposals.shape
    cur = init.clone()
    has = init >= 0
    states, accepted, tested = [], [], []
    for i in range(n):
        prop = proposals[:, i]
        lw_prop = log_w.gather(1, prop.unsqueeze(1)).squeeze(1)
        lw_cur = log_w.gather(1, cur.clamp_min(0).unsqueeze(1)).squeeze(1)
        acc = torch.log(uniforms[:, i]) < (lw_prop - lw_cur)
        acc = torch.where(has, acc, torch.ones_like(acc))
        cur = torch.where(acc, prop, cur)
        states.append(cur.clone())
        accepted.append(acc & has)
        tested.append(has.clone())
        has = torch.ones_like(has)
    return torch.stack(states, 1), torch.stack(accepted, 1), torch.stack(tested, 1)


def state_weights(states: torch.Tensor, m: int) -> torch.Tensor:
    """[B, n] state indices -> [B, m] frequency weights (rows sum to one)."""
    counts = torch.zeros(states.size(0), m, dtype=torch.float64, device=states.device)
    counts.scatter_add_(1, states, torch.ones_like(states, dtype=torch.float64))
    return counts / states.size(1)


def jsa_loss(weights: torch.Tensor, seq_logprobs: torch.Tensor, log_prior: torch.Tensor,
             log_post: torch.Tensor, prior_on: torch.Tensor | None = None) -> torch.Tensor:
    """Per example [B]: sum_u w_u [-l(u) - log p(u) - log q(u)]; entries with w = 0 do not count (even if -inf).
    `prior_on` [B] bool: False leaves that example's log p(u) out."""
    w = weights.to(log_prior.dtype)
    used = w > 0
    if prior_on is not None:
        log_prior = torch.where(prior_on.unsqueeze(-1), log_prior, torch.zeros_like(log_prior))
    terms = -(seq_logprobs + log_prior + log_post)
    return (w * terms.masked_fill(~used, 0.0)).sum(-1)


def flat_likelihood(loglik: torch.Tensor, nats: float) -> torch.Tensor:
    """[B, M] log p(y|x,h) (nan where not scored) -> [B] True where at least two candidates were scored and all lie
    within `nats` of each other."""
    scored = ~loglik.isnan()
    hi = loglik.masked_fill(~scored, float("-inf")).max(-1).values
    lo = loglik.masked_fill(~scored, float("inf")).min(-1).values
    return (scored.sum(-1) >= 2) & ((hi - lo) < nats)


@dataclass
class JsaSample:
    rows: np.ndarray            # [B, M] index rows of C (padded with the first row)
    mask: torch.Tensor          # [B, M] True on real members of C
    log_prior: torch.Tensor     # [B, M] with gradient
    log_post: torch.Tensor      # [B, M] with gradient
    proposals: torch.Tensor     # [B, n]
    states: torch.Tensor        # [B, n]
    accepted: torch.Tensor      # [B, n]
    tested: torch.Tensor        # [B, n]
    loglik: torch.Tensor        # [B, M] no-grad log p(y|x,h) as used in the ratio (nan where not scored)
    scored: int                 # generator rows scored without gradient


@register
class Jsa(Estimator):
    name = "jsa"
    config = JsaConfig
    decoder = "rag-sequence"
    needs_posterior = True
    needs_rows = True

    def __init__(self, k: int = 5, cfg=None):
        super().__init__(k, cfg)
        self.cache: dict[str, str] = {}
        self._row_of: dict[str, int] | None = None
        self._row_of_index = None

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"cache": dict(self.cache)}

    def load_state_dict(self, state: dict) -> None:
        self.cache = dict(state.get("cache", {}))

    @staticmethod
    def keys(questions, rows) -> list[str]:
        if rows is None:
            return list(questions)
        return [str(r["id"]) if r.get("id") not in (None, "") else q for q, r in zip(questions, rows)]

    def _row_lookup(self, model) -> dict[str, int]:
        if self._row_of is None or self._row_of_index is not model.index:
            self._row_of = {str(pid): i for i, pid in enumerate(model.index.ids)}
            self._row_of_index = model.index
        return self._row_of

    # ------------------------------------------------------------------------------------------ sampler
    def sample(self, model, questions, answers, rows=None, generator: torch.Generator | None = None) -> JsaSample:
        b, n = len(questions), self.cfg.num_proposals
        prior_q = model.query_encoder(questions)                                   # grad -> prior
        post_q = model.posterior_vectors(questions, answers)                       # grad -> posterior
        # the prior's candidates (with hybrid candidates, BM25's top-H too); the posterior searches densely
        prior_rows, post_rows = model.prior_rows(questions, prior_q, self.k), model.search_rows(post_q, self.k)
        keys = self.keys(questions, rows)
        row_of = self._row_lookup(model) if self.cfg.cache and self.cache else {}
        sets, init = [], []
        for i in range(b):
            members = list(dict.fromkeys(int(r) for r in (*prior_rows[i], *post_rows[i])))
            cached = row_of.get(self.cache.get(keys[i], "")) if self.cfg.cache else None
            if cached is not None and cached not in members:
                members.append(cached)
            init.append(members.index(cached) if cached is not None else -1)
            sets.append(members)
        m = max(len(s) for s in sets)
        c_rows = np.array([s + [s[0]] * (m - len(s)) for s in sets], dtype=np.int64)
        mask = torch.tensor([[j < len(s) for j in range(m)] for s in sets], device=prior_q.device)
        log_prior = masked_log_softmax(model.prior_scores(questions, prior_q, c_rows), mask)
        log_post = masked_log_softmax(model.score_rows(post_q, c_rows), mask)
        init_t = torch.tensor(init, dtype=torch.long, device=prior_q.device)

        with torch.no_grad():
            q_probs = log_post.detach().exp().float()
            proposals = torch.multinomial(q_probs, n, replacement=True, generator=generator)     # [B, n]
            uniforms = torch.rand(b, n, generator=generator, dtype=torch.float64).clamp_min(1e-300).to(q_probs.device)
            # each distinct proposal (and the chain's start) scored once, one batched pass
            need = [sorted(set(proposals[i].tolist()) | ({init[i]} if init[i] >= 0 else set())) for i in range(b)]
            flat = [(i, j) for i in range(b) for j in need[i]]
            was_training = model.generator.training
            model.generator.eval()
            token_lp, tmask = model.pair_logprobs([questions[i] for i, _ in flat],
                                                  [model.row_text(int(c_rows[i, j])) for i, j in flat],
                                                  [answers[i] for i, _ in flat])
            model.generator.train(was_training)
            ell = sequence_scores(token_lp.double(), tmask, normalized=self.cfg.likelihood == "normalized")
            loglik = torch.full((b, m), float("nan"), dtype=torch.float64, device=prior_q.device)
            loglik[torch.tensor([i for i, _ in flat]), torch.tensor([j for _, j in flat])] = ell
            log_w = (log_prior.detach().double() + loglik - log_post.detach().double()).nan_to_num(nan=-1e30)
            states, accepted, tested = mis_chain(log_w, proposals, init_t, uniforms)
        return JsaSample(c_rows, mask, log_prior, log_post, proposals, states, accepted, tested, loglik, len(flat))

    # --------------------------------------------------------------------------------------------- loss
    def loss(self, model, questions, answers, rows=None):
        s = self.sample(model, questions, answers, rows)
        b, m = s.rows.shape
        weights = state_weights(s.states, m)                                           # [B, M]
        used = [(i, j) for i in range(b) for j in range(m) if weights[i, j] > 0]
        token_lp, tmask = model.pair_logprobs([questions[i] for i, _ in used],
                                              [model.row_text(int(s.rows[i, j])) for i, j in used],
                                              [answers[i] for i, _ in used])           # grad -> generator
        seq = sequence_scores(token_lp, tmask)
        seq_full = torch.zeros(b, m, dtype=seq.dtype, device=seq.device)
        seq_full = seq_full.index_put((torch.tensor([i for i, _ in used]), torch.tensor([j for _, j in used])), seq)
        flat = flat_likelihood(s.loglik, self.cfg.flat_nats).to(seq.device)
        per_example = jsa_loss(weights, seq_full, s.log_prior, s.log_post, prior_on=~flat)
        if self.cfg.cache:
            for i, key in enumerate(self.keys(questions, rows)):
                self.cache[key] = str(model.index.ids[int(s.rows[i, int(s.states[i, -1])])])
        with torch.no_grad():
            tests = float(s.tested.sum())
            distinct = (weights > 0).sum(-1).double()
            w = weights.to(seq.dtype)
            diag = {
                "nll": float((-(w * seq_full).sum(-1)).mean()),
                "acceptance_rate": float(s.accepted.sum()) / tests if tests else 0.0,
                "distinct_states": float(distinct.mean()),
                "distinct_proposals": s.scored / b,
                "candidates": float(s.mask.sum(-1).double().mean()),
                "prior_entropy": float(entropy(s.log_prior).mean()),
                "posterior_entropy": float(entropy(s.log_post).mean()),
                "prior_top1_agree": float((s.log_prior.argmax(-1) == s.log_post.argmax(-1)).float().mean()),
                "cache_size": float(len(self.cache)),
                "flat_share": float(flat.double().mean()),
            }
        return EstimatorOutput(per_example.mean(), diag)
