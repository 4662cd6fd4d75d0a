import pytest

from pipeline.config import Config, ConfigError, load_config, save_config


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "retriever.lr=3e-6", "generator.kind=copy-bart"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.train.max_steps == 7 and again.retriever.lr == 3e-6


def test_demo_config_loads():
    from jobs.demo import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.train.estimator == "rag-sequence"
    assert cfg.retriever.lr != cfg.generator.lr       # separate learning rates


@pytest.mark.parametrize("override, message", [
    ("train.estimator=nope", "unknown estimator 'nope'"),
    ("train.nope=1", "unknown key 'nope'"),
    ("nope.k=1", "unknown section 'nope'"),
    ("train.k=0", "train.k: must be >= 1"),
    ("train.max_steps=abc", "expected int"),
    ("train.k", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_yaml_key_names_where(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="train.: unknown key\\(s\\) max_stepz"):
        load_config(tmp_path / "bad.yaml")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_flat_has_every_leaf():
    flat = Config().flat()
    assert flat["train.estimator"] == "rag-sequence" and "retriever.lr" in flat and "generator.lr" in flat
