// The latentrag page: asks POST v1/chat/completions with stream: true, shows the answer as it streams and, from
// the final chunk's `latentrag` field, the passages with their scores, prior p(z|x) and posterior p(z|x,y).
// Plain browser JavaScript, no libraries. URLs are relative so the page works under any Serve route prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
let modelName = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.classList.add("shown");
}

function clearError() {
  $("error").textContent = "";
  $("error").classList.remove("shown");
}

function pct(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%";
}

function bar(cls, value) {
  const outer = document.createElement("div");
  outer.className = "bar " + cls;
  const inner = document.createElement("span");
  inner.style.width = value === null || value === undefined ? "0" : Math.max(0, Math.min(1, value)) * 100 + "%";
  outer.appendChild(inner);
  return outer;
}

function cell(text, cls) {
  const el = document.createElement("span");
  el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

function renderPassages(ext) {
  const list = $("passages");
  list.textContent = "";
  const passages = ext.passages || [];
  const hasPosterior = passages.some((p) => p.posterior !== null && p.posterior !== undefined);
  const key = hasPosterior ? "posterior" : "probability";
  let top = 0;
  passages.forEach((p, i) => { if ((p[key] || 0) > (passages[top][key] || 0)) top = i; });
  passages.forEach((p, i) => {
    const li = document.createElement("li");
    li.className = "passage" + (i === top ? " top" : "");
    li.dataset.id = p.id;
    const head = document.createElement("div");
    head.appendChild(cell(p.title || "(untitled)", "ptitle"));
    head.appendChild(cell(p.id, "pid"));
    li.appendChild(head);
    li.appendChild(cell(p.text, "ptext"));
    li.lastChild.style.display = "block";
    const bars = document.createElement("div");
    bars.className = "bars";
    bars.appendChild(cell("explains the answer"));
    bars.appendChild(bar("posterior", p.posterior));
    bars.appendChild(cell(hasPosterior ? pct(p.posterior) : "n/a", "num posterior"));
    bars.appendChild(cell("retriever p(z|x)"));
    bars.appendChild(bar("prior", p.probability));
    bars.appendChild(cell(pct(p.probability), "num prior"));
    bars.appendChild(cell("retriever score"));
    bars.appendChild(document.createElement("span"));
    bars.appendChild(cell(p.score.toFixed(3), "num score"));
    li.appendChild(bars);
    list.appendChild(li);
  });
  $("passages-hint").textContent = hasPosterior
    ? "The retrieved passages; the highlighted one explains the answer best (posterior p(z|x,y))."
    : "The retrieved passages. RAG-Token may use a different passage for every token, so there is no single " +
      "posterior per passage; the highlighted one has the highest retriever probability p(z|x).";
}

async function loadModel() {
  try {
    const r = await fetch(base + "v1/models");
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const m = body.data[0];
    modelName = m.id;
    const v = $("versions");
    v.textContent = "";
    const code = (text) => { const c = document.createElement("code"); c.textContent = text; return c; };
    v.append("model ", code(m.latentrag.model_version), "  index ", code(m.latentrag.index_version));
    v.dataset.model = m.latentrag.model_version;
    v.dataset.index = m.latentrag.index_version;
  } catch (e) {
    $("versions").textContent = "model unavailable";
    showError("Could not reach the model: " + e.message);
  }
}

// Server-sent events from a fetch body: calls onData(json) for each `data:` line until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function ask(event) {
  event.preventDefault();
  clearError();
  const answer = $("answer");
  const status = $("status");
  answer.textContent = "";
  answer.dataset.pieces = "0";      // how many streamed pieces were appended (the tests read it)
  $("passages").textContent = "";
  const mode = document.querySelector("input[name=mode]:checked").value;
  const k = $("k").value ? Number($("k").value) : null;
  const body = {
    model: modelName || "latentrag",
    messages: [{ role: "user", content: $("question").value }],
    stream: true,
    latentrag: { mode: mode, k: k },
  };
  $("go").disabled = true;
  status.textContent = "retrieving and decoding…";
  status.dataset.state = "running";
  const t0 = performance.now();
  let finished = false;
  try {
    const r = await fetch(base + "v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try {
        const err = await r.json();
        message = (err.error && err.error.message) || err.detail || message;
      } catch (_) { /* not JSON: keep the status line */ }
      throw new Error(message);
    }
    answer.classList.add("streaming");
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        answer.textContent += choice.delta.content;
        answer.dataset.pieces = String(Number(answer.dataset.pieces) + 1);
      }
      if (chunk.latentrag) {
        finished = true;
        renderPassages(chunk.latentrag);
        const ext = chunk.latentrag;
        status.textContent = (ext.mode === "rag-token" ? "RAG-Token" : "RAG-Sequence") +
          " · log p(answer) " + ext.score.toFixed(3) + " · " + Math.round(performance.now() - t0) + " ms";
      }
    });
    if (!finished) throw new Error("the answer stream ended early");
    status.dataset.state = "done";
  } catch (e) {
    showError(e.message);
    status.textContent = "failed";
    status.dataset.state = "error";
  } finally {
    answer.classList.remove("streaming");
    $("go").disabled = false;
  }
}

$("ask").addEventListener("submit", ask);
loadModel();
