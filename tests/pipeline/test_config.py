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
    with pytest.raises(ConfigError, match=r"bad\.yaml: train: unknown key\(s\) max_stepz \(did you mean max_steps\?\)"):
        load_config(tmp_path / "bad.yaml")


def test_unknown_top_level_key_says_top_level_and_suggests(tmp_path):
    (tmp_path / "bad.yaml").write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "bad.yaml")
    assert str(info.value) == f"{tmp_path / 'bad.yaml'}: top level: unknown key(s) trian (did you mean train?)"


def test_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path):
    (tmp_path / "bad.yaml").write_text("eval:\n  zzzz: 3\n")
    with pytest.raises(ConfigError, match=r"eval: unknown key\(s\) zzzz; known: k, decode, num_beams"):
        load_config(tmp_path / "bad.yaml")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_flat_has_every_leaf():
    flat = Config().flat()
    assert flat["train.estimator"] == "rag-sequence" and "retriever.lr" in flat and "generator.lr" in flat


# ---------------------------------------------------------------------------------------------------------
# YAML values are coerced to the declared types when loaded (issue 15 item 4, issue 18 item 9)


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_floats_that_pyyaml_reads_as_strings_become_floats(tmp_path):
    import yaml

    text = "retriever:\n  lr: 1e-3\n  tau: 5e-2\ngenerator:\n  lr: 3\ntrain:\n  max_steps: 1e2\n"
    assert yaml.safe_load(text)["retriever"]["lr"] == "1e-3"          # what PyYAML hands us
    cfg = load_config(_yaml(tmp_path, text))
    assert cfg.retriever.lr == 1e-3 and type(cfg.retriever.lr) is float
    assert cfg.retriever.tau == 0.05 and type(cfg.retriever.tau) is float
    assert cfg.generator.lr == 3.0 and type(cfg.generator.lr) is float
    assert cfg.train.max_steps == 100 and type(cfg.train.max_steps) is int


@pytest.mark.parametrize("text, message", [
    ("train:\n  max_steps: abc\n", "train.max_steps: expected int, got 'abc'"),
    ("train:\n  max_steps: [1, 2]\n", "train.max_steps: expected int, got [1, 2]"),
    ("train:\n  max_steps: 15e-1\n", "train.max_steps: expected int, got '15e-1' (not a whole number)"),
    ("train:\n  max_steps: 2.5\n", "train.max_steps: expected int, got 2.5 (not a whole number)"),
    ("train:\n  max_steps:\n", "train.max_steps: expected int, got null"),
    ("retriever:\n  tau: fast\n", "retriever.tau: expected float"),
    ("retriever:\n  lr: {a: 1}\n", "retriever.lr: expected float"),
    ("retriever:\n  lr: .nan\n", "retriever.lr: expected a finite number"),
    ("train:\n  use_gpu: 1\n", "train.use_gpu: expected bool"),
    ("train:\n  estimator: [jsa]\n", "train.estimator: expected str"),
    ("data:\n  corpus: [a.jsonl]\n", "data.corpus: expected str or null"),
    ("train: 3\n", "train: expected a mapping"),
])
def test_yaml_value_of_the_wrong_type_names_key_and_file(tmp_path, text, message):
    path = _yaml(tmp_path, text, "typed.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_yaml_strings_and_optional_values(tmp_path):
    cfg = load_config(_yaml(tmp_path, "mlflow:\n  run_name: 2024\ndata:\n  corpus: null\n"))
    assert cfg.mlflow.run_name == "2024" and cfg.data.corpus is None


def test_from_dict_coerces_and_names_its_source():
    from pipeline.config import from_dict

    assert from_dict({"train": {"k": "3"}}).train.k == 3
    with pytest.raises(ConfigError, match=r"^ckpt/config\.yaml: train\.k: expected int"):
        from_dict({"train": {"k": "three"}}, source="ckpt/config.yaml")


def test_set_and_yaml_share_one_coercion(tmp_path, monkeypatch):
    import pipeline.config as config

    seen = []
    real = config.coerce_value

    def spy(value, hint, key):
        seen.append(key)
        return real(value, hint, key)

    monkeypatch.setattr(config, "coerce_value", spy)
    cfg = load_config(_yaml(tmp_path, "train:\n  max_steps: 1e2\n"), ["retriever.lr=1e-3", "train.k=2.0"])
    assert {"train.max_steps", "retriever.lr", "train.k"} <= set(seen)
    assert (cfg.train.max_steps, cfg.retriever.lr, cfg.train.k) == (100, 1e-3, 2)
    with pytest.raises(ConfigError, match="--set train.max_steps: expected int, got 2.5 .not a whole number"):
        load_config(None, ["train.max_steps=2.5"])
    with pytest.raises(ConfigError, match="--set train.use_gpu: expected bool"):
        load_config(None, ["train.use_gpu=1"])


def test_set_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'max_stepz' \(did you mean max_steps\?\)"):
        load_config(None, ["train.max_stepz=3"])


def test_every_train_config_in_configs_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("demo.yaml", "cmu_qa_wiki.yaml", "real_bart_base.yaml", "real_flan_t5.yaml"):
        load_config(root / name)


# ---------------------------------------------------------------------------------------------------------
# index.encode_batch_size -> index.encode_map_batch_size (issue 15 item 4)


def test_encode_batch_size_is_renamed(tmp_path):
    from pipeline.config import IndexConfig

    assert "encode_batch_size" not in IndexConfig.__dataclass_fields__
    assert load_config(None, ["index.encode_map_batch_size=256"]).index.encode_map_batch_size == 256
    path = _yaml(tmp_path, "index:\n  encode_batch_size: 512\n", "old.yaml")
    with pytest.raises(ConfigError, match=r"old\.yaml: index\.encode_batch_size: renamed to "
                                          r"index\.encode_map_batch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set index\.encode_batch_size: renamed to index\.encode_map_batch_size"):
        load_config(None, ["index.encode_batch_size=512"])


# ---------------------------------------------------------------------------------------------------------
# malformed config files (issue 18 item 10)


@pytest.mark.parametrize("text, line", [
    ("train:\n  k: 3\n   max_steps: [1\n", 3),
    ("train:\n\tk: 3\n", 2),
    ("a: [1\n", 2),
])
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    path = _yaml(tmp_path, text, "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {line}, column ") and "not valid YAML" in message
    assert "\n" not in message and "<unicode string>" not in message


def test_non_utf8_config_names_file_and_line(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"train:\n  estimator: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml line 2: not valid UTF-8"):
        load_config(path)


def test_config_that_is_not_a_mapping_or_a_file(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)


def test_saved_configs_from_before_the_rename_upgrade_when_asked():
    from pipeline.config import from_dict

    old = {"index": {"encode_batch_size": 512}}
    assert from_dict(old, upgrade_renamed=True).index.encode_map_batch_size == 512
    with pytest.raises(ConfigError, match="renamed to index.encode_map_batch_size"):
        from_dict(old)
    with pytest.raises(ConfigError, match="renamed to index.encode_map_batch_size"):
        from_dict({"index": {"encode_batch_size": 512, "encode_map_batch_size": 64}}, upgrade_renamed=True)


# ---------------------------------------------------------------------------------------------------------
# The estimator: section is derived from the estimators' own settings dataclasses (issue 15 item 2); its keys,
# types and defaults are what they were.


def test_estimator_section_keys_types_and_defaults_are_unchanged(tmp_path):
    import dataclasses

    from pipeline.config import EstimatorConfig

    expected = {"vrag_beta": (float, 1.0), "vrag_candidates": (str, "posterior"), "jsa_num_proposals": (int, 20),
                "jsa_likelihood": (str, "exact"), "jsa_cache": (bool, True), "dro_num_lists": (int, 5),
                "dro_list_length": (int, 2), "distill_temperature": (float, 1.0)}
    fields = {f.name: (f.type, f.default) for f in dataclasses.fields(EstimatorConfig)}
    assert {k: fields[k] for k in expected} == expected
    flat = Config().flat()
    assert all(flat[f"estimator.{k}"] == v for k, (_, v) in expected.items())
    text = ("estimator:\n  vrag_beta: 5e-1\n  jsa_num_proposals: 1e1\n  jsa_cache: false\n"
            "  vrag_candidates: union\n  distill_temperature: 2\n  dro_list_length: 3\n")
    cfg = load_config(_yaml(tmp_path, text))
    e = cfg.estimator
    assert (e.vrag_beta, e.jsa_num_proposals, e.jsa_cache, e.vrag_candidates, e.distill_temperature,
            e.dro_list_length) == (0.5, 10, False, "union", 2.0, 3)
    assert type(e.jsa_num_proposals) is int and type(e.distill_temperature) is float
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("text, message", [
    ("estimator:\n  jsa_cache: 1\n", "estimator.jsa_cache: expected bool"),
    ("estimator:\n  jsa_num_proposals: 2.5\n", "estimator.jsa_num_proposals: expected int, got 2.5"),
    ("estimator:\n  vrag_betta: 1\n", "estimator: unknown key(s) vrag_betta (did you mean vrag_beta?)"),
    ("estimator:\n  jsa_likelihood: approx\n", "estimator.jsa_likelihood: 'approx'; choose exact or normalized"),
    ("estimator:\n  vrag_candidates: prior\n", "estimator.vrag_candidates: 'prior'; choose posterior or union"),
    ("estimator:\n  jsa_num_proposals: 0\n", "estimator.jsa_num_proposals: must be >= 1, got 0"),
    ("train:\n  k: 2\nestimator:\n  dro_list_length: 3\n",
     "estimator.dro_list_length: 3 > train.k=2 (lists are drawn from the top-k candidates)"),
])
def test_estimator_section_errors_name_the_key_and_file(tmp_path, text, message):
    path = _yaml(tmp_path, text, "est.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_config_module_exports_names_derived_from_the_registry():
    import pipeline.config as config
    from pipeline.estimators import REGISTRY, STRATEGIES

    assert config.ESTIMATORS == tuple(sorted(REGISTRY)) and config.STRATEGIES == tuple(STRATEGIES)
    assert config.EstimatorConfig is type(Config().estimator)
    with pytest.raises(AttributeError):
        _ = config.NOT_A_NAME
