"""The web page at `/` in a real browser: Debian's headless Chromium (/usr/bin/chromium; `make test` installs it)
driven by Playwright (pinned in the test extras; it never downloads a browser here). It asks a question, watches
the answer arrive piece by piece, and checks the answer, the passages, the versions and the error messages."""
import os
import shutil
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.ray

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
Q = "Where was Varnel Ostrik born?"
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# Records every text the answer element shows, to see that it streams (grows in steps) rather than appears once.
WATCH = """() => {
  window.answerStates = [];
  new MutationObserver(() => window.answerStates.push(document.getElementById("answer").textContent))
    .observe(document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def page(served):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.set_default_timeout(120_000)
        yield pg
        browser.close()


def _ask(page, question, mode, k):
    page.fill("#question", question)
    page.check(f"input[name=mode][value={mode}]")
    page.fill("#k", str(k))
    page.evaluate(WATCH)
    page.click("#go")
    expect(page.locator("#status[data-state=done], #status[data-state=error]")).to_have_count(1)


def _plain(served, mode, k):
    r = requests.post(f"{served}/v1/chat/completions", timeout=60, json={
        "model": "latentrag", "messages": [{"role": "user", "content": Q}], "latentrag": {"mode": mode, "k": k}})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_streams_the_answer_and_shows_the_passages(page, served, tmp_path):
    page.goto(f"{served}/")
    models = requests.get(f"{served}/v1/models", timeout=10).json()["data"][0]["latentrag"]
    expect(page.locator("#versions")).to_contain_text(models["model_version"])
    expect(page.locator("#versions")).to_contain_text(models["index_version"])

    _ask(page, Q, "rag-sequence", 3)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#error")
    plain = _plain(served, "rag-sequence", 3)
    answer = page.inner_text("#answer")
    assert answer == plain["choices"][0]["message"]["content"]
    # it grew piece by piece: several streamed pieces appended in order (how many renders the browser shows in
    # between depends on how the network coalesces the chunks, so that is not what is asserted)
    assert int(page.get_attribute("#answer", "data-pieces")) >= 2
    states = [s for s in page.evaluate("window.answerStates") if s]
    assert states and states[-1] == answer and all(answer.startswith(s) for s in states)
    items = page.locator("#passages li.passage")
    expect(items).to_have_count(3)
    want = plain["latentrag"]["passages"]
    assert [items.nth(i).get_attribute("data-id") for i in range(3)] == [p["id"] for p in want]
    first = items.nth(0)
    assert first.locator(".ptitle").inner_text() == want[0]["title"] == "Varnel Ostrik"
    assert first.locator(".ptext").inner_text() == want[0]["text"]
    assert first.locator(".num.score").inner_text() == f"{want[0]['score']:.3f}"
    assert first.locator(".num.posterior").inner_text() == f"{100 * want[0]['posterior']:.1f}%"
    assert first.locator(".num.prior").inner_text() == f"{100 * want[0]['probability']:.1f}%"
    best = max(range(3), key=lambda i: want[i]["posterior"])
    assert "top" in items.nth(best).get_attribute("class")
    expect(page.locator("#status")).to_contain_text("RAG-Sequence")
    assert not page.is_visible("#error")
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LATENTRAG_SAVE_SCREENSHOT"):     # refresh the README's picture on purpose, never in CI
        shutil.copy(shot, RESULTS / "page.png")

    _ask(page, Q, "rag-token", 2)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#error")
    assert page.inner_text("#answer") == _plain(served, "rag-token", 2)["choices"][0]["message"]["content"]
    expect(page.locator("#passages li.passage")).to_have_count(2)
    expect(page.locator("#passages li.passage .num.posterior").first).to_have_text("n/a")
    expect(page.locator("#status")).to_contain_text("RAG-Token")


@pytest.mark.parametrize("question, k, needle", [
    ("   ", 2, "empty"),
    (Q, 40, "out of range"),            # the index holds 6 passages
])
def test_page_shows_errors(page, served, question, k, needle):
    page.goto(f"{served}/")
    _ask(page, question, "rag-sequence", k)
    assert page.get_attribute("#status", "data-state") == "error"
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text(needle)
    expect(page.locator("#passages li")).to_have_count(0)


def test_page_assets_are_served_and_nothing_else(served):
    r = requests.get(f"{served}/page/app.js", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "v1/chat/completions" in r.text
    assert requests.get(f"{served}/page/..%2Fapp.py", timeout=10).status_code == 404
    assert requests.get(f"{served}/page/index.html", timeout=10).status_code == 404
    html = requests.get(f"{served}/", timeout=10).text
    assert "http://" not in html and "https://" not in html                   # nothing from elsewhere
