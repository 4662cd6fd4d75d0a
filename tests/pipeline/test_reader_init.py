"""generator.init: the shipped pre-trained `reader` weights, other generator dirs, and the errors around them."""
import json
import re

import pytest
import torch

from jobs import pretrain_reader
from pipeline.config import ConfigError, GeneratorConfig, load_config
from pipeline.models.generator import READER_DIR, build_generator, load_generator


def test_shipped_reader_loads_and_reads():
    """The shipped weights fit the default sizes, and the reader copies the answer span from an unseen passage."""
    meta = json.loads((READER_DIR / "generator.json").read_text())
    assert meta["tokenizer"] == "minilm" and meta["d_model"] == GeneratorConfig().d_model
    gen = build_generator(GeneratorConfig(init="reader", dropout=0.0), ["Quorndale"]).eval()
    scratch = build_generator(GeneratorConfig(init="random", dropout=0.0), ["Quorndale"]).eval()
    # the head follows this run's answers, not the pre-training's
    assert gen.out_ids.numel() == scratch.out_ids.numel()
    # a knowledge base the reader never saw (seed 0 is the demo's; wording "default", not pre-training's "reading")
    q, p, a = "Which town is Varnel Ostrik's birthplace?", \
        "Varnel Ostrik was born in Quorndale. Ostrik played the zumbrel every evening.", "Quorndale"
    inputs = gen.encode_inputs([q], [p])
    labels, _ = gen.encode_targets([a])
    with torch.no_grad():
        read = gen.token_logprobs(inputs, labels).sum()
        untrained = scratch.token_logprobs(scratch.encode_inputs([q], [p]), labels).sum()
    assert read > untrained + 2.0
    assert pretrain_reader.greedy_em(gen, [(q, p, a)]) == 1.0


def test_reader_refuses_other_sizes():
    with pytest.raises(ValueError, match=r"generator.init='reader'.*d_model 64"):
        build_generator(GeneratorConfig(init="reader", d_model=64, ffn_dim=128))


def test_init_from_missing_dir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing"))):
        build_generator(GeneratorConfig(init=str(tmp_path / "nothing")))


def test_init_is_for_copy_bart_only():
    with pytest.raises(ConfigError, match="generator.init"):
        load_config(None, ["generator.kind=hf-seq2seq", "generator.name_or_path=x", "generator.init=reader"])


def test_pretrain_reader_writes_loadable_weights(tmp_path):
    out = tmp_path / "reader"
    assert pretrain_reader.main(["--out", str(out), "--kb-seeds", "100", "--entities", "4", "--steps", "2",
                                 "--batch-size", "4", "--eval-every", "2", "--eval-questions", "3",
                                 "--threads", "1"]) == 0
    report = json.loads((out / "pretrain.json").read_text())
    assert report["history"][-1]["step"] == 2 and set(report["history"][-1]["em"]) == {"default", "alt"}
    gen = build_generator(GeneratorConfig(init=str(out)), ["Quorndale"])
    again = load_generator(out)                       # also a generator directory in its own right
    assert torch.equal(gen.copy_query.weight, again.copy_query.weight)
    assert gen.copy_query.weight.dtype == torch.float32
