// The chat page: talks to this server's /v1/chat/completions, streaming.
// Every text (the model's, the user's, an error's) is put in the page with textContent,
// never as HTML: a reply containing <script> shows those characters and runs nothing.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = []; // {role, content} of the finished turns of this chat
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

async function send(text) {
  showError("");
  turns.push({ role: "user", content: text });
  const userDiv = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.dataset.state = "streaming";
  controller = new AbortController();
  setBusy(true);
  let content = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        content += delta.content;
        reply.textContent = content;
        reply.scrollIntoView({ block: "end" });
      }
    }
    reply.dataset.state = "done";
    turns.push({ role: "assistant", content });
  } catch (err) {
    if (err.name === "AbortError") { // Stop: keep what came, as the next turn's context
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
  loadModelName();
});
