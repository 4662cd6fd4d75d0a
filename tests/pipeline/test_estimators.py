"""Estimators on a tiny synthetic "model" with known tables (fast, double precision, no Ray, no downloads).

The fake model is a real `RagModel` whose index, encoders and generator are lookup tables:
prior score table [Q, N], posterior score table [Q, N], generator token log-prob table [Q, N, T].
So retrieval, candidate sets, scoring and the estimators' own code all run for real.
"""
import dataclasses
import importlib
import inspect
import itertools
import pickle
import pkgutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import pipeline.estimators
from pipeline.config import (ESTIMATORS, STRATEGIES, Config, ConfigError, EstimatorConfig, TrainConfig, load_config,
                             read_yaml_mapping, save_config)
from pipeline.estimators import REGISTRY, build_estimator
from pipeline.estimators import registry as est_registry
from pipeline.estimators.base import Estimator, EstimatorOutput
from pipeline.estimators.distill import emdr2_loss, pdist_loss, replug_lsr_loss
from pipeline.estimators.dro import dro_loss, dro_weights, plackett_luce_logprob, plackett_luce_sample
from pipeline.estimators.independent import require_context_labels
from pipeline.estimators.independent import IndependentConfig
from pipeline.estimators.jsa import Jsa, mis_chain, state_weights
from pipeline.estimators.rag_token import RagToken
from pipeline.estimators.registry import EstimatorSettings, objective_for, register, resolve_objective
from pipeline.evaluation import decoder_for
from pipeline.index import ArrayIndex
from pipeline.rag import POSTERIOR_SEP, RagModel
from pipeline.training import RagTrainer

N_PASSAGES, T = 6, 2
ALL = sorted(REGISTRY)                                       # every registered estimator, no list kept by hand
EXACT_GRADIENT = ["rag-sequence", "rag-token", "vrag", "jsa", "exact"]   # no stop-gradient inside their losses


class FakeEncoder(nn.Module):
    """'q3' (or 'q3 [SEP] answer') -> row 3 of a score table."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, texts):
        idx = [int(t.split(POSTERIOR_SEP)[0][1:]) for t in texts]
        return self.table[idx]


class FakeGenerator(nn.Module):
    """log p(y_t | x=q, z=p) = table[q, p, t]; a list "p1 | p4" reads as the mean of its passages' probabilities."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def encode_inputs(self, questions, passages):
        return {"q": [int(q[1:]) for q in questions], "p": [[int(x[1:]) for x in p.split(" | ")] for p in passages]}

    def encode_targets(self, answers):
        return torch.zeros(len(answers), T, dtype=torch.long), torch.ones(len(answers), T, dtype=torch.long)

    def token_logprobs(self, inputs, labels):
        logp = nn.functional.logsigmoid(self.logits)
        rows = [torch.logsumexp(logp[q, ps], 0) - np.log(len(ps)) for q, ps in zip(inputs["q"], inputs["p"])]
        return torch.stack(rows)


def fake_model(seed=0, n_questions=2, k_sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    prior = torch.randn(n_questions, N_PASSAGES, generator=g, dtype=torch.float64)
    post = prior + k_sharp * torch.randn(n_questions, N_PASSAGES, generator=g, dtype=torch.float64) / 2
    gen = torch.randn(n_questions, N_PASSAGES, T, generator=g, dtype=torch.float64) * 1.5
    model = RagModel(FakeEncoder(prior), FakeGenerator(gen), ArrayIndex(np.eye(N_PASSAGES, dtype=np.float32), texts=[f"p{i}" for i in range(N_PASSAGES)]), tau=1.0)
    model.posterior_encoder = FakeEncoder(post)
    return model


def seq_loglik(model, q):
    return nn.functional.logsigmoid(model.generator.logits[q]).sum(-1).detach()     # [N]


# ------------------------------------------------------------------------------------------------ registry
def test_config_estimator_names_match_the_registry():
    assert set(ESTIMATORS) == set(REGISTRY)
    assert "independent" in STRATEGIES and "two-phase" in STRATEGIES
    assert len(ALL) >= 8 and "independent" not in REGISTRY     # a strategy objective, not a train.estimator


def test_every_estimator_class_in_the_package_is_registered():
    """The package imports each of its modules; a class with a `name` that forgot @register would be unreachable."""
    found = {}
    for info in pkgutil.iter_modules(pipeline.estimators.__path__):
        module = importlib.import_module(f"pipeline.estimators.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Estimator) and cls.__module__ == module.__name__ and vars(cls).get("name"):
                found[cls.name] = cls
    objectives = {s.objective.name: s.objective for s in est_registry.STRATEGIES.values() if s.objective}
    assert found == {**REGISTRY, **objectives}
    assert set(objectives) == {"independent"}


@pytest.mark.parametrize("name", ALL)
def test_registered_estimator_declares_config_needs_and_decoder(name):
    cls = REGISTRY[name]
    assert cls.name == name and cls.decoder in ("rag-sequence", "rag-token")
    assert isinstance(cls.needs_posterior, bool) and isinstance(cls.needs_rows, bool)
    est = build_estimator(name, k=3)
    assert isinstance(est.cfg, cls.config) and est.cfg == cls.config()      # defaults of its own dataclass
    flat = Config().estimator
    for f in dataclasses.fields(cls.config):                               # each setting is a flat estimator.* key
        assert getattr(flat, cls.config.flat_name(f.name)) == getattr(est.cfg, f.name)
    assert decoder_for(name) == cls.decoder
    assert REGISTRY["rag-token"].decoder == "rag-token" and REGISTRY["jsa"].decoder == "rag-sequence"


def test_estimator_config_is_the_flat_view_of_the_settings_dataclasses():
    classes = est_registry.settings_classes("estimator")
    keys = [c.flat_name(f.name) for c in classes for f in dataclasses.fields(c)]
    assert [f.name for f in dataclasses.fields(EstimatorConfig)] == keys
    assert set(keys) >= {"vrag_beta", "vrag_candidates", "jsa_num_proposals", "jsa_likelihood", "jsa_cache",
                         "dro_num_lists", "dro_list_length", "distill_temperature"}
    assert EstimatorConfig() == Config().estimator and EstimatorConfig is type(Config().estimator)
    cfg = load_config(None, ["estimator.dro_num_lists=3"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg             # Ray ships configs to workers by pickling
    # the strategy objective's settings keep their train.* keys, with the same defaults
    train = TrainConfig()
    assert IndependentConfig.from_flat(train) == IndependentConfig()
    assert (train.independent_hard_negatives, train.independent_temperature) == (4, 0.05)


def test_settings_validate_themselves_naming_the_flat_key():
    with pytest.raises(ConfigError, match=r"^estimator\.vrag_beta: must be >= 0, got -1\.0$"):
        load_config(None, ["estimator.vrag_beta=-1"])
    with pytest.raises(ConfigError, match=r"^estimator\.distill_temperature: must be > 0"):
        load_config(None, ["estimator.distill_temperature=0"])
    with pytest.raises(ConfigError, match=r"^estimator\.dro_num_lists: must be >= 1, got 0$"):
        load_config(None, ["estimator.dro_num_lists=0"])
    with pytest.raises(ConfigError, match=r"estimator\.dro_list_length: 3 > train\.k=2"):     # across sections
        load_config(None, ["estimator.dro_list_length=3", "train.k=2"])
    assert load_config(None, ["estimator.dro_list_length=3", "train.k=3"]).estimator.dro_list_length == 3
    with pytest.raises(ConfigError, match=r"^train\.independent_temperature: must be > 0"):
        load_config(None, ["train.independent_temperature=0"])
    with pytest.raises(ConfigError, match=r"^train\.independent_hard_negatives: must be >= 0"):
        load_config(None, ["train.independent_hard_negatives=-1"])
    with pytest.raises(ConfigError, match="did you mean jsa_num_proposals"):
        load_config(None, ["estimator.jsa_num_proposal=3"])


# ----------------------------------------------------------------------- one new file: a test-local estimator
@dataclass
class ScaledConfig(EstimatorSettings):
    prefix = "scaled"
    factor: float = 1.0
    note: str = "none"

    def validate(self, config=None):
        if self.factor <= 0:
            raise ConfigError(f"{self.key('factor')}: must be > 0, got {self.factor}")
        if config is not None and self.note == "needs-k3" and config.train.k < 3:
            raise ConfigError(f"{self.key('note')}: needs-k3 with train.k={config.train.k}")


class ScaledRagToken(RagToken):
    """rag-token's loss times estimator.scaled_factor; takes the rows to show they reach it."""
    name = "scaled-rag-token"
    config = ScaledConfig
    decoder = "rag-token"
    needs_rows = True

    def loss(self, model, questions, answers, rows=None):
        assert rows is not None and len(rows) == len(questions)
        out = super().loss(model, questions, answers)
        return EstimatorOutput(out.loss * self.cfg.factor, {**out.diagnostics, "rows_seen": float(len(rows))})


@pytest.fixture
def scaled_estimator():
    register(ScaledRagToken)            # what @register does when its module is imported
    yield ScaledRagToken
    est_registry.unregister(ScaledRagToken.name)


def test_a_new_estimator_defined_in_one_place_is_accepted_everywhere(scaled_estimator, tmp_path):
    assert type(Config().estimator) is not EstimatorConfig       # the section gained the new settings
    cfg = load_config(None, ["train.estimator=scaled-rag-token", "estimator.scaled_factor=2.5", "train.k=3"])
    assert cfg.estimator.scaled_factor == 2.5 and cfg.estimator.scaled_note == "none"
    assert cfg.estimator.jsa_num_proposals == 20                              # the other keys are still there
    # its own settings from a YAML file, coerced by the same rules (YAML's 5e-1 is a string to PyYAML)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  estimator: scaled-rag-token\nestimator:\n  scaled_factor: 5e-1\n  dro_num_lists: 3\n")
    from_file = load_config(path)
    assert from_file.estimator.scaled_factor == 0.5 and from_file.estimator.dro_num_lists == 3
    save_config(from_file, tmp_path / "saved.yaml")
    assert read_yaml_mapping(tmp_path / "saved.yaml")["estimator"]["scaled_factor"] == 0.5
    assert load_config(tmp_path / "saved.yaml") == from_file
    # validated by its own dataclass, with the key named; a wrong type by the config's coercion
    with pytest.raises(ConfigError, match=r"^estimator\.scaled_factor: must be > 0, got 0\.0$"):
        load_config(None, ["train.estimator=scaled-rag-token", "estimator.scaled_factor=0"])
    with pytest.raises(ConfigError, match=r"estimator\.scaled_note: needs-k3 with train\.k=2"):
        load_config(None, ["estimator.scaled_note=needs-k3", "train.k=2"])
    with pytest.raises(ConfigError, match="estimator.scaled_factor: expected float"):
        load_config(None, ["estimator.scaled_factor=abc"])
    # it reaches build_estimator with its own dataclass, the help, the decoder and the objective
    est = build_estimator(cfg.train.estimator, k=cfg.train.k, cfg=cfg.estimator)
    assert type(est) is ScaledRagToken and est.cfg == ScaledConfig(factor=2.5)
    assert est.cfg.scaled_factor == 2.5                                       # the flat name reads too
    assert "scaled-rag-token (scaled_factor, scaled_note)" in est_registry.estimator_help()
    assert decoder_for(cfg) == "rag-token" and objective_for(cfg).needs_rows
    assert objective_for(cfg).record() == {"estimator": "scaled-rag-token", "strategy": "joint",
                                           "objective": "scaled-rag-token", "decoder": "rag-token"}
    # its loss is what it says, and the trainer hands it the rows it needs
    model = fake_model(2)
    plain = build_estimator("rag-token", k=3).loss(model, ["q0", "q1"], ["a", "a"]).loss
    out = est.loss(model, ["q0", "q1"], ["a", "a"], rows=[{}, {}])
    assert float(out.loss.detach()) == pytest.approx(2.5 * float(plain.detach()), rel=1e-12)
    rows = [{"question": f"q{i % 2}", "answers": ["a"]} for i in range(4)]
    trainer = RagTrainer(model, est, rows, TrainConfig(batch_size=2, max_steps=2, warmup_steps=0, k=3), 0.1, 0.1)
    assert trainer.step()["rows_seen"] == 2.0 and trainer.objective_name == "scaled-rag-token"
    # gone with its registration
    est_registry.unregister("scaled-rag-token")
    with pytest.raises(ConfigError, match="unknown estimator 'scaled-rag-token'"):
        load_config(None, ["train.estimator=scaled-rag-token"])
    assert type(Config().estimator) is EstimatorConfig and not hasattr(Config().estimator, "scaled_factor")


def test_evaluation_decodes_with_the_registered_decoder(scaled_estimator, monkeypatch):
    import pipeline.evaluation as evaluation
    from pipeline.decoding import DecodedAnswer

    calls = []

    def fake_decode(kind):
        def run(model, questions, **kwargs):
            calls.append(kind)
            return [DecodedAnswer(answer="a", score=0.0, passages=[]) for _ in questions]
        return run

    monkeypatch.setattr(evaluation, "rag_token_decode", fake_decode("rag-token"))
    monkeypatch.setattr(evaluation, "rag_sequence_decode", fake_decode("rag-sequence"))
    rows = [{"question": "q0", "answers": ["a"]}]
    for name in [*ALL, "scaled-rag-token"]:
        calls.clear()
        metrics, _ = evaluation.evaluate(fake_model(0), rows, k=2, estimator=name)
        assert calls == [REGISTRY[name].decoder] and metrics["em"] == 1.0
    calls.clear()
    cfg = load_config(None, ["train.estimator=rag-token", "train.strategy=independent"])
    evaluation.evaluate(fake_model(0), rows, k=2, estimator=cfg)
    assert calls == ["rag-token"]                             # the strategy does not change the decoder
    with pytest.raises(ValueError, match="unknown estimator 'independent'"):
        evaluation.evaluate(fake_model(0), rows, estimator="independent")


def test_registration_refuses_what_the_registry_cannot_derive(scaled_estimator):
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (RagToken,), {"name": "scaled-rag-token", "decoder": "rag-token"}))
    with pytest.raises(TypeError, match="decoder"):
        register(type("NoDecoder", (Estimator,), {"name": "no-decoder"}))
    with pytest.raises(TypeError, match="own `name`"):
        register(type("Unnamed", (RagToken,), {}))

    @dataclass
    class Clash(EstimatorSettings):
        prefix = "jsa"
        num_proposals: int = 3

    with pytest.raises(TypeError, match="estimator.jsa_num_proposals: declared by both"):
        register(type("Clashing", (RagToken,), {"name": "clashing", "decoder": "rag-token", "config": Clash}))

    @dataclass
    class Listy(EstimatorSettings):
        prefix = "listy"
        values: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="estimator.listy_values: config values are str, int, float or bool"):
        register(type("Listed", (RagToken,), {"name": "listed", "decoder": "rag-token", "config": Listy}))
    assert set(REGISTRY) == set(ALL) | {"scaled-rag-token"}


def test_estimator_config_section_round_trips_and_is_validated(tmp_path):
    cfg = load_config(None, ["estimator.jsa_num_proposals=7", "estimator.jsa_likelihood=normalized",
                             "train.estimator=jsa"])
    assert cfg.estimator.jsa_num_proposals == 7
    est = build_estimator("jsa", k=3, cfg=cfg)
    assert est.cfg.jsa_num_proposals == 7 and est.k == 3
    with pytest.raises(ConfigError, match="estimator.jsa_likelihood"):
        load_config(None, ["estimator.jsa_likelihood=approx"])
    with pytest.raises(ConfigError, match="estimator.dro_list_length"):
        load_config(None, ["estimator.dro_list_length=9"])
    with pytest.raises(ConfigError, match="train.two_phase_split"):
        load_config(None, ["train.two_phase_split=1.5"])


# ------------------------------------------------------------------------------------------ rag-sequence
def test_rag_sequence_through_ragmodel_with_whole_corpus_is_the_exact_marginal():
    model = fake_model(1)
    est = build_estimator("rag-sequence", k=N_PASSAGES)
    out = est.loss(model, ["q0", "q1"], ["a", "a"])
    exact = []
    for q in range(2):
        prior = torch.softmax(model.query_encoder.table[q].detach(), 0)
        lik = seq_loglik(model, q).exp()
        exact.append(-torch.log((prior * lik).sum()))
    assert out.loss.item() == pytest.approx(float(torch.stack(exact).mean()), abs=1e-10)


# -------------------------------------------------------------------------------------------------- JSA
def exact_posterior_over_c(model, q, k):
    prior_s = model.query_encoder.table[q].detach()
    post_s = model.posterior_encoder.table[q].detach()
    c = sorted(set(torch.topk(prior_s, k).indices.tolist()) | set(torch.topk(post_s, k).indices.tolist()))
    logp = torch.log_softmax(prior_s[c], 0) + seq_loglik(model, q)[c]
    return c, torch.softmax(logp, 0)


def test_jsa_chain_states_match_the_exact_posterior():
    """4,000 independent chains of 20 proposals on one question: the law of the final state, and (with chains
    started from the cache, i.e. in stationarity) the pooled frequency weights, are within total variation 0.05 of
    p(z|x,y) over C. The Monte-Carlo error at 4,000 chains is about 0.015."""
    torch.manual_seed(0)
    model = fake_model(2)
    k, chains = 2, 4000
    c, exact = exact_posterior_over_c(model, 0, k)
    assert len(c) > k                                           # the union matters
    est = Jsa(k=k, cfg=EstimatorConfig(jsa_num_proposals=20, jsa_cache=True))
    questions, answers = ["q0"] * chains, ["a"] * chains
    rows = [{"id": str(i)} for i in range(chains)]
    gen = torch.Generator().manual_seed(1)
    s = est.sample(model, questions, answers, rows, generator=gen)
    members = [int(r) for r in s.rows[0][s.mask[0].numpy()]]
    assert sorted(members) == c
    final = torch.from_numpy(s.rows).gather(1, s.states[:, -1:]).squeeze(1)
    emp = torch.tensor([(final == z).double().mean() for z in c])
    tv = 0.5 * float((emp - exact).abs().sum())
    assert tv < 0.05, (tv, emp, exact)
    assert 0.0 < float(s.accepted.sum()) / float(s.tested.sum()) < 1.0
    # fill the cache (as loss does) and run again: chains now start from their last state
    for i in range(chains):
        est.cache[str(i)] = f"p{int(final[i])}"
    s2 = est.sample(model, questions, answers, rows, generator=gen)
    assert bool((s2.tested[:, 0]).all())                        # every chain had a start: the first proposal is tested
    w = state_weights(s2.states, s2.rows.shape[1])
    rows_t = torch.from_numpy(s2.rows)
    pooled = torch.stack([(w * (rows_t == z)).sum() / chains for z in c])
    assert 0.5 * float((pooled - exact).abs().sum()) < 0.05


def test_mis_chain_with_exact_target_is_the_target_after_one_step():
    """Independence sampler from q: starting in the target, it stays in the target (detailed balance), 20,000 chains."""
    g = torch.Generator().manual_seed(0)
    m, chains = 5, 20000
    target = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    init = torch.multinomial(target, chains, replacement=True, generator=g)
    props = torch.multinomial(q, chains, replacement=True, generator=g).unsqueeze(1)
    u = torch.rand(chains, 1, generator=g, dtype=torch.float64)
    log_w = (target.log() - q.log()).expand(chains, m)
    states, _, _ = mis_chain(log_w, props, init, u)
    emp = torch.bincount(states[:, 0], minlength=m).double() / chains
    assert 0.5 * float((emp - target).abs().sum()) < 0.02


def test_jsa_cache_is_used_saved_and_restored():
    model = fake_model(3)
    est = build_estimator("jsa", k=2, cfg=EstimatorConfig(jsa_num_proposals=5))
    rows = [{"id": "x0", "question": "q0"}, {"question": "q1"}]
    out = est.loss(model, ["q0", "q1"], ["a", "a"], rows=rows)
    assert set(est.cache) == {"x0", "q1"}                       # question id, else the question text
    assert 0.0 <= out.diagnostics["acceptance_rate"] <= 1.0 and out.diagnostics["distinct_states"] >= 1
    again = build_estimator("jsa", k=2, cfg=EstimatorConfig(jsa_num_proposals=5))
    again.load_state_dict(est.state_dict())
    assert again.cache == est.cache
    s = again.sample(model, ["q0", "q1"], ["a", "a"], rows)
    assert bool(s.tested[:, 0].all())                           # the chains started from the cache



@pytest.mark.parametrize("flat_nats", [0.5, 0.0])
def test_jsa_leaves_out_the_prior_term_where_the_generator_cannot_tell_passages_apart(flat_nats):
    """Question 0's answer is equally likely under every passage (a yes/no answer): with jsa_flat_nats 0.5 its
    prior row gets no gradient, question 1's does; with 0 (off) both do. The posterior and generator keep theirs."""
    model = fake_model(5)
    with torch.no_grad():
        model.generator.logits[0] = model.generator.logits[0, :1].clone()       # same log p(y|x,z) for every z
        model.generator.logits[1] *= 5                                           # nats apart
    est = build_estimator("jsa", k=3, cfg=EstimatorConfig(jsa_num_proposals=12, jsa_cache=False,
                                                          jsa_flat_nats=flat_nats))
    torch.manual_seed(0)
    out = est.loss(model, ["q0", "q1"], ["a", "a"])
    out.loss.backward()
    prior_grad = model.query_encoder.table.grad.abs().sum(-1)
    assert float(prior_grad[1]) > 1e-6
    assert (float(prior_grad[0]) == 0.0) == (flat_nats > 0)
    assert float(model.posterior_encoder.table.grad[0].abs().sum()) > 1e-6
    assert out.diagnostics["flat_share"] == (0.5 if flat_nats > 0 else 0.0)


def test_jsa_flat_nats_must_not_be_negative():
    with pytest.raises(ConfigError, match="estimator.jsa_flat_nats"):
        load_config(None, ["estimator.jsa_flat_nats=-1"])


# ------------------------------------------------------------------------------------- gradients vs FD
def _params(model):
    return [model.query_encoder.table, model.posterior_encoder.table, model.generator.logits]


def _fd_check(model, f, coords=6, eps=1e-6, seed=0):
    """Compare autograd with central finite differences at random coordinates of each parameter."""
    params = _params(model)
    for p in params:
        p.grad = None
    f().backward()
    rng = np.random.default_rng(seed)
    checked = 0
    for p in params:
        if p.grad is None:
            continue
        for _ in range(coords):
            idx = tuple(int(rng.integers(s)) for s in p.shape)
            with torch.no_grad():
                orig = p[idx].item()
                p[idx] = orig + eps
                up = float(f())
                p[idx] = orig - eps
                down = float(f())
                p[idx] = orig
            fd = (up - down) / (2 * eps)
            assert p.grad[idx].item() == pytest.approx(fd, abs=1e-6, rel=1e-5), (p.shape, idx)
            checked += 1
    return checked


@pytest.mark.parametrize("name", [*EXACT_GRADIENT, "vrag-union"])
def test_estimator_gradient_matches_finite_differences(name):
    """No stop-gradient inside these losses (JSA's samples are discrete: the same seed gives the same states)."""
    model = fake_model(4)
    cfg = EstimatorConfig(jsa_num_proposals=8, jsa_cache=False, vrag_beta=0.7,
                          vrag_candidates="union" if name == "vrag-union" else "posterior")
    name = name.replace("-union", "")
    est = build_estimator(name, k=3, cfg=cfg)

    def f():
        torch.manual_seed(123)
        return est.loss(model, ["q0", "q1"], ["a", "a"], rows=None).loss

    n = _fd_check(model, f)
    assert n >= 12 if name in ("vrag", "jsa") else n >= 6        # vrag/jsa also reach the posterior encoder


def _fd_tensor(fn, x, eps=1e-6):
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = eps
        d = d.view_as(x)
        g.view(-1)[i] = (fn(x + d) - fn(x - d)) / (2 * eps)
    return g


def test_dro_and_distillation_gradients_match_finite_differences_with_targets_held():
    """These losses hold their targets (DRO's weights, the distillation targets) constant: FD of the loss with the
    targets fixed at their values must equal autograd of the loss that computes and detaches them."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ell = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lists = plackett_luce_sample(scores, 4, 2, generator=g)     # n = 4 lists, one log-lik each
    w = dro_weights(ell)

    def dro_s(s):
        return dro_loss(plackett_luce_logprob(s, lists), ell.detach(), w).sum()

    def dro_l(x):
        return dro_loss(plackett_luce_logprob(scores.detach(), lists), x, w).sum()

    dro_loss(plackett_luce_logprob(scores, lists), ell).sum().backward()
    assert torch.allclose(scores.grad, _fd_tensor(dro_s, scores.detach()), atol=1e-6)
    assert torch.allclose(ell.grad, _fd_tensor(dro_l, ell.detach()), atol=1e-6)
    for loss_fn in (lambda s: pdist_loss(s, ell.detach(), 0.5), lambda s: emdr2_loss(s, ell.detach()),
                    lambda s: replug_lsr_loss(s, ell.detach(), 2.0)):
        s = scores.detach().clone().requires_grad_(True)
        loss_fn(s).sum().backward()
        assert torch.allclose(s.grad, _fd_tensor(lambda v, f=loss_fn: f(v).sum(), s.detach()), atol=1e-6)
    # the targets really are held: no gradient reaches them
    x = ell.detach().clone().requires_grad_(True)
    held = pdist_loss(scores.detach(), x) + emdr2_loss(scores.detach(), x) + replug_lsr_loss(scores.detach(), x)
    assert not held.requires_grad
    assert not dro_weights(x).requires_grad


def test_emdr2_retriever_gradient_is_prior_minus_posterior():
    s = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    ell = torch.randn(1, 5, dtype=torch.float64)
    emdr2_loss(s, ell).sum().backward()
    post = torch.softmax(torch.log_softmax(s.detach(), -1) + ell, -1)
    assert torch.allclose(s.grad, torch.softmax(s.detach(), -1) - post, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in ALL if n not in EXACT_GRADIENT])   # dro, pdist, emdr2, replug-lsr, ...
def test_held_target_estimators_reach_retriever_and_generator(name):
    model = fake_model(6)
    est = build_estimator(name, k=3, cfg=EstimatorConfig(dro_num_lists=4, dro_list_length=2))
    out = est.loss(model, ["q0", "q1"], ["a", "a"])
    out.loss.backward()
    assert model.query_encoder.table.grad.abs().sum() > 0 and model.generator.logits.grad.abs().sum() > 0
    assert torch.isfinite(out.loss)


# -------------------------------------------------------------------------------------------------- DRO
def test_plackett_luce_samples_follow_their_logprob():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[1.0, 0.2, -0.5, 0.0]], dtype=torch.float64)
    lists = plackett_luce_sample(scores, 20000, 2, generator=g)[0]
    all_lists = list(itertools.permutations(range(4), 2))
    logp = plackett_luce_logprob(scores, torch.tensor([all_lists]))[0]
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    counts = {t: 0 for t in all_lists}
    for t in lists.tolist():
        counts[tuple(t)] += 1
    emp = torch.tensor([counts[t] / 20000 for t in all_lists], dtype=torch.float64)
    assert 0.5 * float((emp - logp.exp()).abs().sum()) < 0.03


def test_dro_weights_sum_to_one_and_approach_the_exact_posterior_expectation():
    """E_{p(list|x,y)}[f] by self-normalised importance sampling from Plackett-Luce, vs exact enumeration of all
    ordered lists: the error shrinks as n grows (averaged over 20 repeats)."""
    g = torch.Generator().manual_seed(0)
    k, length = 5, 2
    scores = torch.randn(1, k, generator=g, dtype=torch.float64)
    per_passage = torch.randn(k, generator=g, dtype=torch.float64) * 2
    all_lists = torch.tensor([list(itertools.permutations(range(k), length))])
    lik = lambda lists: torch.logsumexp(per_passage[lists], -1) - np.log(length)   # noqa: E731  (mean over list)
    f = lambda lists: lists[..., 0].double()                                          # noqa: E731  (first passage)
    joint = plackett_luce_logprob(scores, all_lists) + lik(all_lists)
    exact = float((torch.softmax(joint, -1) * f(all_lists)).sum())
    errors = []
    for n in (4, 64, 2048):
        err = []
        for _ in range(20):
            lists = plackett_luce_sample(scores, n, length, generator=g)
            w = dro_weights(lik(lists))
            assert torch.allclose(w.sum(-1), torch.ones(1, dtype=torch.float64))
            err.append(abs(float((w * f(lists)).sum()) - exact))
        errors.append(sum(err) / len(err))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


# ------------------------------------------------------------------------------------------- strategies
def test_independent_without_labels_fails_clearly():
    rows = [{"question": "q0", "answers": ["a"], "gold_passage_ids": ["p1"]}, {"question": "q1", "answers": ["a"]}]
    with pytest.raises(ValueError, match=r"gold_passage_ids.*|.*train.qa.jsonl"):
        require_context_labels(rows, "data.train_qa (train.qa.jsonl)")
    try:
        require_context_labels(rows, "data.train_qa (train.qa.jsonl)")
    except ValueError as exc:
        assert "train.qa.jsonl" in str(exc) and "'gold_passage_ids'" in str(exc) and "1 of 2" in str(exc)
    model = fake_model(7)
    cfg = TrainConfig(strategy="independent", batch_size=2, max_steps=2, warmup_steps=0)
    with pytest.raises(ValueError, match="gold_passage_ids"):
        RagTrainer(model, build_estimator("rag-sequence", k=2), rows, cfg, 0.1, 0.1, data_source="x.jsonl")


def test_independent_trains_retriever_contrastively_and_generator_on_gold():
    model = fake_model(8)
    rows = [{"question": "q0", "answers": ["a"], "gold_passage_ids": ["p1"]},
            {"question": "q1", "answers": ["a"], "gold_passage_ids": ["p4"]}]
    cfg = TrainConfig(strategy="independent", batch_size=2, max_steps=3, warmup_steps=0, lr_decay="constant",
                      independent_hard_negatives=2)
    trainer = RagTrainer(model, build_estimator("rag-sequence", k=2), rows, cfg, 0.5, 0.5)
    gold_before = [model.query_encoder.table[0, 1].item(), model.query_encoder.table[1, 4].item()]
    for _ in range(3):
        m = trainer.step()
    assert "retriever_loss" in m and m["grad_norm/retriever"] > 0 and m["grad_norm/generator"] > 0
    assert model.query_encoder.table[0, 1].item() > gold_before[0]
    assert model.query_encoder.table[1, 4].item() > gold_before[1]


def test_two_phase_freezes_the_retrievers_then_the_generator():
    model = fake_model(9)
    model.posterior_encoder = None
    rows = [{"question": f"q{i % 2}", "answers": ["a"]} for i in range(4)]
    cfg = TrainConfig(strategy="two-phase", two_phase_split=0.5, batch_size=2, max_steps=4, warmup_steps=0,
                      lr_decay="constant")
    trainer = RagTrainer(model, build_estimator("vrag", k=3), rows, cfg, 0.1, 0.1)
    assert model.posterior_encoder is not None                      # vrag's prepare added q(z|x,y)
    snap = lambda: [p.detach().clone() for p in _params(model)]     # noqa: E731
    before = snap()
    for _ in range(2):                                              # phase 1: generator only
        m = trainer.step()
        assert m["retriever_frozen"] == 1.0 and m["generator_frozen"] == 0.0 and m["lr/retriever"] == 0.0
    mid = snap()
    assert torch.equal(mid[0], before[0]) and torch.equal(mid[1], before[1]) and not torch.equal(mid[2], before[2])
    for _ in range(2):                                              # phase 2: retrievers only
        m = trainer.step()
        assert m["retriever_frozen"] == 0.0 and m["generator_frozen"] == 1.0 and m["lr/generator"] == 0.0
    end = snap()
    assert not torch.equal(end[0], mid[0]) and not torch.equal(end[1], mid[1]) and torch.equal(end[2], mid[2])


@pytest.mark.parametrize("strategy", list(est_registry.STRATEGIES))
def test_each_strategy_names_the_objective_it_trains(strategy):
    """joint and two-phase train train.estimator's loss; independent trains its own objective instead (no
    posterior encoder, its settings from train.independent_*); decoding follows train.estimator in all three."""
    for name in ALL:
        cfg = load_config(None, [f"train.estimator={name}", f"train.strategy={strategy}"])
        obj = objective_for(cfg)
        assert obj == resolve_objective(name, strategy) and (obj.estimator, obj.strategy) == (name, strategy)
        assert obj.decoder == REGISTRY[name].decoder == decoder_for(cfg)
        if strategy == "independent":
            assert obj.name == "independent" and not obj.needs_posterior and obj.needs_rows
        else:
            assert obj.name == name and obj.cls is REGISTRY[name]
            assert obj.needs_posterior == REGISTRY[name].needs_posterior
    model = fake_model(10)
    model.posterior_encoder = None
    rows = [{"question": f"q{i % 2}", "answers": ["a"], "gold_passage_ids": [f"p{i % 2}"]} for i in range(4)]
    cfg = TrainConfig(strategy=strategy, batch_size=2, max_steps=2, warmup_steps=0, independent_hard_negatives=1)
    est = build_estimator("vrag", k=3)
    trainer = RagTrainer(model, est, rows, cfg, 0.1, 0.1)
    if strategy == "independent":
        assert trainer.objective_name == "independent" and trainer.objective is not est and trainer.own_objective
        assert trainer.objective.hard_negatives == 1 and trainer.objective.k == 3
        assert model.posterior_encoder is None and trainer.phase() == "independent"
        assert "retriever_accuracy" in trainer.step()
    else:
        assert trainer.objective_name == "vrag" and trainer.objective is est and not trainer.own_objective
        assert model.posterior_encoder is not None                # vrag's prepare ran
        assert "kl" in trainer.step()


def test_unknown_strategy_is_refused_by_the_trainer_and_the_config():
    with pytest.raises(ValueError, match="unknown strategy 'sideways'"):
        RagTrainer(fake_model(0), build_estimator("rag-sequence", k=2), [{"question": "q0", "answers": ["a"]}],
                   TrainConfig(strategy="sideways"), 0.1, 0.1)
    with pytest.raises(ConfigError, match="train.strategy: unknown strategy 'sideways'; choose one of joint, "
                                          "two-phase, independent"):
        load_config(None, ["train.strategy=sideways"])


def test_vrag_union_enumerates_the_elbo_over_prior_and_posterior_top_k():
    """C = prior top-K ∪ posterior top-K; the loss equals the ELBO computed by hand over exactly that set."""
    model = fake_model(7, k_sharp=6.0)
    est = build_estimator("vrag", k=2, cfg=EstimatorConfig(vrag_beta=0.5, vrag_candidates="union"))
    out = est.loss(model, ["q0", "q1"], ["a", "a"])
    expected = []
    for q in range(2):
        prior, post = model.query_encoder.table[q].detach(), model.posterior_encoder.table[q].detach()
        c = sorted(set(torch.topk(prior, 2).indices.tolist()) | set(torch.topk(post, 2).indices.tolist()))
        log_q, log_p = torch.log_softmax(post[c], 0), torch.log_softmax(prior[c], 0)
        ll = seq_loglik(model, q)[c]
        expected.append(float((log_q.exp() * (-ll + 0.5 * (log_q - log_p))).sum()))
    assert out.diagnostics["candidates"] > 2          # the two top-2 sets differ somewhere: C is larger than K
    assert float(out.loss.detach()) == pytest.approx(np.mean(expected), rel=1e-9)


def test_retriever_anchor_is_zero_at_the_start_and_pulls_back_a_drifted_retriever():
    from pipeline.anchor import RetrieverAnchor

    model = fake_model(3)
    anchor = RetrieverAnchor(model.query_encoder, weight=1.0, k=3)
    kl = anchor.kl(model, ["q0", "q1"])
    assert torch.allclose(kl, torch.zeros(2, dtype=kl.dtype), atol=1e-12)
    with torch.no_grad():                                   # the retriever drifts away from its start
        model.query_encoder.table.add_(torch.randn_like(model.query_encoder.table) * 2.0)
    kl = anchor.kl(model, ["q0", "q1"])
    assert (kl > 1e-3).all()
    opt = torch.optim.SGD(model.query_encoder.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        anchor.kl(model, ["q0", "q1"]).sum().backward()
        opt.step()
    assert float(anchor.kl(model, ["q0", "q1"]).sum()) < 0.1 * float(kl.sum())
    assert anchor.encoder.table.requires_grad is False       # the anchor itself never trains


def test_trainer_with_anchor_adds_the_kl_and_keeps_the_start_across_a_resume():
    model = fake_model(5)
    rows = [{"question": f"q{i % 2}", "answers": ["a"]} for i in range(4)]
    cfg = TrainConfig(batch_size=2, max_steps=6, warmup_steps=0, lr_decay="constant", k=3, retriever_anchor_kl=1.0)
    start = model.query_encoder.table.detach().clone()
    trainer = RagTrainer(model, build_estimator("rag-sequence", k=3), rows, cfg, 0.5, 0.1)
    m1 = trainer.step()
    assert m1["anchor_kl"] == pytest.approx(0.0, abs=1e-9)      # current retriever == starting one at step 0
    trainer.step()
    assert float(trainer.anchor.kl(model, ["q0", "q1"]).sum()) > 0.0   # the retriever moved, the anchor did not
    state = trainer.state_dict()
    # a restarted worker builds its trainer from the checkpointed (moved) model: the anchor must come from the state
    resumed = RagTrainer(model, build_estimator("rag-sequence", k=3), rows, cfg, 0.5, 0.1)
    assert not torch.equal(resumed.anchor.encoder.table, start)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.anchor.encoder.table, start)


def test_anchor_weight_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="train.retriever_anchor_kl"):
        load_config(None, ["train.retriever_anchor_kl=-1"])
