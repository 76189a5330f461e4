// medlite serve: the page. Plain JavaScript, no build step, nothing loaded from elsewhere.
// Text from the server is always inserted with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, frameTouched: false, busy: false };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function field(label, value) {
  const span = el("span");
  span.append(el("b", label + " "), value instanceof Node ? value : el("span", value));
  return span;
}

function renderInfo(info) {
  const box = $("model");
  box.replaceChildren();
  const a = info.artifact;
  box.append(field("model", info.model || "?"));
  if (a) {
    box.append(field("recipe", `${a.recipe} ${a.recipe_version || ""}`.trim()), field("version", a.version),
               field("status", el("span", a.status, "badge " + a.status)));
    if (a.target) box.append(field("target", a.target));
  } else {
    box.append(field("artifact", el("span", "bare ONNX export: no manifest, no hash check, no gates", "bad")));
  }
  box.append(field("precision", info.precision));
  const providers = [...new Set(Object.values(info.providers || {}).flat())].join(", ");
  box.append(field("runs on", providers || "?"), field("image", `${info.image_size} px, ${info.num_image_tokens} tokens`));
  renderGates(a);
  const sel = $("window");
  sel.replaceChildren(...info.windows.map((w) => { const o = el("option", w.label); o.value = w.key; return o; }));
}

function renderGates(a) {
  const box = $("gates");
  box.replaceChildren();
  if (!a) { box.textContent = "no manifest: this folder was not built by medlite build"; return; }
  if (!a.gates.length) { box.textContent = "this recipe has no check stage: no accuracy gates were run"; return; }
  const table = el("table");
  for (const g of a.gates) {
    const tr = el("tr");
    const mark = g.passed === true ? ["✓ passed", "ok"] : g.passed === false ? ["✗ failed", "bad"] : ["– not gated", "muted"];
    tr.append(el("td", mark[0], mark[1]), el("td", g.text));
    table.append(tr);
  }
  const ev = a.evaluation || {};
  box.append(table, el("div", `on ${ev.dataset || "?"} (${ev.split || "?"} split, ${ev.questions ?? "?"} questions)`, "muted"));
}

function formData(extra) {
  const fd = new FormData();
  fd.append("file", state.file, state.file.name);
  if (state.frameTouched && $("frame").value !== "") fd.append("frame", $("frame").value);
  fd.append("window", $("window").value || "auto");
  for (const [k, v] of Object.entries(extra || {})) fd.append(k, v);
  return fd;
}

async function errorText(response) {
  try { return (await response.json()).error || response.statusText; } catch (e) { return response.statusText; }
}

async function preview() {
  if (!state.file) return;
  showError("");
  $("ask").disabled = true;
  const r = await fetch("/api/preview", { method: "POST", body: formData() });
  if (!r.ok) {
    showError(await errorText(r));
    $("model-view").removeAttribute("src"); $("windowed").removeAttribute("src");
    return;
  }
  const p = await r.json();
  $("model-view").src = p.model_view;
  $("windowed").src = p.windowed;
  $("model-caption").textContent = `as the model sees it (${p.model_size} × ${p.model_size} px input)`;
  $("windowed-caption").textContent = `same window, ${p.width} × ${p.height} px`;
  const frame = $("frame");
  frame.max = p.n_frames - 1;
  frame.value = p.frame;
  frame.disabled = p.n_frames <= 1;
  $("frames").textContent = `${p.kind}${p.modality && p.modality !== "unknown" ? " " + p.modality : ""}, ` +
    `${p.n_frames} ${p.kind === "nifti" ? "slice(s)" : "frame(s)"}`;
  const notes = $("notes");
  notes.replaceChildren(...p.notes.map((n) => el("li", n)), ...p.warnings.map((w) => el("li", "warning: " + w, "warn")));
  $("ask").disabled = state.busy;
}

function parseEvent(raw) {
  let event = "message", data = "";
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return { event, data: data ? JSON.parse(data) : {} };
}

function stats(d) {
  const parts = [`${d.latency_s.toFixed(2)} s`];
  if (d.tokens != null) parts.push(`${d.tokens} token${d.tokens === 1 ? "" : "s"}`);
  if (d.tokens_per_s != null) parts.push(`${d.tokens_per_s.toFixed(1)} tokens/s`);
  if (d.first_text_s != null) parts.push(`first text after ${d.first_text_s.toFixed(2)} s`);
  // a follow-up on the same scan reuses the image and prompt prefix (the session's KV cache)
  if (d.cached_tokens) parts.push(`prefilled ${d.prefill_tokens} new tokens, ${d.cached_tokens} reused`);
  parts.push(`waited ${d.waited_s.toFixed(2)} s in the queue`);
  return parts.join(" · ");
}

function handle(item, { event, data }) {
  const a = item.querySelector(".a"), s = item.querySelector(".stats");
  if (event === "queued") s.textContent = data.position > 0 ? `queued behind ${data.position} request(s)…` : "starting…";
  else if (event === "start") s.textContent = "answering…";
  else if (event === "token") { a.textContent += data.text; item.dataset.pieces = Number(item.dataset.pieces || 0) + 1; }
  else if (event === "done") { a.textContent = data.answer; s.textContent = stats(data); item.dataset.state = "done"; }
  else if (event === "error") { s.textContent = data.message; item.dataset.state = "error"; }
}

async function ask(ev) {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!state.file || !question || state.busy) return;
  showError("");
  state.busy = true;
  $("ask").disabled = true;
  const item = el("li", null, "answer");
  item.dataset.state = "streaming";
  item.append(el("div", question, "q"), el("div", "", "a"), el("div", "sending…", "stats"));
  $("answers").prepend(item);
  try {
    const r = await fetch("/api/ask", { method: "POST", body: formData({ question }) });
    if (!r.ok) {
      const retry = r.headers.get("Retry-After");
      const msg = await errorText(r);
      item.dataset.state = "error";
      item.querySelector(".stats").textContent = r.status === 503 ? `${msg} (Retry-After ${retry} s)` : msg;
      return;
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) { handle(item, parseEvent(buf.slice(0, i))); buf = buf.slice(i + 2); }
    }
    if (item.dataset.state === "streaming") { item.dataset.state = "error"; item.querySelector(".stats").textContent = "the connection closed early"; }
  } catch (e) {
    item.dataset.state = "error";
    item.querySelector(".stats").textContent = "network error: " + e.message;
  } finally {
    state.busy = false;
    $("ask").disabled = !state.file;
  }
}

window.addEventListener("DOMContentLoaded", async () => {
  $("file").addEventListener("change", () => {
    state.file = $("file").files[0] || null;
    state.frameTouched = false;
    $("frame").value = "";
    preview();
  });
  $("frame").addEventListener("change", () => { state.frameTouched = true; preview(); });
  $("window").addEventListener("change", preview);
  $("ask-form").addEventListener("submit", ask);
  try {
    const r = await fetch("/api/info");
    renderInfo(await r.json());
  } catch (e) {
    showError("cannot reach the server: " + e.message);
  }
});
