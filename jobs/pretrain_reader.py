"""Pre-train the embedded copy-bart generator to read: the shipped `reader`, or a reader of your own corpus.

    latentrag pretrain-reader                                   # reproduces pipeline/assets/reader (~3 min, one core)
    latentrag pretrain-reader --steps 300 --out /tmp/reader     # a quick look
    latentrag pretrain-reader --corpus runs/cmu/data/passages --config configs/cmu_qa_wiki.yaml --out runs/cmu/reader
        # then train from it: --set generator.init=runs/cmu/reader

With --corpus (a passage directory written by `ingest` or `prepare_qa`): reading practice without labels, a Ray
job. Ray Data maps `pipeline.cloze.cloze_examples` over the passages (salient-span cloze questions: a sentence with
a name or number masked, read against its passage, the span as the answer; after REALM's salient span masking),
and a Ray Train worker trains the generator of --config (its architecture, learning rates and encoder; weights
from `generator.init`) on them by maximum likelihood. One passage in 20 (by id) is held out: greedy EM/F1 on its
cloze questions, and with --eval-qa, on the questions whose answer (not yes/no) is in one of their gold passages,
read from that passage (a reading score, not retrieval). OUT then holds model.safetensors and generator.json, which
`generator.init: OUT` loads, and pretrain.json (arguments, examples, the evaluations, seconds).

The task: (question, gold passage) -> answer, on synthetic knowledge bases generated with *other* seeds than any the
project evaluates on (default 100-104; the demo uses seed 0, the held-out check seed 1), worded with the "reading"
templates only (pipeline/synthetic.py), disjoint from the "default" and "alt" ones: the demo's and the held-out
knowledge bases are both unseen wording for it. A generator from scratch needs hundreds of joint steps
before p(y | x, z) says anything about z; this one reads from the first step, so the demo's budget goes to the
retriever and to the new knowledge base. It stays a generator (answers are decoded token by token), and
`generator.init: random` trains one from scratch as before.

Written: OUT/model.safetensors (float16), OUT/generator.json (architecture; tokenizer "minilm", the embedded one),
OUT/pretrain.json (arguments, held-out EM per evaluation, seconds). Held-out EM is greedy decoding with the gold
passage on a knowledge base of seed --eval-seed, for both template sets.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch, transformers and the pipeline are imported inside the functions: after the variables above, which
# transformers and tokenizers read when first imported

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "reader"


def _examples(kb) -> list[tuple[str, str, str]]:
    text = {p["id"]: p["text"] for p in kb.passages}
    return [(q["question"], text[q["gold_passage_ids"][0]], q["answers"][0]) for q in kb.questions]


def reading_scores(gen, rows: list[tuple[str, str, str]], batch_size: int = 64) -> dict:
    """Greedy decoding of (question, passage, answer) rows given the passage: EM and F1 (None without rows), n."""
    import torch

    from pipeline.decoding import beam_search
    from pipeline.metrics import exact_match, f1_score

    if not rows:
        return {"em": None, "f1": None, "n": 0}
    gen.eval()
    em = f1 = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            state = gen.start_decoding(gen.encode_inputs([q for q, _, _ in chunk], [p for _, p, _ in chunk]))
            beams = beam_search(lambda prefix, state=state: gen.decode_step(state, prefix), len(chunk),
                                gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, 1,
                                gen.max_target_length)
            for b, (_, _, a) in zip(beams, chunk):
                text = gen.decode(b[0][0])
                em += exact_match(text, a)
                f1 += f1_score(text, a)
    gen.train()
    return {"em": em / len(rows), "f1": f1 / len(rows), "n": len(rows)}


def greedy_em(gen, rows: list[tuple[str, str, str]], batch_size: int = 64) -> float:
    """Exact match of greedy decoding given the gold passage."""
    return reading_scores(gen, rows, batch_size)["em"] or 0.0


def save_reader(gen, out: Path) -> None:
    """float16 weights (tied embeddings once) and the architecture; the tokenizer is the package's MiniLM one."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(gen.unique_state(torch.float16), str(tmp))
    os.chmod(tmp, 0o644)                              # safetensors writes 0600; the package ships it readable
    os.replace(tmp, out / "model.safetensors")
    hparams = {**gen.hparams, "output_token_ids": None, "tokenizer": gen.tokenizer_name}
    (out / "generator.json").write_text(json.dumps({"kind": "copy-bart", **hparams}, indent=2) + "\n")


def _train_on_cloze(config: dict) -> None:
    """The Ray Train worker: the config's generator trained on the cloze examples of the "train" dataset shard."""
    import ray.train
    import torch

    from jobs.ray_env import worker_log
    from pipeline.config import GeneratorConfig
    from pipeline.models.generator import build_generator

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    gcfg = GeneratorConfig(**config["generator"])
    gen = build_generator(gcfg, config["answers"])
    pretrained = {id(p) for p in gen.pretrained_parameters()}
    params = [p for p in gen.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in pretrained], "lr": gcfg.lr}]
    if pretrained:
        groups.append({"params": [p for p in params if id(p) in pretrained], "lr": gcfg.encoder_lr or gcfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps, warmup = config["steps"], config["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    shard = ray.train.get_dataset_shard("train")
    held = {name: [tuple(r) for r in rows] for name, rows in config["held_out"].items()}
    history, start, step, epoch = [], time.time(), 0, 0

    def evaluate(loss: float | None) -> None:
        scores = {name: {k: round(v, 4) if isinstance(v, float) else v
                         for k, v in reading_scores(gen, rows, 32).items()} for name, rows in held.items()}
        history.append({"step": step, "loss": loss, **scores, "seconds": round(time.time() - start, 1)})
        worker_log(f"[pretrain-reader] step {step}: " + "  ".join(
            f"{name} EM {v['em']} F1 {v['f1']} (n {v['n']})" for name, v in scores.items()))

    evaluate(None)                  # the start: what the practice adds is measured against it
    while step < steps:
        for batch in shard.iter_batches(batch_size=config["batch_size"], local_shuffle_buffer_size=4096,
                                        local_shuffle_seed=config["seed"] + epoch, drop_last=True):
            inputs = gen.encode_inputs(list(batch["question"]), list(batch["passage_text"]))
            labels, _ = gen.encode_targets(list(batch["answer"]))
            loss = -gen.token_logprobs(inputs, labels).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            last = step == steps
            if step % config["log_every"] == 0 or last:
                worker_log(f"[pretrain-reader] step {step}/{steps}  loss {loss.item():.3f}  "
                           f"({time.time() - start:.0f} s)")
            if step % config["eval_every"] == 0 or last:
                evaluate(round(loss.item(), 4))
            if last:
                break
        epoch += 1
    if ray.train.get_context().get_world_rank() == 0:
        out = Path(config["out"])
        save_reader(gen, out)
        (out / "pretrain.json").write_text(json.dumps({**config["record"], "history": history,
                                                        "train_seconds": round(time.time() - start, 1)},
                                                       indent=2) + "\n")
    ray.train.report({"step": step})


def _is_held_out(passage_id: str) -> bool:
    import zlib

    return zlib.crc32(passage_id.encode()) % 20 == 0


def _reading_rows(qa_path: str, passages: dict[str, str]) -> list[list[str]]:
    """(question, gold passage, answer) for the questions whose answer (not yes/no) is in one of their gold
    passages (a split row's windows count: GoldPassages), the first such passage."""
    from pipeline.data import GoldPassages, read_qa
    from pipeline.metrics import answer_type, normalize_answer

    gold = GoldPassages(passages)
    out = []
    for r in read_qa(qa_path):
        if answer_type(r["answers"]) != "other" or not r.get("gold_passage_ids"):
            continue
        answer = next((a for a in r["answers"] if normalize_answer(a)), None)
        hit = next((p for p in gold.passages(r["gold_passage_ids"]) if p in passages and answer
                    and normalize_answer(answer) in normalize_answer(passages[p])), None)
        if hit is not None:
            out.append([r["question"], passages[hit], answer])
    return out


def corpus_main(args) -> int:
    """--corpus: cloze examples from the passages with Ray Data, the config's generator trained by Ray Train."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.ray_env import ensure_ray, error_message
    from pipeline.cloze import cloze_examples
    from pipeline.config import ConfigError, load_config
    from pipeline.data import DataError, read_passages
    from pipeline.embeddings import passage_files
    from pipeline.index import passage_text

    try:
        cfg = load_config(args.config, args.set)
        passage_files(args.corpus)                          # a passage directory, else a clear error
        if cfg.generator.kind != "copy-bart":
            raise ConfigError(f"generator.kind {cfg.generator.kind!r}: pretrain-reader trains copy-bart readers")
        if args.eval_qa and not Path(args.eval_qa).is_file():
            raise FileNotFoundError(f"--eval-qa {args.eval_qa}: no such file")
        table = read_passages(args.corpus)
        texts = {str(i): passage_text(t or "", x) for i, t, x in zip(table["id"].to_pylist(),
                                                                     table["title"].to_pylist(),
                                                                     table["text"].to_pylist())}
        reading = _reading_rows(args.eval_qa, texts)[:args.eval_questions] if args.eval_qa else []
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    start = time.time()
    ensure_ray()
    per, seed = args.per_passage, args.seed

    def examples(row: dict) -> list[dict]:
        return [{"question": e["question"], "passage_text": passage_text(e["passage_title"] or "", e["passage"]),
                 "answer": e["answer"], "held_out": _is_held_out(e["passage_id"])}
                for e in cloze_examples(str(row["id"]), row.get("title") or "", row["text"], per, seed)]

    try:
        ds = ray.data.read_parquet(passage_files(args.corpus)).flat_map(examples).materialize()
        train_ds = ds.filter(lambda r: not r["held_out"]).materialize()
        held_cloze = [[r["question"], r["passage_text"], r["answer"]]
                      for r in ds.filter(lambda r: r["held_out"]).take(args.eval_questions)]
        n_train = train_ds.count()
        if n_train < args.batch_size:
            print(f"error: --corpus {args.corpus}: only {n_train} cloze examples (need at least --batch-size "
                  f"{args.batch_size}); the passages hold too few sentences with a name or number", file=sys.stderr)
            return 2
        answers = [r["answer"] for r in train_ds.take(20_000)]
        print(f"pretrain-reader: {n_train} cloze examples from {len(texts)} passages, {len(held_cloze)} held out"
              + (f", {len(reading)} reading questions from {args.eval_qa}" if reading else "")
              + f" ({time.time() - start:.0f} s)", flush=True)
        g = cfg.generator
        gdict = {k: getattr(g, k) for k in g.__dataclass_fields__}
        record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "generator": gdict, "examples": n_train, "held_out_cloze": len(held_cloze),
                  "reading_questions": len(reading)}
        config = {"generator": gdict, "answers": answers, "steps": args.steps, "warmup": args.warmup,
                  "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed,
                  "log_every": args.log_every, "eval_every": args.eval_every, "out": str(out), "record": record,
                  "held_out": {"cloze": held_cloze, **({"reading": reading} if reading else {})}}
        trainer = TorchTrainer(_train_on_cloze, train_loop_config=config, datasets={"train": train_ds},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name="pretrain-reader", storage_path=str(out / "ray_results")))
        trainer.fit()
    except Exception as exc:        # a worker's error arrives wrapped; show its message
        print(f"error: pretrain-reader failed: {error_message(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB, {time.time() - start:.0f} s); "
          f"train from it with --set generator.init={out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latentrag pretrain-reader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: the shipped asset)")
    p.add_argument("--kb-seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    p.add_argument("--entities", type=int, default=400, help="entities per knowledge base")
    p.add_argument("--eval-seed", type=int, default=99)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-questions", type=int, default=400)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a busy 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("reading practice on your corpus (--corpus)")
    c.add_argument("--corpus", help="a passage directory (ingest / prepare_qa output): cloze questions from it")
    c.add_argument("--config", help="the run config whose generator is pre-trained (its sizes, encoder, rates)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    c.add_argument("--per-passage", type=int, default=2, help="cloze questions per passage")
    c.add_argument("--eval-qa", help="questions with gold_passage_ids: reading EM/F1 with the passage that holds "
                                     "the answer")
    c.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.corpus:
        if args.out == DEFAULT_OUT:
            p.error("--corpus needs --out (the shipped reader is made from synthetic knowledge bases)")
        return corpus_main(args)
    if args.config or args.set or args.eval_qa:
        p.error("--config, --set and --eval-qa go with --corpus")

    import torch

    from pipeline.config import GeneratorConfig
    from pipeline.models.generator import build_generator
    from pipeline.synthetic import generate_knowledge_base

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = [ex for s in args.kb_seeds
             for ex in _examples(generate_knowledge_base(seed=s, num_entities=args.entities, template_set="reading"))]
    held_out = {t: _examples(generate_knowledge_base(seed=args.eval_seed, num_entities=100, template_set=t))
                [:args.eval_questions] for t in ("default", "alt")}
    print(f"pretrain-reader: {len(train)} (question, gold passage, answer) examples from kb seeds {args.kb_seeds}; "
          f"held-out kb seed {args.eval_seed}", flush=True)

    # The vocabulary head is tied to the input embeddings, so the weights fit any knowledge base: a run that loads
    # them points the head at its own answers' tokens (CopyBart.set_output_tokens).
    gen = build_generator(GeneratorConfig(init="random", dropout=args.dropout), [a for _, _, a in train])
    opt = torch.optim.AdamW(gen.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.0, 1 - s / args.steps))
    history, start, seen = [], time.time(), 0
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch_size)
        inputs = gen.encode_inputs([q for q, _, _ in batch], [p_ for _, p_, _ in batch])
        labels, _ = gen.encode_targets([a for _, _, a in batch])
        loss = -gen.token_logprobs(inputs, labels).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += len(batch)
        if step % args.eval_every == 0 or step == args.steps:
            em = {t: round(greedy_em(gen, rows), 3) for t, rows in held_out.items()}
            history.append({"step": step, "loss": round(loss.item(), 3), "em": em,
                            "seconds": round(time.time() - start, 1)})
            print(f"  step {step:5d}  loss {loss.item():7.3f}  held-out EM default {em['default']:.3f} "
                  f"alt {em['alt']:.3f}  ({time.time() - start:.0f} s)", flush=True)
    save_reader(gen, args.out)
    (args.out / "pretrain.json").write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "examples": len(train), "examples_seen": seen, "history": history,
        "seconds": round(time.time() - start, 1)}, indent=2) + "\n")
    print(f"wrote {args.out} ({(args.out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
