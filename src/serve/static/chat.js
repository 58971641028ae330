// The chat page: talks to this server's /v1/chat/completions, streaming.
// Every text (the model's, the user's, an error's) is put in the page with textContent,
// never as HTML: a reply containing <script> shows those characters and runs nothing.
//
// Token probabilities: every request asks for logprobs with the 5 likeliest alternatives
// (a few hundred bytes per token, nothing next to a forward pass), so a reply is drawn as
// one span per piece of text; hovering (or tapping) a piece shows its tokens' probabilities
// and alternatives as a bar chart, and the "Probabilities" toggle colours every piece by
// its probability (red unlikely, green likely).
"use strict";

const $ = (id) => document.getElementById(id);
const turns = []; // {role, content} of the finished turns of this chat
const TOP_LOGPROBS = 5;
const pieceTokens = new WeakMap(); // a reply's text span -> the logprobs entries of its tokens
let controller = null; // AbortController of the reply being streamed
let modelName = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function numberSetting(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns);
  const body = {
    messages,
    stream: true,
    temperature: numberSetting("temperature"),
    top_p: numberSetting("top-p"),
    max_tokens: numberSetting("max-tokens"),
    logprobs: true,
    top_logprobs: TOP_LOGPROBS,
  };
  if (modelName) body.model = modelName;
  return body;
}

// Yields each JSON object of a server-sent-events stream (stops at "data: [DONE]").
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      const hint = body.error.code === "context_length_exceeded"
        ? " (Start a new chat, or lower Max tokens in Settings.)" : "";
      return body.error.message + hint;
    }
  } catch (_) { /* not JSON */ }
  return "the server answered " + response.status + " " + response.statusText;
}

// Draws a reply's tokens as spans of text. A character split over several byte tokens
// (an emoji) becomes one span holding all of them: the bytes are decoded as they come.
class TokenView {
  constructor(element) {
    this.element = element;
    this.decoder = new TextDecoder();
    this.waiting = []; // tokens whose bytes do not yet make a whole character
    this.text = "";
  }

  add(entries) {
    for (const entry of entries) {
      this.waiting.push(entry);
      const bytes = new Uint8Array(entry.bytes || []);
      this.piece(this.decoder.decode(bytes, { stream: true }));
    }
  }

  finish() { this.piece(this.decoder.decode(), true); }

  piece(text, last = false) {
    if (!text && !(last && this.waiting.length)) return;
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = text;
    const logprob = this.waiting.reduce((sum, e) => sum + e.logprob, 0);
    span.style.setProperty("--p", Math.exp(logprob).toFixed(4));
    pieceTokens.set(span, this.waiting);
    this.waiting = [];
    this.element.appendChild(span);
    this.text += text;
  }
}

function percent(logprob) {
  const p = 100 * Math.exp(logprob);
  return p < 0.1 ? "<0.1%" : p.toFixed(1) + "%";
}

// A token as a label: spaces and line breaks made visible.
function tokenLabel(token) {
  return token.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function showTokenInfo(span) {
  const info = $("token-info");
  const rows = [];
  for (const entry of pieceTokens.get(span)) {
    const title = document.createElement("div");
    title.className = "token-title";
    title.textContent = tokenLabel(entry.token) + "  " + percent(entry.logprob);
    rows.push(title);
    for (const alt of entry.top_logprobs) {
      const row = document.createElement("div");
      row.className = "alt" + (alt.token === entry.token ? " chosen" : "");
      const label = document.createElement("span");
      label.className = "alt-token";
      label.textContent = tokenLabel(alt.token);
      const bar = document.createElement("span");
      bar.className = "alt-bar";
      const fill = document.createElement("span");
      fill.style.width = (100 * Math.exp(alt.logprob)).toFixed(2) + "%";
      bar.appendChild(fill);
      const value = document.createElement("span");
      value.className = "alt-p";
      value.textContent = percent(alt.logprob);
      row.append(label, bar, value);
      rows.push(row);
    }
  }
  info.replaceChildren(...rows);
  info.hidden = false;
  const box = span.getBoundingClientRect();
  const width = info.offsetWidth;
  info.style.left = Math.max(4, Math.min(box.left, window.innerWidth - width - 4)) + "px";
  const below = box.bottom + 6;
  const fits = below + info.offsetHeight < window.innerHeight;
  info.style.top = (fits ? below : Math.max(4, box.top - info.offsetHeight - 6)) + "px";
}

function hideTokenInfo() { $("token-info").hidden = true; }

async function send(text) {
  showError("");
  turns.push({ role: "user", content: text });
  const userDiv = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.dataset.state = "streaming";
  controller = new AbortController();
  setBusy(true);
  let content = "";
  const view = new TokenView(reply);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices.length ? chunk.choices[0] : {};
      const delta = choice.delta || {};
      if (choice.logprobs && choice.logprobs.content) view.add(choice.logprobs.content);
      if (delta.content) {
        content += delta.content;
        reply.scrollIntoView({ block: "end" });
      }
    }
    view.finish();
    // The tokens' text is the reply's, unless a stop ended it inside a token: then plain text.
    if (view.text !== content) reply.textContent = content;
    reply.dataset.state = "done";
    turns.push({ role: "assistant", content });
  } catch (err) {
    if (err.name === "AbortError") { // Stop: keep what came, as the next turn's context
      view.finish();
      if (view.text !== content) reply.textContent = content;
      reply.dataset.state = "stopped";
      turns.push({ role: "assistant", content });
    } else { // refused or failed: take the message back so it can be edited and resent
      turns.pop();
      userDiv.remove();
      reply.remove();
      $("input").value = text;
      showError("Error: " + err.message);
    }
  } finally {
    controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function newChat() {
  if (controller) controller.abort();
  turns.length = 0;
  hideTokenInfo();
  $("messages").replaceChildren();
  showError("");
  $("input").focus();
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) return;
    const body = await response.json();
    modelName = body.data[0].id;
    $("model-name").textContent = modelName;
  } catch (_) { /* the first message will show what is wrong */ }
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("api-key").addEventListener("change", loadModelName);
  $("probabilities").addEventListener("click", () => {
    const on = $("messages").classList.toggle("coloured");
    $("probabilities").setAttribute("aria-pressed", String(on));
  });
  // Hover shows a piece's probabilities; a tap (click) shows them too, a tap elsewhere hides.
  $("messages").addEventListener("mouseover", (event) => {
    const span = event.target.closest(".token");
    if (span && pieceTokens.has(span)) showTokenInfo(span);
  });
  $("messages").addEventListener("mouseout", (event) => {
    if (event.target.closest(".token")) hideTokenInfo();
  });
  document.addEventListener("click", (event) => {
    const span = event.target.closest && event.target.closest(".token");
    if (span && pieceTokens.has(span)) showTokenInfo(span);
    else hideTokenInfo();
  });
  loadModelName();
});
