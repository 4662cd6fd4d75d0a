"""Serving benchmark: p50/p99 latency and requests/s of POST /v1/answer at 1, 8 and 32 concurrent clients, with
dynamic batching (@serve.batch) against one request at a time (max_batch_size = 1), on 127.0.0.1; and Hugging Face
`RagSequenceForGeneration.generate` called one request at a time at the same model sizes.

    python benchmarks/serve_bench.py                                   # demo checkpoint if present, else a demo-sized
    python benchmarks/serve_bench.py --checkpoint runs/demo/checkpoint  # untrained model (same sizes, same speed)

Load is bounded: every client sends `--requests-per-client` requests back to back (after a warm-up), so a level
sends clients x requests in all. Prints a table and writes benchmarks/results/serve_bench.json.
Target (DESIGN.md): batched >= 4x the throughput of max_batch_size=1 at 32 clients, zero errors.

The OpenAI-compatible route: with the batched configuration every client level also runs `POST
/v1/chat/completions` (the same question as the last user message, the same mode, k and beams through the
`latentrag` extension field, passages left out as for /v1/answer), right after the /v1/answer level, and the
table shows its requests/s against /v1/answer's. Target (issue 20): within 10% of /v1/answer at 32 clients, zero
errors. `--routes answer` skips it.

The Hugging Face baseline is built from configs at the served model's sizes (a DPR question encoder shaped like the
served query encoder, the served BART's config and weights as the RAG generator; no downloads) and runs in this
process before Ray starts, one request after another: question encoding, the same FAISS index search, then
`generate` over the k passages (HF's thorough RAG-Sequence decoding: beams per passage, then a rescoring forward
pass). It pays no HTTP or Serve overhead, which favours it, and runs with --hf-threads torch threads (default 2, its
best on a quiet 2-core machine; the Generator replica runs with --generator-threads, default 1, leaving a core to the
proxy, the ingress and the Retriever). The served RAG-Sequence decoding (--decode fast, the default) keeps greedy/beam
search per passage and sums p(y|x,z) only over the passages whose beams produced y, without HF's rescoring pass;
--decode thorough rescores like HF. The JSON states both under setup.decoding.

Ray starts with serving.app.SERVE_THROUGHPUT_ENV (--serve-env throughput, as `latentrag serve` does). Each row has
`cpu_ms_per_request`: CPU milliseconds per request of every process on the request path (HTTP proxy, ingress,
Retriever, Generator, Serve controller, raylet, GCS, this load client), read from /proc before and after the level;
unlike requests/s these barely move when other work shares the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_demo_sized_checkpoint(out: Path, num_entities: int, seed: int = 0) -> tuple[Path, list[str]]:
    """The demo's model sizes (MiniLM query encoder, default copy-bart) over the synthetic knowledge base, untrained.
    Index vectors are random unit vectors (retrieval quality does not change serving speed; encoding the corpus
    would cost minutes on 2 cores)."""
    import numpy as np
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config
    from pipeline.index import load_index, write_index_version
    from pipeline.models.generator import build_generator
    from pipeline.models.retriever import TextEncoder, encoder_fingerprint
    from pipeline.rag import RagModel
    from pipeline.synthetic import generate_knowledge_base

    kb = generate_knowledge_base(seed=seed, num_entities=num_entities)
    questions = [q["question"] for q in kb.test]
    if (out / "checkpoint" / "rag.json").is_file():
        return out / "checkpoint", questions
    cfg = Config()
    encoder = TextEncoder(cfg.retriever.encoder, pooling=cfg.retriever.pooling, normalize=cfg.retriever.normalize,
                          max_length=cfg.retriever.max_length)
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((len(kb.passages), encoder.dim)).astype("float32")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    v = write_index_version(out / "index", emb, [p["id"] for p in kb.passages], "flat", encoder_name="minilm",
                            encoder_fingerprint=encoder_fingerprint(cfg.retriever.encoder), corpus_fingerprint="bench",
                            titles=[p["title"] for p in kb.passages], texts=[p["text"] for p in kb.passages])
    torch.manual_seed(seed)
    gen = build_generator(cfg.generator, [a for q in kb.train for a in q["answers"]])
    model = RagModel(encoder, gen, load_index(v), tau=cfg.retriever.tau)
    return save_checkpoint(out / "checkpoint", model, cfg, step=0), questions


def hf_rag_sequence_baseline(checkpoint: str, index: str | None, questions: list[str], n: int, k: int,
                             num_beams: int, threads: int) -> dict:
    """Hugging Face `RagSequenceForGeneration.generate`, one request at a time, at the served model's sizes."""
    import numpy as np
    import torch
    from transformers import BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration

    from serving.loading import load_generator_part, load_retriever_part, resolve_model_ref

    torch.set_num_threads(threads)
    ref = resolve_model_ref(checkpoint, index)
    retriever, gen = load_retriever_part(ref), load_generator_part(ref)
    if not hasattr(gen, "bart"):
        raise SystemExit("the HF baseline needs a copy-bart generator (its BART is the RAG generator)")
    enc_cfg = retriever.query_encoder.model.config
    q_cfg = DPRConfig(vocab_size=enc_cfg.vocab_size, hidden_size=enc_cfg.hidden_size,
                      num_hidden_layers=enc_cfg.num_hidden_layers, num_attention_heads=enc_cfg.num_attention_heads,
                      intermediate_size=enc_cfg.intermediate_size, max_position_embeddings=enc_cfg.max_position_embeddings)
    g_cfg = BartConfig(**{**gen.bart.config.to_dict(), "forced_eos_token_id": None})
    cfg = RagConfig.from_question_encoder_generator_configs(q_cfg, g_cfg, n_docs=k)
    torch.manual_seed(0)
    rag = RagSequenceForGeneration(cfg).eval()
    rag.generator.model.load_state_dict(gen.bart.state_dict())        # same BART weights (no copy head)
    tok = retriever.query_encoder.tokenizer
    max_new = gen.max_target_length
    lat, lengths = [], []

    def one(question: str) -> None:
        with torch.no_grad():
            q = tok([question], return_tensors="pt", truncation=True, max_length=retriever.query_encoder.max_length)
            qvec = rag.question_encoder(q["input_ids"], attention_mask=q["attention_mask"])[0]     # [1, d]
            rows = retriever.search_rows(qvec, k)
            emb = torch.from_numpy(np.asarray(retriever.index.embeddings[rows.reshape(-1)], dtype=np.float32))
            doc_scores = (qvec.unsqueeze(1) * emb.view(1, k, -1)).sum(-1)
            cand = retriever.candidates(rows, qvec)
            ctx = gen.encode_inputs([question] * k, cand.texts[0])
            out = rag.generate(context_input_ids=ctx["input_ids"], context_attention_mask=ctx["attention_mask"],
                               doc_scores=doc_scores, n_docs=k, num_beams=num_beams, max_new_tokens=max_new,
                               decoder_start_token_id=gen.start_token_id, bos_token_id=gen.start_token_id,
                               eos_token_id=gen.eos_token_id, pad_token_id=gen.tokenizer.pad_token_id)
        lengths.append(int(out.shape[-1]))

    for question in questions[:2]:                                  # warm-up
        one(question)
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        one(questions[i % len(questions)])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]      # noqa: E731
    return {"requests": n, "ok": n, "errors": 0, "wall_s": round(wall, 3), "req_per_s": round(n / wall, 2),
            "p50_ms": round(pct(50) * 1000, 1), "p99_ms": round(pct(99) * 1000, 1),
            "mean_output_tokens": round(sum(lengths) / len(lengths), 1)}


def _mean_batch(before: dict, after: dict, replica: str) -> float | None:
    """Mean batch size of one replica's @serve.batch between two /v1/info readings."""
    batches = after[replica]["batches"] - before[replica]["batches"]
    return round((after[replica]["requests"] - before[replica]["requests"]) / batches, 2) if batches else None


def _process_label(pid: str) -> str | None:
    """A short name for the processes that serve a request (None for the rest of the machine)."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if int(pid) == os.getpid():
        return "load client + driver"
    m = re.search(r"ray::(ServeReplica:[^: ]+:(\w+)|ProxyActor|ServeController|HAProxy\w*)", cmd)
    if m:
        return m.group(2) or m.group(1)
    for name in ("raylet", "gcs_server", "haproxy"):
        if f"/{name} " in cmd or cmd.startswith(name):
            return name
    return "other ray" if "ray" in cmd and ("default_worker" in cmd or "dashboard" in cmd or "log_monitor" in cmd) \
        else None


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system, all threads) so far of every process on the request path, by label."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        label = _process_label(pid)
        if label is None:
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[label] = out.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_ms_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    d = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(1, requests) for k in after}
    d = {k: round(v, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v > 0.005}
    d["total"] = round(sum(d.values()), 2)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openai_body(body: dict, question: str) -> dict:
    """The chat-completions request equal to an /v1/answer body."""
    ext = {key: body[key] for key in ("mode", "k", "num_beams", "return_passages") if key in body}
    return {"model": "latentrag", "messages": [{"role": "user", "content": question}], "latentrag": ext}


def run_level(url: str, questions: list[str], clients: int, per_client: int, body: dict,
              route: str = "answer") -> dict:
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        s = requests.Session()
        start_gate.wait()
        for n in range(per_client):
            q = questions[(i * per_client + n) % len(questions)]
            t = time.perf_counter()
            try:
                r = s.post(url, json=openai_body(body, q) if route == "openai" else {**body, "question": q},
                           timeout=300)
                ok = r.status_code == 200
                err = None if ok else f"{r.status_code}: {r.text[:120]}"
            except Exception as exc:  # noqa: BLE001 - every failure counts
                ok, err = False, repr(exc)[:160]
            dt = time.perf_counter() - t
            with lock:
                (latencies.append(dt) if ok else errors.append(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    return {"route": route, "clients": clients, "requests": clients * per_client, "ok": len(lat), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 3), "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(pct(50) * 1000, 1), "p99_ms": round(pct(99) * 1000, 1),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint dir or MLflow URI (default: runs/demo/checkpoint if present, "
                                        "else a demo-sized untrained model built under --work-dir)")
    p.add_argument("--index")
    p.add_argument("--work-dir", default="/tmp/latentrag-serve-bench")
    p.add_argument("--num-entities", type=int, default=400, help="synthetic KB size for the built model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1], help="Generator max_batch_size values")
    p.add_argument("--batch-wait-s", type=float, default=0.01, help="Generator batch_wait_timeout_s")
    p.add_argument("--retriever-batch-wait-s", type=float, default=0.002, help="Retriever batch_wait_timeout_s")
    p.add_argument("--mode", default="rag-sequence", choices=["rag-sequence", "rag-token"])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--generator-threads", type=int, default=1,
                   help="torch threads in the Generator replica (1 leaves the other core of a 2-core machine to "
                        "the proxy, the ingress and the Retriever)")
    p.add_argument("--hf-threads", type=int, default=2, help="torch threads of the Hugging Face baseline")
    p.add_argument("--decode", default="fast", choices=["fast", "thorough"], help="served RAG-Sequence decoding")
    p.add_argument("--serve-env", default="throughput", choices=["throughput", "default"],
                   help="throughput: Ray started with serving.app.SERVE_THROUGHPUT_ENV (as `latentrag serve` does); "
                        "default: Ray Serve's defaults")
    p.add_argument("--routes", nargs="+", default=["answer", "openai"], choices=["answer", "openai"],
                   help="answer: POST /v1/answer; openai: POST /v1/chat/completions as well (batched "
                        "configuration only)")
    p.add_argument("--hf-requests", type=int, default=32,
                   help="requests for the Hugging Face RagSequenceForGeneration baseline (0: skip it)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_bench.json"))
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from pipeline.synthetic import generate_knowledge_base

    if args.checkpoint is None and (ROOT / "runs/demo/checkpoint/rag.json").is_file():
        args.checkpoint = str(ROOT / "runs/demo/checkpoint")
    if args.checkpoint is None:
        t = time.time()
        ckpt, questions = build_demo_sized_checkpoint(work, args.num_entities)
        print(f"[bench] built a demo-sized untrained checkpoint in {time.time() - t:.1f}s -> {ckpt}", flush=True)
        args.checkpoint, model_note = str(ckpt), "demo-sized untrained (random index vectors)"
    else:
        questions = [q["question"] for q in generate_knowledge_base(num_entities=args.num_entities).test]
        model_note = "given checkpoint"

    hf = None
    if args.hf_requests and args.mode == "rag-sequence":
        hf = hf_rag_sequence_baseline(args.checkpoint, args.index, questions, args.hf_requests, args.k,
                                      args.num_beams, args.hf_threads)
        print(f"[bench] HF RagSequenceForGeneration.generate, one at a time: {hf['req_per_s']:.2f} req/s  "
              f"p50 {hf['p50_ms']:.1f} ms  p99 {hf['p99_ms']:.1f} ms", flush=True)

    import ray
    import requests
    from ray import serve

    from serving.app import build_app, use_serve_throughput_env

    serve_env = use_serve_throughput_env() if args.serve_env == "throughput" else {}
    load_before = os.getloadavg()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **serve_env}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {"answer": f"http://127.0.0.1:{port}/v1/answer", "openai": f"http://127.0.0.1:{port}/v1/chat/completions"}
    body = {"mode": args.mode, "k": args.k, "num_beams": args.num_beams, "return_passages": False}
    zero = {"ray_actor_options": {"num_cpus": 0}}
    rows = []
    batched, single = max(args.batch_sizes), min(args.batch_sizes)
    try:
        for mbs in args.batch_sizes:
            app_args = {"checkpoint": args.checkpoint, "index": args.index, "max_batch_size": mbs,
                        "batch_wait_timeout_s": args.batch_wait_s if mbs > 1 else 0.0,
                        "retriever_max_batch_size": mbs,
                        "retriever_batch_wait_timeout_s": args.retriever_batch_wait_s if mbs > 1 else 0.0,
                        "generator_threads": args.generator_threads, "max_k": max(args.k, 5),
                        "decode": args.decode}
            opts = {"Ingress": {**zero, "max_ongoing_requests": 512, "max_queued_requests": -1},
                    "Retriever": {**zero, "max_ongoing_requests": 128, "max_queued_requests": -1},
                    "Generator": {**zero, "max_ongoing_requests": 128, "max_queued_requests": -1}}
            t = time.time()
            serve.run(build_app(app_args, opts), name="bench", route_prefix="/")
            print(f"[bench] max_batch_size={mbs}: deployed in {time.time() - t:.1f}s", flush=True)
            # the OpenAI route with the batched configuration, each level right after /v1/answer's
            routes = [rt for rt in ("answer", "openai") if rt in args.routes and (rt == "answer" or mbs == batched)]
            for rt in routes:
                run_level(urls[rt], questions, min(8, max(args.clients)), 2, body, rt)            # warm-up
            info_url = f"http://127.0.0.1:{port}/v1/info"
            for c in args.clients:
                for rt in routes:
                    before_all = requests.get(info_url, timeout=30).json()["batching"]
                    cpu0 = cpu_by_process()
                    r = run_level(urls[rt], questions, c, args.requests_per_client, body, rt)
                    cpu1 = cpu_by_process()
                    after_all = requests.get(info_url, timeout=30).json()["batching"]
                    r["cpu_ms_per_request"] = cpu_ms_per_request(cpu0, cpu1, r["ok"] + r["errors"])
                    r["generator_mean_batch_size"] = _mean_batch(before_all, after_all, "generator_replica")
                    r["retriever_mean_batch_size"] = _mean_batch(before_all, after_all, "retriever_replica")
                    r["max_batch_size"] = mbs
                    rows.append(r)
                    print(f"[bench]   {rt:>6} clients={c:>3}  {r['req_per_s']:>7.2f} req/s  p50 {r['p50_ms']:>8.1f} "
                          f"ms  p99 {r['p99_ms']:>8.1f} ms  errors {r['errors']}  "
                          f"mean batch: retriever {r['retriever_mean_batch_size']} generator "
                          f"{r['generator_mean_batch_size']}", flush=True)
                    print(f"[bench]     CPU ms per request: {r['cpu_ms_per_request']}", flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    by = {(r["max_batch_size"], r["clients"]): r for r in rows if r["route"] == "answer"}
    by_openai = {r["clients"]: r for r in rows if r["route"] == "openai"}
    speedups = {c: round(by[(batched, c)]["req_per_s"] / by[(single, c)]["req_per_s"], 2)
                for c in args.clients if (batched, c) in by and (single, c) in by and by[(single, c)]["req_per_s"]}
    print()
    print(f"{'route':>6} {'max_batch':>9} {'clients':>7} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'errors':>6} "
          f"{'gen batch':>9}")
    for r in rows:
        print(f"{r['route']:>6} {r['max_batch_size']:>9} {r['clients']:>7} {r['req_per_s']:>8.2f} {r['p50_ms']:>9.1f} "
              f"{r['p99_ms']:>9.1f} {r['errors']:>6} {r['generator_mean_batch_size'] or 0:>9.2f}")
    for c, s in speedups.items():
        print(f"throughput batched/one-at-a-time at {c} clients: {s}x")
    openai_ratio = {c: round(by_openai[c]["req_per_s"] / by[(batched, c)]["req_per_s"], 3) for c in args.clients
                    if c in by_openai and (batched, c) in by and by[(batched, c)]["req_per_s"]}
    for c, s in openai_ratio.items():
        print(f"throughput /v1/chat/completions / /v1/answer at {c} clients: {s}x")
    over_hf = {}
    if hf:
        print(f"{'HF':>9} {1:>7} {hf['req_per_s']:>8.2f} {hf['p50_ms']:>9.1f} {hf['p99_ms']:>9.1f} {0:>6}"
              f"   (RagSequenceForGeneration.generate, in-process, one at a time)")
        over_hf = {c: round(by[(batched, c)]["req_per_s"] / hf["req_per_s"], 2) for c in args.clients
                   if (batched, c) in by}
        for c, s in over_hf.items():
            print(f"throughput batched/HF one-at-a-time at {c} clients: {s}x")
    total_errors = sum(r["errors"] for r in rows)
    out = {"benchmark": "serve_bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before,
                       "loadavg_after": os.getloadavg()},
           "setup": {"checkpoint": args.checkpoint, "model": model_note, "mode": args.mode, "k": args.k,
                     "num_beams": args.num_beams, "decode": args.decode,
                     "requests_per_client": args.requests_per_client,
                     "batch_wait_timeout_s": args.batch_wait_s,
                     "retriever_batch_wait_timeout_s": args.retriever_batch_wait_s,
                     "generator_threads": args.generator_threads, "hf_threads": args.hf_threads,
                     "serve_env": serve_env,
                     "decoding": {
                         "served": f"pipeline.decoding rag_sequence_decode ({args.decode}): beam search "
                                   f"(num_beams={args.num_beams}) under each of the k passages, all questions of a "
                                   "batch together; " + ("answers rescored under every passage (like HF)"
                                                         if args.decode == "thorough" else
                                                         "p(y|x) summed over the passages whose beams produced y, "
                                                         "no rescoring pass"),
                         "hf": f"RagSequenceForGeneration.generate (num_beams={args.num_beams}): beam search under "
                               "each passage, then every distinct answer rescored under all k passages "
                               "(one extra forward pass); question encoding and FAISS search included"}},
           "rows": rows, "speedup_at_clients": speedups, "errors": total_errors,
           "hf_rag_sequence_generate": hf, "speedup_over_hf_at_clients": over_hf,
           "target": "batched >= 4x one-at-a-time at 32 clients, zero errors",
           "target_met": bool(speedups.get(32, 0) >= 4 and total_errors == 0) if 32 in speedups else None,
           "target_met_over_hf": bool(over_hf.get(32, 0) >= 4 and total_errors == 0) if 32 in over_hf else None,
           "openai_over_answer_at_clients": openai_ratio,
           "openai_target": "POST /v1/chat/completions >= 0.9x POST /v1/answer requests/s at 32 clients, zero errors",
           "openai_target_met": bool(openai_ratio[32] >= 0.9 and total_errors == 0) if 32 in openai_ratio else None}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"results -> {args.output}")
    return 0 if total_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
