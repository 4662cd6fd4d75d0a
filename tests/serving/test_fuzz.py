"""Acceptance: the server under a fuzzed mix of requests (random Unicode, long, empty, malformed, oversized) sent
together with good ones by concurrent clients on 127.0.0.1, so that they share batches: zero good requests fail and
nothing is a 5xx. Bounded: 150 requests, a fixed seed."""
import json
import random
import threading

import pytest
import requests
from serve_testlib import BODY_LIMIT

pytestmark = pytest.mark.ray

N_REQUESTS = 150
CLIENTS = 12
GOOD_QUESTIONS = ["Where was Varnel Ostrik born?", "Who employed Varnel Ostrik?", "What does Kela Dorn play?",
                  "Where did Kela Dorn grow up?", "What boat does Tamsin Vey sail?"]
WORDS = "where was the person named Varnel Ostrik born and why did Kela Dorn play zumbrel music".split()
# code point ranges to draw random text from: ASCII, Latin-1 and controls, combining marks, Greek/Cyrillic, Hebrew and
# Arabic (right to left), CJK, zero-width and direction formatting, private use, emoji, and noncharacters
RANGES = [(0x0, 0x7F), (0x80, 0xFF), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF), (0x4E00, 0x4FFF),
          (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0xE000, 0xE0FF), (0x1F300, 0x1F6FF),
          (0xFFF0, 0xFFFF), (0x10FFF0, 0x10FFFF)]


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        lo, hi = rng.choice(RANGES)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def make_cases(seed: int = 18) -> list[dict]:
    """(kind, endpoint, body bytes, allowed statuses). 'good' and 'long' must answer (200)."""
    rng = random.Random(seed)

    def case(kind, endpoint, body, allowed):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return {"kind": kind, "endpoint": endpoint, "body": raw, "allowed": allowed}

    def good():
        endpoint = rng.choice(["/v1/answer", "/v1/answer", "/v1/retrieve", "/v1/answer/stream"])
        body = {"question": rng.choice(GOOD_QUESTIONS), "k": rng.randint(1, 5)}
        if endpoint != "/v1/retrieve":
            body.update(mode=rng.choice(["rag-sequence", "rag-token"]), num_beams=rng.randint(1, 2),
                        max_new_tokens=rng.randint(1, 5))
        return case("good", endpoint, body, {200})

    def long():
        n = rng.choice([150, 300])                                        # 150 words ~ 600+ characters
        q = " ".join(rng.choice(WORDS) for _ in range(n))[:2000]
        endpoint = rng.choice(["/v1/answer", "/v1/retrieve", "/v1/answer/stream"])
        body = {"question": q, "k": 3}
        return case("long", endpoint, body if endpoint == "/v1/retrieve" else dict(body, max_new_tokens=3), {200})

    def unicode():
        q = random_text(rng, rng.choice([1, 5, 40, 300, 1999, 2100]))
        return case("unicode", rng.choice(["/v1/answer", "/v1/retrieve"]), {"question": q, "k": 2},
                    {200, 422})                                           # 422: empty after stripping, or too long

    def refused():
        choice = rng.randrange(14)
        if choice == 0:
            return case("surrogate", "/v1/answer", b'{"question": "who \\ud83d", "k": 2}', {422})
        if choice == 1:
            return case("surrogate", "/v1/retrieve", b'{"question": "\\udc00\\udc01 where", "k": 2}', {422})
        if choice == 2:
            return case("empty", rng.choice(["/v1/answer", "/v1/retrieve"]),
                        {"question": rng.choice(["", "  ", "\x00\x00", "\u200b\u200b", "\ufeff\t\n"])}, {422})
        if choice == 3:
            return case("malformed", "/v1/answer", rng.choice([b"{", b"null", b"[]", b'{"question": }',
                                                                 b'"just a string"']), {422})
        if choice == 12:                                # not UTF-8: FastAPI cannot read the body at all
            return case("malformed", "/v1/retrieve", b"\xff\xfe\x00", {400})
        if choice == 4:
            return case("malformed", "/v1/answer", {"question": 123}, {422})
        if choice == 5:
            return case("malformed", "/v1/answer", {"question": "Where?", "k": "five"}, {422})
        if choice == 6:
            return case("malformed", "/v1/answer", {"question": "Where?", "k": 10 ** 30}, {422})
        if choice == 7:
            return case("malformed", "/v1/answer", {"question": "Where?", "mode": "rag-banana"}, {422})
        if choice == 8:
            return case("malformed", "/v1/answer/stream", {"question": "Where?", "num_beams": -1}, {422})
        if choice == 9:
            return case("malformed", "/v1/retrieve", {"question": "Where?", "unexpected": [1, 2]}, {422})
        if choice == 10:
            return case("too long", "/v1/answer", {"question": "x" * 2001}, {422})
        if choice == 11:
            return case("oversized", "/v1/answer", {"question": "y" * (BODY_LIMIT + 1000)}, {413})
        return case("malformed", "/v1/answer", {"question": "Where?", "k": 7}, {422})   # the index holds 6

    makers = [good] * 6 + [long] * 2 + [unicode] * 3 + [refused] * 4
    cases = [rng.choice(makers)() for _ in range(N_REQUESTS)]
    rng.shuffle(cases)
    return cases


def send(base: str, c: dict) -> tuple[int | None, str]:
    """(status, problem or ''). A stream counts as answered only if it ends with `done` and has no `error`."""
    url = f"{base}{c['endpoint']}"
    try:
        with requests.post(url, data=c["body"], headers={"content-type": "application/json"}, timeout=120,
                           stream=c["endpoint"].endswith("stream")) as r:
            if r.status_code != 200 or not c["endpoint"].endswith("stream"):
                return r.status_code, "" if r.status_code < 500 else r.text[:300]
            events = [line[7:] for line in r.iter_lines(decode_unicode=True) if line.startswith("event: ")]
            if not events or events[-1] != "done" or "error" in events:
                return 200, f"stream events {events[-3:]}"
            return 200, ""
    except requests.RequestException as exc:
        return None, repr(exc)


def test_fuzzed_mix_never_fails_a_good_request_and_never_500s(served):
    cases = make_cases()
    kinds = {c["kind"] for c in cases}
    assert {"good", "long", "unicode", "surrogate", "empty", "malformed", "oversized"} <= kinds
    results: list = [None] * len(cases)
    next_case, lock = iter(range(len(cases))), threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_case, None)
            if i is None:
                return
            results[i] = send(served, cases[i])

    def generator_stats():
        return requests.get(f"{served}/v1/info", timeout=10).json()["batching"]["generator_replica"]

    before = generator_stats()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(r is not None for r in results)
    server_errors = [(c["kind"], c["endpoint"], r) for c, r in zip(cases, results) if r[0] is None or r[0] >= 500]
    assert not server_errors, server_errors[:5]
    wrong = [(c["kind"], c["endpoint"], c["body"][:80], r) for c, r in zip(cases, results)
             if r[0] not in c["allowed"] or r[1]]
    assert not wrong, wrong[:5]
    good = [r for c, r in zip(cases, results) if c["kind"] in ("good", "long")]
    assert len(good) >= 50 and all(r == (200, "") for r in good)
    after = generator_stats()
    batches, reqs = after["batches"] - before["batches"], after["requests"] - before["requests"]
    statuses = sorted({r[0] for r in results})
    print(f"\nfuzz: {len(cases)} requests ({len(good)} good or long), statuses {statuses}, "
          f"{sum(r[0] >= 500 for r in results)} 5xx; Generator: {reqs} requests in {batches} batches")
