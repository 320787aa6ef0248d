// Sluice chat: a browser client for the gateway's WebSocket API (/v1/ws).
//
// Protocol (JSON text frames; several requests may share one socket, told apart by id):
//   client -> {type: "request", id, body: <chat completions body>} | {type: "cancel", id}
//   server -> {type: "chunk", id, chunk: <chat.completion.chunk>} ...
//             then {type: "done", id, finish_reason, usage} ("cancelled" after a cancel)
//             or {type: "error", id | null, error: {message, type, code}}
// This page runs one answer at a time, and sends the whole conversation with each request.

import { Connection } from "./connection.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const el = {
  status: $("conn-status"),
  model: $("model-name"),
  newChat: $("new-chat"),
  settingsToggle: $("settings-toggle"),
  system: $("system-prompt"),
  temperature: $("temperature"),
  temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"),
  schema: $("json-schema"),
  schemaError: $("json-schema-error"),
  apiKey: $("api-key"),
  messages: $("messages"),
  emptyHint: $("empty-hint"),
  ttft: $("stat-ttft"),
  tps: $("stat-tps"),
  tokens: $("stat-tokens"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
};

// ---------------------------------------------------------------- settings (kept in localStorage)

const STORE = "sluice.";
const PERSISTED = { system: "system", temperature: "temperature", maxTokens: "max_tokens", schema: "json_schema" };

function storageGet(key) {
  try { return localStorage.getItem(STORE + key); } catch { return null; } // storage can be disabled
}
function storageSet(key, value) {
  try {
    if (value) localStorage.setItem(STORE + key, value); else localStorage.removeItem(STORE + key);
  } catch { /* private mode or disabled storage: settings just do not persist */ }
}

function loadSettings() {
  for (const [field, key] of Object.entries(PERSISTED)) {
    const saved = storageGet(key);
    if (saved !== null) el[field].value = saved;
    el[field].addEventListener("input", () => storageSet(key, el[field].value));
  }
  // ?api_key= in the page URL wins over the stored key; it is then stored and taken out of the
  // address bar, so it does not linger in history, bookmarks or screen shares.
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("api_key");
  if (fromUrl) {
    storageSet("api_key", fromUrl);
    url.searchParams.delete("api_key");
    history.replaceState(null, "", url);
  }
  el.apiKey.value = fromUrl || storageGet("api_key") || "";
  el.apiKey.addEventListener("change", () => {
    storageSet("api_key", el.apiKey.value.trim());
    modelFetch = null;
    conn.reconnectNow(); // the key is checked when the socket opens
  });
  el.temperatureValue.textContent = Number(el.temperature.value).toFixed(2);
  el.temperature.addEventListener("input", () => {
    el.temperatureValue.textContent = Number(el.temperature.value).toFixed(2);
  });
  el.schema.addEventListener("input", () => checkSchema());
  checkSchema();
}

// The parsed schema, null when the field is empty, or undefined (with the message shown) when it
// is not valid JSON.
function checkSchema() {
  const text = el.schema.value.trim();
  let message = "";
  let schema = null;
  if (text) {
    try {
      schema = JSON.parse(text);
      if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
        message = "The JSON schema must be a JSON object, e.g. {\"type\": \"object\"}.";
      }
    } catch (err) {
      message = `The JSON schema is not valid JSON: ${err.message}`;
    }
  }
  el.schemaError.textContent = message;
  el.schema.setAttribute("aria-invalid", message ? "true" : "false");
  return message ? undefined : schema;
}

function setSettingsOpen(open) {
  document.body.classList.toggle("settings-open", open);
  el.settingsToggle.setAttribute("aria-expanded", String(open));
}

// ---------------------------------------------------------------- the socket's state

function showConnState(state, info = {}) {
  el.status.dataset.state = state;
  // On a phone only the coloured dot shows; the title keeps the words reachable.
  queueMicrotask(() => { el.status.title = el.status.textContent; });
  if (state === "open") {
    el.apiKey.setAttribute("aria-invalid", "false");
    el.status.textContent = "Connected";
    modelFetch = null; // the server may have restarted with another model: ask again
    fetchModel();
  } else if (state === "connecting") {
    el.status.textContent = "Connecting…";
  } else {
    el.status.textContent = state === "refused"
      ? "API key refused: enter it in Settings"
      : `Disconnected; retrying in ${Math.ceil(info.retryInMs / 1000)} s`;
    el.apiKey.setAttribute("aria-invalid", state === "refused" ? "true" : "false");
    if (state === "refused") setSettingsOpen(true);
    if (current) finishTurn(current, "error", "The connection was lost before the answer finished.");
  }
}

// ---------------------------------------------------------------- the model's name

// A chat completions body names its model, so the page asks the server which one it serves.
let modelName = null;
let modelFetch = null; // the request in flight (or done), shared by everyone who asks

function fetchModel() {
  const key = el.apiKey.value.trim();
  modelFetch ??= fetch("/v1/models", { headers: key ? { Authorization: `Bearer ${key}` } : {} })
    .then((response) => (response.ok ? response.json() : null))
    .then((list) => list?.data?.[0]?.id ?? null)
    .catch(() => null)
    .then((name) => {
      if (name) {
        modelName = name;
        el.model.textContent = name;
      } else {
        modelFetch = null; // ask again next time; until then, the last name known (if any) stands
      }
      return modelName;
    });
  return modelFetch;
}

// ---------------------------------------------------------------- the conversation

const conversation = []; // {role, content}: what the next request sends after the system prompt
let current = null; // the answer being streamed, if any
let statsTurn = null; // the answer whose numbers the stats line shows
let nextId = 0;

function newId() {
  // crypto.randomUUID exists only in secure contexts (https, localhost); a plain-http LAN address
  // is not one, so this does not rely on it.
  return `ui-${Date.now().toString(36)}-${(nextId++).toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

function messageBubble(role) {
  el.emptyHint.hidden = true;
  const article = document.createElement("article");
  article.className = `msg msg-${role}`;
  article.dataset.testid = `${role}-message`;
  article.dataset.role = role;
  const label = document.createElement("h2");
  label.className = "msg-role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "msg-body";
  body.dataset.testid = "message-body";
  const meta = document.createElement("p");
  meta.className = "msg-meta";
  meta.dataset.testid = "message-meta";
  article.append(label, body, meta);
  const stick = isNearBottom();
  el.messages.append(article);
  if (stick) scrollToBottom();
  return article;
}

function isNearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}
function scrollToBottom() { el.messages.scrollTop = el.messages.scrollHeight; }

function showNotice(text) {
  // A server error that belongs to no request (e.g. a malformed frame, or a refused key).
  const bubble = messageBubble("assistant");
  bubble.dataset.state = "error";
  bubble.querySelector(".msg-meta").textContent = text;
  bubble.querySelector(".msg-meta").setAttribute("role", "alert");
}

function buildBody(model) {
  const schema = checkSchema();
  if (schema === undefined) return null;
  const messages = [];
  const system = el.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = { messages, temperature: Number(el.temperature.value) };
  if (model) body.model = model; // without one, the server's error frame will say so
  const maxTokens = parseInt(el.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "ui", schema } };
  return body;
}

async function sendMessage() {
  const text = el.prompt.value;
  if (current || !text.trim()) return;
  if (checkSchema() === undefined) {
    setSettingsOpen(true);
    el.schema.focus();
    return;
  }
  conversation.push({ role: "user", content: text });
  const userBubble = messageBubble("user");
  userBubble.querySelector(".msg-body").innerHTML = renderMarkdown(text);
  el.prompt.value = "";
  autoGrow();

  const turn = {
    id: newId(), userText: text, userBubble, bubble: messageBubble("assistant"),
    text: "", started: performance.now(), firstAt: null, lastAt: null, pieces: 0, usage: null,
    renderPending: false, stopTimer: null,
  };
  turn.bubble.dataset.state = "waiting";
  turn.bubble.setAttribute("aria-busy", "true");
  turn.bubble.querySelector(".msg-meta").textContent = "Waiting for the first token…";
  current = turn;
  statsTurn = turn;
  setBusy(true);
  resetStats();
  const model = await fetchModel();
  if (turn.finished || turn.stopping) { // stopped, or a new chat, while the model's name was on its way
    finishTurn(turn, "cancelled");
    return;
  }
  if (conn.send({ type: "request", id: turn.id, body: buildBody(model) })) {
    turn.sent = true;
  } else if (conn.refused) {
    finishTurn(turn, "error", "The server refused the API key: enter the right one in Settings, then try again.");
    setSettingsOpen(true);
    el.apiKey.focus();
  } else {
    finishTurn(turn, "error", "Not connected to the server; it will reconnect, then try again.");
  }
}

function stopAnswer() {
  const turn = current;
  if (!turn || turn.stopping) return;
  turn.stopping = true;
  // aria-disabled, not disabled: a disabled button drops keyboard focus (to <body>).
  el.stop.setAttribute("aria-disabled", "true");
  turn.bubble.querySelector(".msg-meta").textContent = "Stopping…";
  if (!conn.send({ type: "cancel", id: turn.id })) {
    finishTurn(turn, "cancelled");
    return;
  }
  // The server answers a cancel with done/"cancelled"; if that never comes, do not hang the UI.
  turn.stopTimer = setTimeout(() => finishTurn(turn, "cancelled"), 5000);
}

function newChat() {
  if (current) {
    conn.send({ type: "cancel", id: current.id });
    current.discarded = true;
    finishTurn(current, "cancelled");
  }
  conversation.length = 0;
  statsTurn = null; // a render of the old answer still queued must not bring its numbers back
  el.messages.querySelectorAll(".msg").forEach((node) => node.remove());
  el.emptyHint.hidden = false;
  resetStats();
  el.prompt.focus();
}

function onFrame(frame) {
  if (frame.type === "error" && (frame.id === null || frame.id === undefined)) {
    // A refused key is shown by the status line (the socket closes with 1008 next), not the chat.
    if (frame.error?.code === "invalid_api_key") return;
    // This page sends one request at a time and no other frame that can fail, so an error naming no
    // request while ours waits for its first chunk is that request refused unread (e.g. a frame over
    // the server's size limit): it ends that answer, which would otherwise wait forever.
    if (current?.sent && current.firstAt === null) {
      finishTurn(current, "error", errorText(frame.error));
      return;
    }
    showNotice(`Server error: ${frame.error?.message ?? "unknown error"}`);
    return;
  }
  const turn = current;
  if (!turn || frame.id !== turn.id) return; // an answer we already gave up on
  if (frame.type === "chunk") {
    const choice = frame.chunk?.choices?.[0];
    const piece = choice?.delta?.content;
    if (piece) {
      const now = performance.now();
      turn.firstAt ??= now;
      turn.lastAt = now;
      turn.pieces++;
      turn.text += piece;
      scheduleRender(turn);
    }
  } else if (frame.type === "done") {
    turn.usage = frame.usage ?? null;
    finishTurn(turn, frame.finish_reason ?? "stop");
  } else if (frame.type === "error") {
    finishTurn(turn, "error", errorText(frame.error));
  }
}

function errorText(err) {
  const code = err?.code ? ` (${err.code})` : "";
  return `Error${code}: ${err?.message ?? "the server could not answer"}`;
}

// Re-rendering the markdown on every token would be wasted work; once per frame is enough.
function scheduleRender(turn) {
  if (turn.renderPending) return;
  turn.renderPending = true;
  requestAnimationFrame(() => {
    turn.renderPending = false;
    renderTurn(turn);
  });
}

function renderTurn(turn) {
  const stick = isNearBottom();
  turn.bubble.querySelector(".msg-body").innerHTML = renderMarkdown(turn.text);
  if (turn.bubble.dataset.state === "waiting") {
    turn.bubble.dataset.state = "streaming";
    if (!turn.stopping) turn.bubble.querySelector(".msg-meta").textContent = "";
  }
  showStats(turn);
  if (stick) scrollToBottom();
}

const FINISH_TEXT = {
  stop: "", length: "Stopped at the max-tokens limit", cancelled: "Stopped", abort: "Aborted by the server",
};

function finishTurn(turn, reason, errorMessage) {
  if (turn.finished) return;
  turn.finished = true;
  clearTimeout(turn.stopTimer);
  if (current === turn) current = null;
  renderTurn(turn);
  const bubble = turn.bubble;
  bubble.removeAttribute("aria-busy");
  bubble.dataset.finishReason = reason;
  bubble.dataset.state = reason === "error" ? "error" : reason === "cancelled" ? "stopped" : "done";
  const meta = bubble.querySelector(".msg-meta");
  if (errorMessage) {
    meta.textContent = errorMessage;
    meta.setAttribute("role", "alert");
  } else {
    meta.textContent = FINISH_TEXT[reason] ?? `Finished: ${reason}`;
  }

  if (reason !== "error" && turn.text) {
    conversation.push({ role: "assistant", content: turn.text });
  } else {
    // Nothing was answered: take the question out of the conversation, and hand it back to the
    // message box (if that is empty) so it can be retried after fixing whatever went wrong.
    // (One answer runs at a time, so the question is still the last message.)
    if (conversation.at(-1)?.role === "user") conversation.pop();
    turn.userBubble.dataset.excluded = "true";
    turn.userBubble.querySelector(".msg-meta").textContent = "Got no answer, so it is left out of the conversation";
    if (!el.prompt.value && !turn.discarded) {
      el.prompt.value = turn.userText;
      autoGrow();
    }
  }
  setBusy(false);
}

function setBusy(busy) {
  // Keep the keyboard user where they were: Stop takes Send's place and focus follows it back.
  // Read the focus first: hiding the focused button moves focus to <body> at once.
  const focused = document.activeElement;
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.stop.removeAttribute("aria-disabled");
  if (busy && focused === el.send) el.stop.focus();
  if (!busy && focused === el.stop) el.prompt.focus();
}

// ---------------------------------------------------------------- stats

function resetStats() {
  el.ttft.textContent = "–";
  el.tps.textContent = "–";
  el.tokens.textContent = "–";
}

function showStats(turn) {
  if (turn !== statsTurn || turn.firstAt === null) return;
  el.ttft.textContent = formatMs(turn.firstAt - turn.started);
  // While streaming, a content chunk stands for a token (the server may merge a few, e.g. a
  // multi-byte character); the final count comes from the server's usage.
  const tokens = turn.usage?.completion_tokens ?? turn.pieces;
  el.tokens.textContent = String(tokens);
  // Decode speed: tokens after the first, over the time since the first. A single token has none.
  const span = (turn.finished ? turn.lastAt : performance.now()) - turn.firstAt;
  el.tps.textContent = tokens > 1 && span > 0 ? ((tokens - 1) / (span / 1000)).toFixed(1) : "–";
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// ---------------------------------------------------------------- keyboard and wiring

function autoGrow() {
  el.prompt.style.height = "auto";
  el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, window.innerHeight * 0.4)}px`;
}

const conn = new Connection(() => el.apiKey.value.trim(), onFrame, showConnState);

el.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
el.prompt.addEventListener("keydown", (event) => {
  // isComposing: Enter that confirms an IME composition (Chinese, Japanese, ...) must not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
el.prompt.addEventListener("input", autoGrow);
el.stop.addEventListener("click", stopAnswer);
el.newChat.addEventListener("click", newChat);
el.settingsToggle.addEventListener("click", () => setSettingsOpen(!document.body.classList.contains("settings-open")));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current) {
    event.preventDefault();
    stopAnswer();
  }
});
window.addEventListener("online", () => { if (!conn.isOpen) conn.reconnectNow(); });

loadSettings();
setSettingsOpen(window.matchMedia("(min-width: 900px)").matches);
conn.connect();
el.prompt.focus();

// For tests and the curious: the renderer, and a read-only view of the conversation.
window.sluice = { renderMarkdown, conversation: () => structuredClone(conversation) };
