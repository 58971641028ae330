// The Inspect view: POST /v1/internals/attention for a typed text (or the chat as the model
// reads it) and draw what comes back: the tokens (their byte-level pieces, as the API gives
// them: a character split over tokens shows as \xNN escapes), the attention weights of one
// layer and head (or the mean over the heads) as a heat map on a canvas, the weights of the
// chosen query token over the tokens it sees, and the next-token distribution as bars.
// Uses chat.js's helpers ($, headers, turns, modelName, tokenLabel, percent, errorMessage,
// showError). Every text goes in with textContent, never as HTML.
"use strict";

const MEAN = "mean"; // the head select's value for the mean over heads
let inspected = null; // the last answer: {tokens, attention, next_tokens}
let query = 0; // the chosen query token (a row of the map)
let shown = null; // the weights drawn: the chosen head's, or the mean over heads

function chatMessages() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns);
  return messages;
}

async function inspect(body) {
  showError("");
  if (modelName) body.model = modelName;
  $("inspect-run").disabled = true;
  try {
    const response = await fetch("/v1/internals/attention", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    inspected = await response.json();
    query = inspected.tokens.length - 1; // the last token: what predicts the next one
    fillSelects();
    drawTokens();
    drawNextTokens();
    drawMap();
  } catch (err) {
    showError("Error: " + err.message);
  } finally {
    $("inspect-run").disabled = false;
  }
}

function options(select, values, labels) {
  const keep = select.value;
  select.replaceChildren(...values.map((value, i) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = labels[i];
    return option;
  }));
  if (values.map(String).includes(keep)) select.value = keep;
}

function fillSelects() {
  const layers = inspected.attention.length;
  const heads = inspected.attention[0].length;
  const layerValues = [...Array(layers).keys()];
  options($("inspect-layer"), layerValues, layerValues.map(String));
  const headValues = [MEAN, ...Array(heads).keys()];
  options($("inspect-head"), headValues, ["mean of " + heads, ...headValues.slice(1).map(String)]);
}

// The T x T weights shown: one head's, or the mean over the layer's heads.
function shownWeights() {
  const layer = inspected.attention[Number($("inspect-layer").value)];
  const head = $("inspect-head").value;
  if (head !== MEAN) return layer[Number(head)];
  const n = inspected.tokens.length;
  return [...Array(n).keys()].map((q) => [...Array(n).keys()].map(
    (k) => layer.reduce((sum, h) => sum + h[q][k], 0) / layer.length));
}

function drawMap() {
  const canvas = $("attention-map");
  const weights = shown = shownWeights();
  const n = weights.length;
  const cell = canvas.width / n;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const edge = (i) => Math.round(i * cell); // whole pixels: no seams between cells
  for (let q = 0; q < n; q++) {
    for (let k = 0; k <= q; k++) {
      // sqrt: a long row spreads its weight thin; linear shading would hide it.
      const shade = Math.sqrt(Math.max(0, weights[q][k]));
      ctx.fillStyle = `rgba(31, 76, 170, ${shade.toFixed(4)})`;
      ctx.fillRect(edge(k), edge(q), edge(k + 1) - edge(k), edge(q + 1) - edge(q));
    }
  }
  ctx.strokeStyle = "#c8412f";
  ctx.lineWidth = 2;
  ctx.strokeRect(1, edge(query) + 1, canvas.width - 2, Math.max(2, edge(query + 1) - edge(query) - 2));
  canvas.dataset.layer = $("inspect-layer").value;
  canvas.dataset.head = $("inspect-head").value;
  canvas.dataset.query = String(query);
  // Each token chip is shaded by the weight the chosen query gives it.
  $("inspect-tokens").querySelectorAll(".itoken").forEach((chip, k) => {
    chip.style.setProperty("--w", k <= query ? Math.sqrt(weights[query][k]).toFixed(4) : "0");
    chip.classList.toggle("query", k === query);
    chip.title = `key ${k}: weight ${k <= query ? weights[query][k].toFixed(4) : "0 (future)"}`;
  });
}

function drawTokens() {
  const chips = inspected.tokens.map((token, i) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "itoken" + (token.special ? " special" : "");
    chip.textContent = tokenLabel(token.text);
    chip.dataset.index = String(i);
    return chip;
  });
  $("inspect-tokens").replaceChildren(...chips);
}

function drawNextTokens() {
  const rows = inspected.next_tokens.map((entry) => {
    const row = document.createElement("div");
    row.className = "alt";
    const label = document.createElement("span");
    label.className = "alt-token";
    label.textContent = tokenLabel(entry.text);
    const bar = document.createElement("span");
    bar.className = "alt-bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * entry.prob).toFixed(2) + "%";
    bar.appendChild(fill);
    const value = document.createElement("span");
    value.className = "alt-p";
    value.textContent = percent(entry.logprob);
    row.append(label, bar, value);
    return row;
  });
  $("next-tokens").replaceChildren(...rows);
}

function selectQuery(index) {
  query = index;
  drawMap();
}

function cellAt(event) {
  const canvas = $("attention-map");
  const box = canvas.getBoundingClientRect();
  const n = inspected.tokens.length;
  const k = Math.floor((event.clientX - box.left) / box.width * n);
  const q = Math.floor((event.clientY - box.top) / box.height * n);
  return [Math.min(Math.max(q, 0), n - 1), Math.min(Math.max(k, 0), n - 1)];
}

function showView(inspecting) {
  $("inspect").hidden = !inspecting;
  $("messages").hidden = inspecting;
  $("composer").hidden = inspecting;
  $("inspect-toggle").setAttribute("aria-pressed", String(inspecting));
  hideTokenInfo();
  if (inspecting) $("inspect-text").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("inspect-toggle").addEventListener("click", () => showView($("inspect").hidden));
  $("inspect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("inspect-text").value;
    if (text) inspect({ text });
  });
  $("inspect-chat").addEventListener("click", () => {
    if (!turns.length) showError("The chat is empty: send a message first, or type a text.");
    else inspect({ messages: chatMessages() });
  });
  $("inspect-layer").addEventListener("change", drawMap);
  $("inspect-head").addEventListener("change", drawMap);
  $("inspect-tokens").addEventListener("click", (event) => {
    const chip = event.target.closest(".itoken");
    if (chip) selectQuery(Number(chip.dataset.index));
  });
  $("attention-map").addEventListener("click", (event) => {
    if (inspected) selectQuery(cellAt(event)[0]);
  });
  $("attention-map").addEventListener("mousemove", (event) => {
    if (!inspected) return;
    const [q, k] = cellAt(event);
    const weight = k <= q ? shown[q][k].toFixed(4) : "0 (future)";
    $("inspect-cell").textContent =
      `${tokenLabel(inspected.tokens[q].text)} \u2192 ${tokenLabel(inspected.tokens[k].text)}: ${weight}`;
  });
});
