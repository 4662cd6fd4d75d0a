"""Run configuration: plain dataclasses, loaded from YAML, overridden with `--set key=value`, saved back as YAML.

The dataclass defaults are the project's one set of defaults: the settings the demo measured (configs/demo.yaml
holds only what makes it the demo: its data and its MLflow experiment; a test keeps it so). `latentrag train`
without --config starts from them; change a default here and the demo, `train` and its --help follow.

A saved config loads back to the same values (round trip), so `config.yaml` of any run can be fed to `latentrag train`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


# The estimator names, strategies and the `estimator:` section come from pipeline.estimators.registry, imported
# lazily: the estimator modules import this one (ConfigError), and `import pipeline.config` stays light.
def _estimators():
    from pipeline.estimators import registry

    registry.load()
    return registry


def estimator_config_class() -> type:
    """The `estimator:` section's dataclass: one flat field `<prefix>_<field>` per field of every registered
    estimator's settings dataclass (estimator.jsa_num_proposals is JsaConfig.num_proposals), with its type and
    default. Rebuilt when the registry changes; the same class while it does not."""
    return _flat_estimator_config(_estimators().settings_classes("estimator"))


@functools.cache
def _flat_estimator_config(settings: tuple[type, ...]) -> type:
    specs = []
    for cls in settings:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = (field(default_factory=f.default_factory) if f.default is dataclasses.MISSING
                       else field(default=f.default))
            specs.append((cls.flat_name(f.name), hints[f.name], default))
    flat = dataclasses.make_dataclass("EstimatorConfig", specs)
    flat.__module__ = __name__                # pickles (Ray) by reference, as pipeline.config.EstimatorConfig
    flat.__doc__ = "Settings of every estimator (flat keys); `train.estimator` selects which one runs."
    return flat


if typing.TYPE_CHECKING:          # at run time the module __getattr__ below builds it
    EstimatorConfig = Any


def _new_estimator_config():
    return estimator_config_class()()


def __getattr__(name: str) -> Any:
    # derived from the registry on each access (a test may register an estimator after this module loads)
    if name == "EstimatorConfig":
        return estimator_config_class()
    if name == "ESTIMATORS":
        return _estimators().estimator_names()
    if name == "STRATEGIES":
        return _estimators().strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DataConfig:
    corpus: str | None = None          # corpus file/dir or an ingested passages dir; None = built-in synthetic KB
    train_qa: str | None = None
    dev_qa: str | None = None
    eval_qa: str | None = None
    synthetic_seed: int = 0
    synthetic_entities: int = 400
    synthetic_templates: str = "default"
    chunk_words: int = 100
    chunk_overlap: int = 20


@dataclass
class RetrieverConfig:
    encoder: str = "minilm"            # alias of the embedded all-MiniLM-L6-v2, a local path, or a hub name
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 64
    tau: float = 0.05                  # p(z|x) = softmax(score / tau); cosine scores need a small tau
    lr: float = 2e-5
    train_query_encoder: bool = True
    train_passage_encoder: bool = False     # train a passage encoder too (scores use fresh passage vectors);
                                            # the index then goes stale: see index.refresh_schedule / rerank_top_m
    # hybrid candidates (0 = off, dense only): BM25's top-H (bm25s over the index version's passages, k1 0.9,
    # b 0.4, English stopwords; saved in the version's bm25/) join the dense top-K in training, evaluation and
    # serving. Shape rule: the dense top-K, then BM25's hits not already there, filled up with the next dense rows,
    # K' = K + H rows ordered by dense score (the first is the dense top-1). BM25 only proposes: p(z|x) is still
    # softmax(dense score / tau) over those K + H, so the query encoder is what trains. Try: --set retriever.hybrid_k=5
    hybrid_k: int = 0
    # fused prior over the hybrid candidates: p(z|x) = softmax(dense score / tau + bm25_weight * BM25 score), in
    # training (the query encoder still is what trains), evaluation (recall@k ranks by it) and serving. 0 = BM25
    # only proposes. On cmu_qa_wiki 1.0 lifted the frozen MiniLM's recall@1 0.78 -> 0.83 (BM25 alone 0.79)
    bm25_weight: float = 0.0


@dataclass
class LoraConfig:
    """`generator.lora`: LoRA adapters through peft (hf-causal). Only the adapters train and are checkpointed."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # module names (suffixes of the model's module paths, as peft matches them) or ["all-linear"]; every name must
    # match a module of the model, or building the generator fails naming the linear layers there are
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


DEFAULT_PROMPT_TEMPLATE = "Passage: {passage}\nQuestion: {question}\nAnswer:"


@dataclass
class GeneratorConfig:
    kind: str = "copy-bart"            # copy-bart (embedded default) | hf-seq2seq | hf-causal
    init: str = "auto"                 # copy-bart weights: auto | random | reader (shipped, pre-trained to read on
                                       # other synthetic KBs by jobs/pretrain_reader.py; needs its sizes) | a
                                       # generator dir. auto: the reader when the sizes are its own, else random
                                       # (measured: EM 0.322 at step 0 of the demo from the reader, 0.000 random)
    name_or_path: str | None = None    # hub name or local dir for hf-* kinds
    tokenizer: str = "minilm"          # tokenizer for copy-bart: the embedded MiniLM WordPiece vocab
    encoder: str = "bart"              # copy-bart's encoder: bart (its own, d_model wide) | a pretrained encoder
                                       # (minilm: the retriever's all-MiniLM-L6-v2 reads; d_model = its width)
    encoder_train_layers: int = -1     # a pretrained encoder: only its top N layers train (-1 = all; 0 = frozen)
    encoder_lr: float = 1e-4           # a pretrained encoder's learning rate (generator.lr is the decoder's and heads')
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.0               # measured: 0.1 learns slower within a demo's few hundred steps
    max_source_length: int = 128
    max_target_length: int = 16
    output_vocab_size: int = 4096      # copy-bart: vocabulary head over the most frequent answer tokens (0 = all)
    lr: float = 2e-3                   # measured for copy-bart (the demo); hub models want far less (configs/real_*)
    # hf-causal: the prompt ({passage} = title + text, cut to fit max_source_length; {question}); the answer follows
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    chat_template: bool = False        # hf-causal: the filled template as a user turn of the tokenizer's chat template
    lora: LoraConfig | None = None     # hf-causal: LoRA adapters (peft); no `lora` section = full fine-tuning
    dtype: str = "float32"             # hf-causal weights: float32 | bfloat16
    gradient_checkpointing: bool = False    # hf-causal: recompute activations in backward (memory for time)
    quantize: str = "none"             # hf-causal base for QLoRA: none | 4bit | 8bit (CUDA + bitsandbytes only)


@dataclass
class IndexConfig:
    type: str = "flat"                 # flat | hnsw | ivfpq
    encode_map_batch_size: int = 128   # passages per Ray Data map_batches call to an encoder actor (the actor sorts
                                       # them by length; its forward-pass batch is build_index's encode_batch_size)
    encode_actors: int = 1
    threads_per_actor: int = 2
    refresh_schedule: str = ""         # with retriever.train_passage_encoder: "START-END:EVERY,..." e.g.
                                       # "0-1000:200,1000-:1000"; empty = never re-encode during training
    rerank_top_m: int = 0              # > train.k: re-score the retrieved top-M with the current passage encoder
    refresh_cpus: float = 1.0          # logical CPUs of the background refresh build (its encode has its own actors)
    search_shards: int = 0            # train workers: > 1 = search through that many index-shard actors, each
                                       # holding 1/N of the vectors (jobs.sharded_index, for indexes too large to map
                                       # in every worker); 0 = each worker memory-maps the index version
    shard_scope: str = "cluster"       # cluster = one set of shard actors for all workers of the run, spread over
                                       # the nodes; node = one set per node, used by that node's workers only
    cpus_per_shard: float = 0.5        # logical CPUs each shard actor reserves
    shard_resource: str = ""           # a custom resource each shard actor needs 1 of (e.g. "index": shards go only
                                       # to nodes started with --resources='{"index": N}', at most N per node)


@dataclass
class TrainConfig:
    estimator: str = "rag-sequence"
    strategy: str = "joint"            # joint | two-phase | independent (Lawton et al. 2025)
    two_phase_split: float = 0.5       # two-phase: fraction of max_steps in phase 1 (generator, retriever frozen)
    independent_hard_negatives: int = 4     # independent: top retrieved non-gold passages per question
    independent_temperature: float = 0.05   # independent: InfoNCE temperature over cosine scores
    k: int = 5                         # passages per question in the marginal
    batch_size: int = 16
    max_steps: int = 600               # the demo's measured run: recall@1 0.613 -> 0.947, EM 0.816
    generator_warmup_steps: int = 0    # steps with the retriever frozen while the generator learns to read
    retriever_anchor_kl: float = 0.0   # weight of KL(p_start(z|x) || p(z|x)) to the starting retriever (0 = off)
    warmup_steps: int = 20             # lr linear warm-up for both groups
    lr_decay: str = "linear"           # linear | constant
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 0                # 0 = only at the end
    log_every: int = 20
    checkpoint_every: int = 0          # 0 = only at the end
    grad_accum_steps: int = 1          # micro-batches of batch_size per optimiser step (per worker)
    precision: str = "bf16"            # bf16 | fp32: bf16 autocast of the forward, on GPU only (CPU runs fp32)
    parallel: str = "ddp"              # ddp | fsdp: fsdp shards an hf-causal generator over the workers (FSDP2)
    trace: bool = False                # write OUTPUT_DIR/trace/rank<r>.jsonl: worker pid, example indices per step
    best_metric: str = "em+recall@1"   # dev metric (or sum, "a+b") that picks the best checkpoint (eval_every > 0)
    max_failures: int = 2              # Ray Train FailureConfig: worker-group restarts from the last checkpoint
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1           # logical CPUs Ray reserves per worker (the demo's); torch_threads computes
    wait_for_resources: bool = False   # true: wait for nodes (an autoscaling cluster) instead of refusing a run
                                       # whose workers the cluster's nodes cannot place now
    torch_threads: int = 2


@dataclass
class EvalConfig:
    k: int = 5
    decode: str = "fast"               # fast | thorough (rag-sequence) ; rag-token uses beam over the marginal
    num_beams: int = 1
    max_questions: int = 0             # 0 = all


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None    # None = MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "latentrag"
    run_name: str | None = None
    register_as: str | None = None     # register the run's model/ as a new version of this registered model
    register_alias: str | None = None  # ... and point this alias at it (serve models:/NAME@ALIAS)
    bundle_index_mb: float = 64.0      # model/ carries a copy of the index when it is at most this large (0 = never)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    estimator: EstimatorConfig = field(default_factory=_new_estimator_config)   # see estimator_config_class
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    output_dir: str = "runs/train"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and `--set` use."""
        out: dict[str, Any] = {}

        def walk(prefix: str, values: dict) -> None:
            for key, value in values.items():
                if isinstance(value, dict):              # a section, or a nested one such as generator.lora
                    walk(f"{prefix}{key}.", value)
                else:
                    out[f"{prefix}{key}"] = value
        walk("", self.to_dict())
        return out

    def _validate_refresh(self) -> None:
        _validate_refresh_impl(self)

    def validate(self) -> "Config":
        registry = _estimators()
        if self.train.estimator not in registry.REGISTRY:
            raise ConfigError(f"train.estimator: unknown estimator {self.train.estimator!r}; "
                              f"choose one of {', '.join(registry.estimator_names())}")
        if self.train.strategy not in registry.STRATEGIES:
            raise ConfigError(f"train.strategy: unknown strategy {self.train.strategy!r}; "
                              f"choose one of {', '.join(registry.strategy_names())}")
        if self.generator.kind not in ("copy-bart", "hf-seq2seq", "hf-causal"):
            raise ConfigError(f"generator.kind: unknown kind {self.generator.kind!r}")
        if self.generator.kind != "copy-bart" and not self.generator.name_or_path:
            raise ConfigError(f"generator.name_or_path: required for generator.kind={self.generator.kind}")
        if self.generator.init not in ("random", "auto") and self.generator.kind != "copy-bart":
            raise ConfigError(f"generator.init: {self.generator.init!r} is for generator.kind=copy-bart; "
                              f"{self.generator.kind} loads generator.name_or_path (set generator.init=random)")
        _validate_generator(self)
        if self.index.type not in ("flat", "hnsw", "ivfpq"):
            raise ConfigError(f"index.type: unknown index type {self.index.type!r}; choose flat, hnsw or ivfpq")
        if self.index.shard_scope not in ("cluster", "node"):
            raise ConfigError(f"index.shard_scope: {self.index.shard_scope!r}; choose cluster or node")
        if self.index.cpus_per_shard < 0:
            raise ConfigError(f"index.cpus_per_shard: must be >= 0, got {self.index.cpus_per_shard}")
        if self.index.shard_resource and self.index.shard_scope == "node":
            raise ConfigError(f"index.shard_resource={self.index.shard_resource!r} pins shard actors to the nodes that "
                              "have it, index.shard_scope=node to each training worker's node: choose one")
        self._validate_refresh()
        for key, value in (("train.k", self.train.k), ("train.batch_size", self.train.batch_size),
                           ("train.max_steps", self.train.max_steps), ("eval.k", self.eval.k)):
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.retriever.hybrid_k < 0:
            raise ConfigError(f"retriever.hybrid_k: must be >= 0 (0 = dense candidates only), got "
                              f"{self.retriever.hybrid_k}")
        if self.retriever.bm25_weight < 0 or (self.retriever.bm25_weight > 0 and self.retriever.hybrid_k == 0):
            raise ConfigError(f"retriever.bm25_weight: must be >= 0, and > 0 only with retriever.hybrid_k > 0 (BM25 "
                              f"scores the hybrid candidates), got {self.retriever.bm25_weight} with hybrid_k "
                              f"{self.retriever.hybrid_k}")
        if self.retriever.tau <= 0:
            raise ConfigError(f"retriever.tau: must be > 0, got {self.retriever.tau}")
        for settings in registry.settings_of(self.estimator, "estimator"):   # every estimator's, selected or not
            settings.validate(self)
        if self.train.retriever_anchor_kl < 0:
            raise ConfigError(f"train.retriever_anchor_kl: must be >= 0, got {self.train.retriever_anchor_kl}")
        if self.train.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps: must be >= 1, got {self.train.grad_accum_steps}")
        if self.train.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision: {self.train.precision!r}; choose bf16 or fp32")
        if self.train.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel: {self.train.parallel!r}; choose ddp or fsdp")
        if self.train.parallel == "fsdp" and self.generator.kind != "hf-causal":
            raise ConfigError(f"train.parallel=fsdp: shards an hf-causal generator only (generator.kind is "
                              f"{self.generator.kind}); use train.parallel=ddp")
        if not 0.0 < self.train.two_phase_split < 1.0:
            raise ConfigError(f"train.two_phase_split: must be in (0, 1), got {self.train.two_phase_split}")
        for settings in registry.settings_of(self.train, "train"):           # strategy objectives' (independent)
            settings.validate(self)
        return self


def _validate_generator(cfg: "Config") -> None:
    """The hf-causal settings that can be checked without loading the model (target modules are checked when it
    loads, before any training)."""
    g = cfg.generator
    if g.kind != "hf-causal":
        for key, value, default in (("lora", g.lora, None), ("chat_template", g.chat_template, False),
                                    ("quantize", g.quantize, "none"), ("dtype", g.dtype, "float32"),
                                    ("gradient_checkpointing", g.gradient_checkpointing, False)):
            if value != default:
                raise ConfigError(f"generator.{key}: only for generator.kind=hf-causal (kind is {g.kind})")
        return
    check_prompt_template(g.prompt_template)
    if g.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"generator.dtype: {g.dtype!r}; choose float32 or bfloat16")
    if g.quantize not in ("none", "4bit", "8bit"):
        raise ConfigError(f"generator.quantize: {g.quantize!r}; choose none, 4bit or 8bit")
    if g.quantize != "none":
        if g.lora is None:
            raise ConfigError(f"generator.quantize={g.quantize}: a quantized base cannot be fine-tuned in full; "
                              "add a generator.lora section (QLoRA)")
        if not cfg.train.use_gpu:
            raise ConfigError(f"generator.quantize={g.quantize}: 4-bit/8-bit bases need a CUDA GPU (bitsandbytes); "
                              "set train.use_gpu=true on GPU workers, or generator.quantize=none on CPU")
    if g.lora is not None:
        lora = g.lora
        if lora.r < 1:
            raise ConfigError(f"generator.lora.r: must be >= 1, got {lora.r}")
        if lora.alpha <= 0:
            raise ConfigError(f"generator.lora.alpha: must be > 0, got {lora.alpha}")
        if not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"generator.lora.dropout: must be in [0, 1), got {lora.dropout}")
        if not lora.target_modules or not all(m.strip() for m in lora.target_modules):
            raise ConfigError("generator.lora.target_modules: name at least one module (e.g. q_proj, v_proj) "
                              "or all-linear")


def check_prompt_template(template: str, key: str = "generator.prompt_template") -> None:
    """A template with exactly the {passage} and {question} slots, once each (other braces doubled: {{ }})."""
    import string

    try:
        slots = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    for slot in ("passage", "question"):
        if slots.count(slot) != 1:
            raise ConfigError(f"{key}: needs the {{{slot}}} slot exactly once (found {slots.count(slot)}) in "
                              f"{template!r}")
    other = sorted(set(slots) - {"passage", "question"})
    if other:
        raise ConfigError(f"{key}: unknown slot(s) {', '.join('{' + s + '}' for s in other)}; only {{passage}} "
                          "and {question} are filled")


def _validate_refresh_impl(cfg: "Config") -> None:
    from pipeline.refresh import ScheduleError, parse_refresh_schedule

    try:
        schedule = parse_refresh_schedule(cfg.index.refresh_schedule)
    except ScheduleError as exc:
        raise ConfigError(str(exc)) from None
    if schedule and not cfg.retriever.train_passage_encoder:
        raise ConfigError("index.refresh_schedule: set, but retriever.train_passage_encoder is false (a frozen "
                          "passage encoder never makes the index stale); set it true or clear the schedule")
    m = cfg.index.rerank_top_m
    if m:
        if not cfg.retriever.train_passage_encoder:
            raise ConfigError("index.rerank_top_m: needs retriever.train_passage_encoder=true (re-ranking with the "
                              "frozen encoder that built the index changes nothing)")
        if m <= max(cfg.train.k, cfg.eval.k):
            raise ConfigError(f"index.rerank_top_m: {m} must be 0 (off) or more than train.k={cfg.train.k} and "
                              f"eval.k={cfg.eval.k}")
    if cfg.index.refresh_cpus <= 0:
        raise ConfigError(f"index.refresh_cpus: must be > 0, got {cfg.index.refresh_cpus}")


# Renamed keys: (section, old key) -> (new key, why). The old key is refused with a message naming the new one.
RENAMED = {
    ("index", "encode_batch_size"): ("encode_map_batch_size", "it is the number of passages per Ray Data "
                                     "map_batches call, not the forward-pass batch"),
}


def _field_types(cls) -> dict[str, Any]:
    if cls is Config:      # the estimator section's class follows the registry (estimator_config_class)
        return typing.get_type_hints(cls, localns={"EstimatorConfig": estimator_config_class()})
    return _declared_types(cls)


@functools.cache
def _declared_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_dataclass(hint: Any) -> type | None:
    """D for a field declared `D | None` with D a dataclass (an optional section such as generator.lora)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(hint, "__name__", str(hint))


def coerce_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (as YAML read it) as the declared type `hint` of config key `key`, or ConfigError naming the key.

    The one coercion of config values: YAML files (`load_config`, `from_dict`) and `--set` both go through it.
    PyYAML reads `1e-3` and `1e2` as strings (YAML 1.1 wants a dot): a float field takes any number or numeric
    string; an int field takes an integer, or a float or numeric string with an integral value (`1e2` -> 100),
    never 1.5; a bool field takes only true/false; a str field takes a string or a number (`run_name: 2024`).
    `null` is accepted only where the field is optional (`str | None`). A `list[str]` field takes a list or a
    comma-separated string (`--set generator.lora.target_modules=q_proj,v_proj`)."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {_show(value)}")
        return [coerce_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) != 1:
            raise TypeError(f"{key}: unsupported config type {hint!r}")
        try:
            return coerce_value(value, options[0], key)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_show(value)}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true or false), got {_show(value)}")
    if hint is int:
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{key}: expected int, got {_show(value)}")
        if isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{key}: expected int, got {_show(value)} (not a whole number)")
            number = int(number)
        return number
    if hint is float:
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{key}: expected float (a number such as 1e-3), got {_show(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
        return float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        tip = " (quote it)" if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: expected str, got {_show(value)}{tip}")
    raise TypeError(f"{key}: unsupported config type {hint!r}")


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _as_number(value: Any) -> int | float | None:
    """An int or float from a number or a numeric string ("1e-3", "100", "1_000"); None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return None


def _unknown_keys_message(where: str, unknown: list[str], known: list[str]) -> str:
    parts, guessed = [], False
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        guessed = guessed or bool(close)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    message = f"{where}: unknown key(s) {', '.join(parts)}"
    return message if guessed else f"{message}; known: {', '.join(known)}"


def _build(cls, values: dict, section: str, source: str | None, upgrade_renamed: bool):
    prefix = f"{source}: " if source else ""
    where = section or "top level"
    names = [f.name for f in dataclasses.fields(cls)]
    for name in list(values):
        if (section, name) in RENAMED:
            new, why = RENAMED[(section, name)]
            if not upgrade_renamed or new in values:
                raise ConfigError(f"{prefix}{section}.{name}: renamed to {section}.{new} ({why}); "
                                  f"write {new}: {values[name]!r} instead")
            values = {(new if k == name else k): v for k, v in values.items()}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(prefix + _unknown_keys_message(where, [str(k) for k in unknown], names))
    hints = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}" if section else name
        hint = hints[name]
        if value is None and _optional_dataclass(hint) is not None:
            kwargs[name] = None                     # an optional section switched off (generator.lora: null)
            continue
        hint = _optional_dataclass(hint) or hint
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a mapping of {key}.* keys, got {_show(value)}")
            kwargs[name] = _build(hint, value, key, source, upgrade_renamed)
        else:
            try:
                kwargs[name] = coerce_value(value, hint, key)
            except ConfigError as exc:
                raise ConfigError(f"{prefix}{exc}") from None
    return cls(**kwargs)


def from_dict(values: dict | None, source: str | Path | None = None, *, upgrade_renamed: bool = False) -> Config:
    """A Config from nested mappings (a YAML file's contents): unknown keys refused (with a suggestion), renamed
    keys (`RENAMED`) refused naming the new key, and every value coerced to its declared type (`coerce_value`).
    Errors are `ConfigError`s that name the key and, when given, `source` (the file).

    `upgrade_renamed=True` is for configs latentrag wrote itself (a checkpoint's or an MLflow model's
    config.yaml from before a rename): renamed keys are read under their new names instead of refused."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{source or 'config'}: the top level must be a mapping")
    return _build(Config, values or {}, "", str(source) if source is not None else None, upgrade_renamed)


def read_yaml_mapping(path: str | Path | None) -> dict:
    """A YAML file whose top level is a mapping ({} for None); errors name the file (and the line)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (expected a YAML config file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not valid UTF-8 (byte {raw[exc.start]:#04x})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context and getattr(exc, "problem", None) else problem
        raise ConfigError(f"{path}{where}: not valid YAML: {detail}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, train:, ...), "
                          f"got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + `key=value` overrides, validated."""
    cfg = from_dict(read_yaml_mapping(path), source=path)
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return cfg.validate()


def apply_override(cfg: Config, item: str) -> Config:
    """`section.key=value` (`--set`): the value is read as YAML and coerced like a file's (`coerce_value`)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if hasattr(target, part) and getattr(target, part) is None and dataclasses.is_dataclass(target):
            optional = _optional_dataclass(_field_types(type(target)).get(part))
            if optional is not None:        # `--set generator.lora.r=8` turns the section on with its defaults
                setattr(target, part, optional())
        if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
            raise ConfigError(f"--set {key}: unknown section {part!r}")
        target = getattr(target, part)
    leaf = parts[-1]
    if dataclasses.is_dataclass(target) and hasattr(target, leaf) and \
            _optional_dataclass(_field_types(type(target)).get(leaf)) is not None and raw.strip() in ("null", "~", ""):
        setattr(target, leaf, None)         # `--set generator.lora=null`: the optional section off
        return cfg
    section = ".".join(parts[:-1])
    if (section, leaf) in RENAMED:
        new, why = RENAMED[(section, leaf)]
        raise ConfigError(f"--set {key}: renamed to {section}.{new} ({why})")
    if not hasattr(target, leaf) or dataclasses.is_dataclass(getattr(target, leaf)):
        names = [f.name for f in dataclasses.fields(target)]
        close = difflib.get_close_matches(leaf, names, n=1)
        raise ConfigError(f"--set {key}: unknown key {leaf!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw                     # not YAML (e.g. "[1"): the text itself, which only a str key takes
    try:
        value = coerce_value(value, _field_types(type(target))[leaf], key)
    except ConfigError as exc:
        raise ConfigError(f"--set {exc}") from None
    setattr(target, leaf, value)
    return cfg


def describe_defaults() -> str:
    """One line on the built-in defaults (for `latentrag train --help`), read from the dataclasses themselves."""
    c = Config()
    g, t = c.generator, c.train
    init = {"auto": "the shipped reader at its sizes, else random"}.get(g.init, g.init)
    return (f"generator {g.kind} (init {g.init}: {init}; lr {g.lr:g}), retriever {c.retriever.encoder} "
            f"(tau {c.retriever.tau:g}, lr {c.retriever.lr:g}), estimator {t.estimator} ({t.strategy}), "
            f"K {t.k}, batch {t.batch_size}, {t.max_steps} steps")


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
