// The chat page: a client of the conversations API (docs/conversations-api.md). Plain DOM, no
// framework, no build step. Model output goes through renderMarkdown, which only ever sets text.

import { renderMarkdown } from "./markdown.js";

const API_KEY = "chatserve.apiKey";
const LAST_CONVERSATION = "chatserve.lastConversation";
const LIST_REFRESH_MS = 15000;

const $ = (id) => document.getElementById(id);

const state = {
  conversations: [], // the sidebar: conversations without messages, most recent first
  current: null, // the open conversation, with the messages of its current branch
  streams: new Map(), // conversation id -> the answer streaming into it
  openReasoning: new Set(), // assistant message ids whose reasoning the user expanded
  editing: null, // id of the user message being edited in place
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---------------------------------------------------------------- HTTP

function headers(json) {
  const result = {};
  if (json) result["Content-Type"] = "application/json";
  const key = localStorage.getItem(API_KEY);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || (typeof body?.detail === "string" ? body.detail : message);
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) {
    showBanner("This server needs an API key: enter it in Settings.");
    openSettings();
  }
  return new ApiError(response.status, message);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

const conversationPath = (id) => `/v1/conversations/${encodeURIComponent(id)}`;
const messagePath = (id, messageId) => `${conversationPath(id)}/messages/${encodeURIComponent(messageId)}`;

/** Calls onEvent(json) for each `data:` event of a server-sent event stream, until `[DONE]`. */
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let finished = false;
  const line = (text) => {
    if (text === "") {
      if (data.length) {
        const payload = data.join("\n");
        data = [];
        if (payload.trim() === "[DONE]") finished = true;
        else onEvent(JSON.parse(payload));
      }
    } else if (text.startsWith("data:")) {
      data.push(text.slice(5).replace(/^ /, ""));
    } // comments (":") and other fields are not used by this API
  };
  while (!finished) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while (!finished && (end = buffer.indexOf("\n")) !== -1) {
      line(buffer.slice(0, end).replace(/\r$/, ""));
      buffer = buffer.slice(end + 1);
    }
  }
  if (!finished) {
    if (buffer) line(buffer);
    line("");
  }
  reader.cancel().catch(() => {});
}

// ---------------------------------------------------------------- conversations

async function refreshList() {
  try {
    const list = await api("GET", "/v1/conversations");
    state.conversations = list.data;
    renderSidebar();
  } catch (error) {
    if (error.status !== 401) showBanner(`Could not list conversations: ${error.message}`);
  }
}

function remember(conversation) {
  const index = state.conversations.findIndex((c) => c.id === conversation.id);
  const summary = { ...conversation };
  delete summary.messages;
  if (index === -1) state.conversations.unshift(summary);
  else state.conversations[index] = summary;
}

async function openConversation(id) {
  if (state.current?.id === id && state.current.messages) return;
  state.editing = null;
  const stream = state.streams.get(id);
  if (stream) {
    state.current = stream.conversation; // live: its answer is still streaming in
  } else {
    try {
      state.current = await api("GET", conversationPath(id));
    } catch (error) {
      showBanner(`Could not open the conversation: ${error.message}`);
      if (error.status === 404) await refreshList();
      return;
    }
  }
  localStorage.setItem(LAST_CONVERSATION, id);
  remember(state.current);
  hideBanner();
  renderSidebar();
  renderConversation({ scroll: true });
}

async function newConversation(extra = {}) {
  const conversation = await api("POST", "/v1/conversations", extra);
  conversation.messages ??= [];
  state.current = conversation;
  state.editing = null;
  localStorage.setItem(LAST_CONVERSATION, conversation.id);
  remember(conversation);
  renderSidebar();
  renderConversation();
  return conversation;
}

async function onNewChat() {
  if (state.current && state.current.messages?.length === 0 && state.current.title === "New chat") {
    $("input").focus(); // already on a new, empty conversation
    return;
  }
  try {
    await newConversation();
    hideBanner();
    $("input").focus();
  } catch (error) {
    showBanner(`Could not start a conversation: ${error.message}`);
  }
}

async function renameConversation(title) {
  const conversation = state.current;
  if (!conversation || !title.trim() || title === conversation.title) return;
  try {
    const updated = await api("PATCH", conversationPath(conversation.id), { title: title.trim() });
    Object.assign(conversation, updated, { messages: conversation.messages });
    remember(conversation);
    renderSidebar();
    renderHeader();
  } catch (error) {
    showBanner(`Could not rename: ${error.message}`);
  }
}

async function deleteConversation() {
  const conversation = state.current;
  if (!conversation || !confirm(`Delete "${conversation.title}"? This cannot be undone.`)) return;
  state.streams.get(conversation.id)?.controller.abort();
  try {
    await api("DELETE", conversationPath(conversation.id));
  } catch (error) {
    if (error.status !== 404) {
      showBanner(`Could not delete: ${error.message}`);
      return;
    }
  }
  state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
  state.current = null;
  localStorage.removeItem(LAST_CONVERSATION);
  const next = state.conversations[0];
  if (next) await openConversation(next.id);
  else {
    renderSidebar();
    renderConversation();
  }
}

async function switchBranch(messageId) {
  const conversation = state.current;
  if (!conversation || state.streams.has(conversation.id)) return;
  try {
    const updated = await api("POST", `${conversationPath(conversation.id)}/switch`, { message_id: messageId });
    if (state.current !== conversation) return;
    state.current = updated;
    state.editing = null;
    remember(updated);
    renderSidebar();
    renderConversation();
  } catch (error) {
    showBanner(`Could not switch branch: ${error.message}`);
  }
}

// ---------------------------------------------------------------- answers

/** Put a message the stream announced into the branch on show: under its parent, replacing
 * whatever the branch held below that parent (an edit or regenerate starts a new branch). */
function placeMessage(conversation, message) {
  const messages = conversation.messages;
  const existing = messages.findIndex((m) => m.id === message.id);
  if (existing !== -1) {
    messages[existing] = message;
    return;
  }
  if (message.parent_id == null) messages.length = 0;
  else {
    const parent = messages.findIndex((m) => m.id === message.parent_id);
    if (parent !== -1) messages.length = parent + 1;
  }
  messages.push(message);
  conversation.current_message_id = message.id;
}

/** POST a request whose answer is an SSE stream (send, edit, regenerate) and show it live. */
async function streamAnswer(conversation, path, body) {
  if (state.streams.has(conversation.id)) return false;
  const stream = { conversation, controller: new AbortController(), assistantId: null, sawMessage: false,
                   finished: false };
  state.streams.set(conversation.id, stream);
  state.editing = null;
  hideBanner();
  renderConversation();
  renderSidebar();
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(body),
      signal: stream.controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    await readEvents(response.body, (event) => onStreamEvent(stream, event));
  } catch (error) {
    if (error.name !== "AbortError") {
      showBanner(error.message);
      const message = conversation.messages.find((m) => m.id === stream.assistantId);
      if (message && message.status === "generating") message.status = "error";
    }
  } finally {
    state.streams.delete(conversation.id);
    if (!stream.finished && stream.sawMessage) await resync(conversation);
    if (state.current === conversation) renderConversation();
    renderSidebar();
    refreshList();
  }
  return stream.sawMessage;
}

function onStreamEvent(stream, event) {
  const conversation = stream.conversation;
  const shown = state.current === conversation;
  if (event.type === "message") {
    stream.sawMessage = true;
    if (event.message.role === "assistant") stream.assistantId = event.message.id;
    placeMessage(conversation, event.message);
    if (shown) renderConversation({ scroll: true });
  } else if (event.type === "delta") {
    const message = conversation.messages.find((m) => m.id === event.message_id);
    if (!message) return;
    if (event.content) message.content = (message.content ?? "") + event.content;
    if (event.reasoning_content) message.reasoning_content = (message.reasoning_content ?? "") + event.reasoning_content;
    if (shown) scheduleRender(message.id);
  } else if (event.type === "done") {
    stream.finished = true;
    placeMessage(conversation, event.message);
    if (event.conversation) {
      const { messages } = conversation;
      Object.assign(conversation, event.conversation, { messages });
      remember(conversation);
    }
    if (shown) {
      renderConversation({ scroll: true });
      renderSidebar();
    }
  } else if (event.type === "error") {
    stream.finished = true;
    const message = conversation.messages.find((m) => m.id === stream.assistantId);
    if (message) {
      message.status = "error";
      message.finish_reason = "error";
      message.error = event.error?.message;
    }
    if (shown) {
      showBanner(`The answer failed: ${event.error?.message ?? "unknown error"}`);
      renderConversation();
    }
  }
}

/** After an aborted stream: fetch the stored branch, which the server settles as `stopped`
 * once it sees the connection close (allow it a moment). */
async function resync(conversation) {
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      const stored = await api("GET", conversationPath(conversation.id));
      const settled = !stored.messages.some((m) => m.status === "generating");
      if (settled || attempt === 19) {
        const local = new Map(conversation.messages.map((m) => [m.id, m]));
        for (const m of stored.messages) {
          // A stop can race the last deltas; keep the longer text the page already showed.
          const seen = local.get(m.id);
          if (seen && (seen.content?.length ?? 0) > (m.content?.length ?? 0) && m.status === "generating") {
            m.content = seen.content;
          }
        }
        Object.assign(conversation, stored);
        remember(conversation);
        return;
      }
    } catch {
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
}

async function stopAnswer() {
  const conversation = state.current;
  const stream = conversation && state.streams.get(conversation.id);
  if (!stream) return;
  $("stop").disabled = true;
  if (!stream.assistantId) {
    stream.controller.abort();
    return;
  }
  // The stop route ends the answer on the server, which then closes the stream with a final
  // `done`; closing the connection is the fallback (the server stops on disconnect too).
  try {
    await api("POST", `${messagePath(conversation.id, stream.assistantId)}/stop`);
  } catch {
    stream.controller.abort();
    return;
  }
  setTimeout(() => {
    if (state.streams.get(conversation.id) === stream) stream.controller.abort();
  }, 2000);
}

async function sendMessage() {
  const input = $("input");
  const content = input.value;
  if (!content.trim()) return;
  if (state.current && state.streams.has(state.current.id)) return;
  let conversation = state.current;
  if (!conversation) {
    try {
      conversation = await newConversation();
    } catch (error) {
      showBanner(`Could not start a conversation: ${error.message}`);
      return;
    }
  }
  input.value = "";
  autosize(input);
  const started = await streamAnswer(conversation, `${conversationPath(conversation.id)}/messages`, { content });
  if (!started && !input.value) {
    input.value = content; // nothing was stored: give the text back
    autosize(input);
  }
}

function editMessage(message, content) {
  const conversation = state.current;
  if (!content.trim()) return;
  streamAnswer(conversation, `${messagePath(conversation.id, message.id)}/edit`, { content });
}

function regenerate(message) {
  const conversation = state.current;
  streamAnswer(conversation, `${messagePath(conversation.id, message.id)}/regenerate`, {});
}

// ---------------------------------------------------------------- rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, className, onClick, title) {
  const node = el("button", className, label);
  node.type = "button";
  if (title) node.title = title;
  node.addEventListener("click", onClick);
  return node;
}

function cacheText(conversation) {
  const cache = conversation.cache;
  if (!cache) return "KV cache: unknown";
  return cache.warm ? `KV cache warm: ${cache.cached_tokens} tokens cached` : "KV cache cold";
}

function renderSidebar() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = el("li", "conversation");
    item.dataset.id = conversation.id;
    item.tabIndex = 0;
    if (conversation.id === state.current?.id) {
      item.classList.add("active");
      item.setAttribute("aria-current", "true");
    }
    const dot = el("span", "warm-dot");
    if (conversation.cache?.warm) dot.classList.add("warm");
    dot.title = cacheText(conversation);
    item.append(dot, el("span", "title", conversation.title || "New chat"));
    if (state.streams.has(conversation.id)) item.classList.add("streaming");
    item.title = `${conversation.title}\n${cacheText(conversation)}`;
    item.addEventListener("click", () => openConversation(conversation.id));
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openConversation(conversation.id);
    });
    list.append(item);
  }
}

function renderHeader() {
  const conversation = state.current;
  $("chat-title").textContent = conversation ? conversation.title : "chatserve";
  document.title = conversation ? `${conversation.title} · chatserve` : "chatserve";
  $("rename-chat").disabled = !conversation;
  $("delete-chat").disabled = !conversation;
  const badge = $("cache-badge");
  badge.hidden = !conversation || !conversation.messages?.length;
  if (conversation) {
    badge.textContent = conversation.cache?.warm ? `warm · ${conversation.cache.cached_tokens} cached` : "cold";
    badge.classList.toggle("warm", Boolean(conversation.cache?.warm));
    badge.title = cacheText(conversation);
  }
}

function renderConversation({ scroll = false } = {}) {
  const conversation = state.current;
  const container = $("messages");
  const stick = scroll || nearBottom(container);
  renderHeader();
  container.replaceChildren();
  if (!conversation || !conversation.messages?.length) {
    const empty = el("div", "empty-state");
    empty.id = "empty-state";
    empty.append(el("h2", "", "Start a conversation"),
                 el("p", "", "Type a message below. Enter sends, Shift+Enter starts a new line."));
    container.append(empty);
  } else {
    for (const message of conversation.messages) container.append(messageNode(message));
  }
  updateComposer();
  if (stick) container.scrollTop = container.scrollHeight;
}

function nearBottom(container) {
  return container.scrollHeight - container.scrollTop - container.clientHeight < 80;
}

function updateComposer() {
  const busy = Boolean(state.current && state.streams.has(state.current.id));
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("stop").disabled = false;
}

function messageNode(message) {
  const busy = state.streams.has(state.current.id);
  const node = el("article", `message ${message.role}`);
  node.dataset.id = message.id;
  node.dataset.status = message.status;
  if (message.role === "user" && state.editing === message.id) {
    node.append(editBox(message));
    return node;
  }
  const bubble = el("div", "bubble");
  fillBubble(bubble, message);
  node.append(bubble);

  const meta = el("div", "message-meta");
  const siblings = message.siblings ?? [message.id];
  if (siblings.length > 1) {
    const index = message.sibling_index ?? siblings.indexOf(message.id);
    const nav = el("span", "branch-nav");
    const prev = button("‹", "icon-button prev", () => switchBranch(siblings[index - 1]), "Previous version");
    const next = button("›", "icon-button next", () => switchBranch(siblings[index + 1]), "Next version");
    prev.disabled = busy || index <= 0;
    next.disabled = busy || index >= siblings.length - 1;
    prev.setAttribute("aria-label", "Previous version");
    next.setAttribute("aria-label", "Next version");
    nav.append(prev, el("span", "branch-index", `${index + 1}/${siblings.length}`), next);
    meta.append(nav);
  }
  const actions = el("span", "actions");
  if (message.role === "user") {
    const edit = button("Edit", "icon-button edit", () => {
      state.editing = message.id;
      renderConversation();
    }, "Edit this message and send it again");
    edit.disabled = busy;
    actions.append(edit);
  } else {
    const again = button("Regenerate", "icon-button regenerate", () => regenerate(message), "Answer again");
    again.disabled = busy || message.status === "generating";
    actions.append(again);
  }
  meta.append(actions);
  if (message.role === "assistant") {
    const badge = statusBadge(message);
    if (badge) meta.append(badge);
    const stats = statsText(message.stats);
    if (stats) meta.append(el("span", "stats", stats));
  }
  node.append(meta);
  return node;
}

function fillBubble(bubble, message) {
  bubble.replaceChildren();
  if (message.role === "user") {
    bubble.textContent = message.content;
    return;
  }
  if (message.reasoning_content) {
    const details = el("details", "reasoning");
    details.open = state.openReasoning.has(message.id);
    details.addEventListener("toggle", () => {
      if (details.open) state.openReasoning.add(message.id);
      else state.openReasoning.delete(message.id);
    });
    const thinking = message.status === "generating" && !message.content;
    details.append(el("summary", "", thinking ? "Thinking…" : "Reasoning"));
    const body = el("div", "reasoning-body markdown");
    body.append(renderMarkdown(message.reasoning_content));
    details.append(body);
    bubble.append(details);
  }
  const content = el("div", "content markdown");
  content.append(renderMarkdown(message.content ?? ""));
  if (message.status === "generating") {
    const last = content.lastElementChild;
    if (last && last.tagName === "P") last.classList.add("typing");
    else content.append(el("p", "typing"));
  }
  bubble.append(content);
  if (message.error) bubble.append(el("p", "error-text", message.error));
}

function statusBadge(message) {
  if (message.status === "stopped") return el("span", "badge stopped", "stopped");
  if (message.status === "error") return el("span", "badge error", "error");
  if (message.status === "complete" && message.finish_reason === "length") {
    const badge = el("span", "badge length", "max tokens");
    badge.title = "The answer reached max_tokens";
    return badge;
  }
  return null;
}

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.completion_tokens != null) parts.push(`${stats.completion_tokens} tokens`);
  if (stats.tokens_per_second != null) parts.push(`${stats.tokens_per_second.toFixed(1)} tok/s`);
  if (stats.time_to_first_token != null) {
    const ttft = stats.time_to_first_token;
    parts.push(`${ttft < 1 ? `${Math.round(ttft * 1000)} ms` : `${ttft.toFixed(2)} s`} to first token`);
  }
  if (stats.cached_tokens != null) {
    parts.push(stats.prompt_tokens != null ? `${stats.cached_tokens}/${stats.prompt_tokens} prompt tokens cached`
                                           : `${stats.cached_tokens} cached`);
  }
  return parts.join(" · ");
}

function editBox(message) {
  const box = el("div", "edit-box");
  const area = el("textarea");
  area.value = message.content;
  area.setAttribute("aria-label", "Edit message");
  const cancel = () => {
    state.editing = null;
    renderConversation();
  };
  const submit = () => editMessage(message, area.value);
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === "Escape") cancel();
  });
  const actions = el("div", "edit-actions");
  actions.append(button("Cancel", "button ghost", cancel), button("Send", "button primary save-edit", submit));
  box.append(area, actions);
  queueMicrotask(() => {
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  });
  return box;
}

// Deltas arrive many per frame: re-render a streaming message at most once per frame.
const pendingRenders = new Set();
function scheduleRender(messageId) {
  if (pendingRenders.size === 0) requestAnimationFrame(flushRenders);
  pendingRenders.add(messageId);
}
function flushRenders() {
  const container = $("messages");
  const stick = nearBottom(container);
  for (const id of pendingRenders) {
    const message = state.current?.messages.find((m) => m.id === id);
    const node = container.querySelector(`article[data-id="${CSS.escape(id)}"] .bubble`);
    if (message && node) fillBubble(node, message);
  }
  pendingRenders.clear();
  if (stick) container.scrollTop = container.scrollHeight;
}

// ---------------------------------------------------------------- settings, banner, model

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

function openSettings() {
  const dialog = $("settings-dialog");
  if (dialog.open) return;
  const conversation = state.current;
  const params = conversation?.params ?? {};
  $("setting-system-prompt").value = conversation?.system_prompt ?? "";
  $("setting-temperature").value = params.temperature ?? "";
  $("setting-top-p").value = params.top_p ?? "";
  $("setting-max-tokens").value = params.max_tokens ?? "";
  $("setting-api-key").value = localStorage.getItem(API_KEY) ?? "";
  $("conversation-settings").querySelector("legend").textContent =
    conversation ? "This conversation" : "A new conversation";
  $("settings-error").hidden = true;
  dialog.showModal();
}

function numberSetting(id, name, { integer = false } = {}) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const value = Number(text);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}`);
  }
  return value;
}

async function saveSettings(event) {
  event.preventDefault();
  const error = $("settings-error");
  error.hidden = true;
  let changes;
  try {
    changes = {
      system_prompt: $("setting-system-prompt").value.trim() ? $("setting-system-prompt").value : null,
      params: {
        temperature: numberSetting("setting-temperature", "Temperature"),
        top_p: numberSetting("setting-top-p", "Top p"),
        max_tokens: numberSetting("setting-max-tokens", "Max tokens", { integer: true }),
      },
    };
  } catch (problem) {
    error.textContent = problem.message;
    error.hidden = false;
    return;
  }
  const key = $("setting-api-key").value.trim();
  const keyChanged = key !== (localStorage.getItem(API_KEY) ?? "");
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
  try {
    const conversation = state.current;
    if (conversation) {
      const before = JSON.stringify([conversation.system_prompt ?? null, conversation.params ?? {}]);
      const after = JSON.stringify([changes.system_prompt, { ...(conversation.params ?? {}), ...changes.params }]);
      if (before !== after) {
        const updated = await api("PATCH", conversationPath(conversation.id), changes);
        Object.assign(conversation, updated, { messages: conversation.messages });
        remember(conversation);
      }
    } else if (changes.system_prompt || Object.values(changes.params).some((v) => v !== null)) {
      await newConversation(changes);
    }
  } catch (problem) {
    error.textContent = problem.message;
    error.hidden = false;
    return;
  }
  $("settings-dialog").close();
  if (keyChanged) {
    hideBanner();
    await start();
  }
}

async function showModel() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    const label = $("model-name");
    label.textContent = response.ok ? body.model : `${body.model} (${body.status})`;
    if (!response.ok && body.status === "loading") setTimeout(showModel, 2000);
  } catch {
    $("model-name").textContent = "server unreachable";
  }
}

// ---------------------------------------------------------------- wiring

function autosize(area) {
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, window.innerHeight * 0.4)}px`;
}

function bind() {
  const input = $("input");
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });
  input.addEventListener("input", () => autosize(input));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  $("stop").addEventListener("click", stopAnswer);
  $("new-chat").addEventListener("click", onNewChat);
  $("chat-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettings);
  $("settings-cancel").addEventListener("click", () => $("settings-dialog").close());
  $("delete-chat").addEventListener("click", deleteConversation);

  const form = $("rename-form");
  const field = $("rename-input");
  const closeRename = () => {
    form.hidden = true;
    $("chat-title").hidden = false;
  };
  $("rename-chat").addEventListener("click", () => {
    if (!state.current) return;
    field.value = state.current.title;
    $("chat-title").hidden = true;
    form.hidden = false;
    field.focus();
    field.select();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    closeRename();
    await renameConversation(field.value);
  });
  field.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeRename();
  });
  field.addEventListener("blur", () => {
    if (!form.hidden) closeRename();
  });

  setInterval(() => {
    if (document.visibilityState === "visible") refreshList();
  }, LIST_REFRESH_MS);
}

async function start() {
  await refreshList();
  const last = localStorage.getItem(LAST_CONVERSATION);
  const target = state.conversations.find((c) => c.id === last) ?? state.conversations[0];
  state.current = null;
  if (target) await openConversation(target.id);
  else renderConversation();
}

bind();
showModel();
start().finally(() => {
  document.body.dataset.ready = "true";
  $("input").focus();
});
