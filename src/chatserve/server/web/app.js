// The chat page: a client of the conversations API (docs/conversations-api.md). Plain DOM, no
// framework, no build step. Model output goes through renderMarkdown (render.js): Markdown, then
// sanitized, before it becomes nodes.

import { copyButton, renderMarkdown } from "./render.js";

const API_KEY = "chatserve.apiKey";
const LAST_CONVERSATION = "chatserve.lastConversation";
const THEME = "chatserve.theme"; // read by theme.js too
const LIST_REFRESH_MS = 15000;
const LIST_PAGE = 50; // conversations per page of the list; "More" (or scrolling to the end) adds one
const MAX_LIST_LIMIT = 100; // the most the server gives in one page

const $ = (id) => document.getElementById(id);

const state = {
  conversations: [], // the sidebar: conversations without messages, most recent first
  listWanted: LIST_PAGE, // how many the sidebar shows: a page, and a page more for each "More"
  listHasMore: false, // the server has more than the sidebar shows
  listLoading: false, // a list request is in flight: scrolling asks for no more meanwhile
  current: null, // the open conversation, with the messages of its current branch; or a draft (below)
  streams: new Map(), // conversation id -> the answer streaming into it
  openReasoning: new Set(), // assistant message ids whose reasoning the user expanded
  editing: null, // id of the user message being edited in place
  deleted: new Set(), // conversations deleted here: a late answer or list must not bring them back
  contextLength: null, // the model's context in tokens (GET .../sampling says)
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

/** The first `wanted` conversations, a page at a time (the server pages its list). */
async function fetchList(wanted) {
  const data = [];
  let after = null;
  let hasMore = true;
  while (hasMore && data.length < wanted) {
    const query = new URLSearchParams({ limit: String(Math.min(MAX_LIST_LIMIT, wanted - data.length)) });
    if (after) query.set("after", after);
    const page = await api("GET", `/v1/conversations?${query}`);
    data.push(...page.data);
    hasMore = page.has_more && page.last_id !== null;
    after = page.last_id;
  }
  return { data, hasMore };
}

async function refreshList() {
  state.listLoading = true;
  try {
    const { data, hasMore } = await fetchList(state.listWanted);
    state.conversations = data.filter((c) => !state.deleted.has(c.id));
    state.listHasMore = hasMore;
    renderSidebar();
  } catch (error) {
    if (error.status !== 401) showBanner(`Could not list conversations: ${error.message}`);
  } finally {
    state.listLoading = false;
  }
}

/** One page more in the sidebar: the "More" button, or scrolling to the end of the list. */
function loadMoreConversations() {
  if (!state.listHasMore || state.listLoading) return;
  state.listWanted = state.conversations.length + LIST_PAGE;
  refreshList();
}

function remember(conversation) {
  if (state.deleted.has(conversation.id)) return;
  const index = state.conversations.findIndex((c) => c.id === conversation.id);
  const summary = { ...conversation };
  delete summary.messages;
  if (index === -1) state.conversations.unshift(summary);
  else state.conversations[index] = summary;
  // The server's order: most recently updated first (an answer or a rename moves one to the top).
  state.conversations.sort((a, b) => (b.updated ?? 0) - (a.updated ?? 0));
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

/** A new chat is a draft, on this page only, until its first message: then the server stores it
 * (with the settings chosen meanwhile), so no empty conversations pile up in the list. */
function draft() {
  return { id: null, draft: true, title: "New chat", system_prompt: null, params: {}, messages: [] };
}

/** Store the draft on the server; it becomes the conversation (the same object: the page may hold it). */
async function storeDraft(conversation) {
  const body = {};
  if (conversation.system_prompt) body.system_prompt = conversation.system_prompt;
  const params = Object.fromEntries(Object.entries(conversation.params).filter(([, v]) => v !== null));
  if (Object.keys(params).length) body.params = params;
  const stored = await api("POST", "/v1/conversations", body);
  Object.assign(conversation, stored, { draft: false, messages: [] });
  localStorage.setItem(LAST_CONVERSATION, conversation.id);
  remember(conversation);
  renderSidebar();
  return conversation;
}

function onNewChat() {
  if (!state.current?.draft) {
    state.current = draft();
    state.editing = null;
    renderSidebar();
    renderConversation();
  }
  hideBanner();
  $("input").focus();
}

/** Merge a conversation the server sent into every copy the page holds (the open one, the one an
 * answer streams into, the sidebar's), keeping their messages. */
function applyConversation(updated) {
  for (const copy of new Set([state.current, state.streams.get(updated.id)?.conversation])) {
    if (copy?.id === updated.id) Object.assign(copy, updated, { messages: copy.messages });
  }
  remember(updated);
}

async function renameConversation(id, title) {
  const known = state.conversations.find((c) => c.id === id);
  title = title.trim();
  if (!known || !title || title === known.title) return;
  try {
    applyConversation(await api("PATCH", conversationPath(id), { title }));
    renderSidebar();
    renderHeader();
  } catch (error) {
    showBanner(`Could not rename: ${error.message}`);
  }
}

async function deleteConversation(id) {
  const conversation = state.conversations.find((c) => c.id === id);
  if (!conversation || !confirm(`Delete "${conversation.title}"? This cannot be undone.`)) return;
  const item = sidebarItemOf(id);
  const hadFocus = Boolean(item?.contains(document.activeElement));
  state.streams.get(id)?.controller.abort();
  try {
    await api("DELETE", conversationPath(id));
  } catch (error) {
    if (error.status !== 404) {
      showBanner(`Could not delete: ${error.message}`);
      return;
    }
  }
  state.deleted.add(id);
  const index = state.conversations.findIndex((c) => c.id === id);
  state.conversations = state.conversations.filter((c) => c.id !== id);
  // The one that takes its place in the list (or the one above, at the end) gets the focus, and
  // is opened if the deleted one was.
  const next = state.conversations[Math.min(index, state.conversations.length - 1)];
  if (state.current?.id === id) {
    state.current = null;
    state.editing = null;
    localStorage.removeItem(LAST_CONVERSATION);
    if (next) await openConversation(next.id);
    else renderConversation();
  }
  renderSidebar();
  if (hadFocus) (next ? sidebarItemOf(next.id)?.querySelector(".open") : $("new-chat"))?.focus();
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

/** Delete a message and everything below it (an only answer takes its question); the server
 * says which branch is on show after it. */
async function deleteMessage(message) {
  const conversation = state.current;
  if (!conversation || state.streams.has(conversation.id)) return;
  const what = message.role === "user" ? "this message, its answers" : "this answer";
  if (!confirm(`Delete ${what} and every reply below it? This cannot be undone.`)) return;
  try {
    const result = await api("DELETE", messagePath(conversation.id, message.id));
    if (state.current !== conversation) return;
    Object.assign(conversation, result.conversation);
    state.editing = null;
    remember(conversation);
    renderSidebar();
    renderConversation();
  } catch (error) {
    showBanner(`Could not delete the message: ${error.message}`);
  }
}

/** Download the open conversation: format "json" (the whole tree, for import) or "markdown" (the
 * branch on show). Fetched rather than linked, so that the API key goes with it. */
async function exportConversation(format) {
  const conversation = state.current;
  if (!conversation?.id) return;
  const response = await fetch(`${conversationPath(conversation.id)}/export?format=${format}`, { headers: headers(false) });
  if (!response.ok) throw await errorOf(response);
  const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") ?? "")?.[1]
    ?? `conversation.${format === "json" ? "json" : "md"}`;
  const url = URL.createObjectURL(await response.blob());
  const link = el("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** A JSON export (from this server or another) becomes a new conversation, opened. */
async function importConversation(file) {
  let body;
  try {
    body = JSON.parse(await file.text());
  } catch {
    throw new Error(`${file.name} is not JSON: choose a conversation exported as JSON`);
  }
  const imported = await api("POST", "/v1/conversations/import", body);
  state.deleted.delete(imported.id);
  state.current = imported;
  state.editing = null;
  localStorage.setItem(LAST_CONVERSATION, imported.id);
  remember(imported);
  renderSidebar();
  renderConversation({ scroll: true });
}

// ---------------------------------------------------------------- search

let searchTimer = null;
let searchSerial = 0; // only the newest query's answer is shown

function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 250);
}

async function runSearch() {
  const query = $("search").value.trim();
  const results = $("search-results");
  const serial = ++searchSerial;
  if (!query) {
    results.hidden = true;
    results.replaceChildren();
    $("search-status").hidden = true;
    $("conversation-list").hidden = false;
    $("more-conversations").hidden = !state.listHasMore;
    return;
  }
  let found;
  try {
    found = await api("GET", `/v1/conversations/search?${new URLSearchParams({ q: query, limit: "50" })}`);
  } catch (error) {
    if (serial !== searchSerial) return;
    found = { data: [], error: error.message };
  }
  if (serial !== searchSerial) return;
  $("conversation-list").hidden = true;
  $("more-conversations").hidden = true;
  const status = $("search-status");
  status.hidden = false;
  status.textContent = found.error ? `Search failed: ${found.error}`
    : found.data.length ? `${found.data.length}${found.has_more ? "+" : ""} found` : "Nothing found";
  results.replaceChildren(...found.data.map(searchResult));
  results.hidden = false;
}

/** A found conversation: its title, and the first matching message's snippet with the matched
 * words marked; opening it shows that message's branch. */
function searchResult(conversation) {
  const item = el("li", "conversation search-result");
  item.dataset.id = conversation.id;
  const open = el("button", "open");
  open.type = "button";
  const text = el("span", "result-text");
  text.append(el("span", "title", conversation.title || "New chat"));
  const match = conversation.matches?.find((m) => m.message_id) ?? conversation.matches?.[0];
  if (match?.snippet) text.append(highlighted(match));
  open.append(text);
  open.addEventListener("click", async () => {
    closeDrawer();
    await openConversation(conversation.id);
    if (match?.message_id && state.current?.id === conversation.id
        && !state.current.messages.some((m) => m.id === match.message_id)) {
      await switchBranch(match.message_id);
    }
  });
  item.append(open);
  return item;
}

function highlighted(match) {
  const snippet = el("span", "snippet");
  let at = 0;
  for (const [start, end] of match.highlights ?? []) {
    if (start < at) continue;
    snippet.append(match.snippet.slice(at, start), el("mark", "", match.snippet.slice(start, end)));
    at = end;
  }
  snippet.append(match.snippet.slice(at));
  return snippet;
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

/** POST a request whose answer is an SSE stream (send, edit, regenerate, continue) and show it live. */
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
  const conversation = state.current ?? (state.current = draft());
  if (conversation.draft) {
    if (conversation.storing) return; // Enter twice: the first one stores it
    conversation.storing = true;
    try {
      await storeDraft(conversation);
    } catch (error) {
      showBanner(`Could not start a conversation: ${error.message}`);
      return;
    } finally {
      conversation.storing = false;
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

/** An answer cut by max_tokens or stopped, at the end of its branch, can go on: the server
 * appends to the same message (its `message` event is the answer so far). */
function continuable(message) {
  const messages = state.current?.messages ?? [];
  if (message.role !== "assistant" || messages[messages.length - 1] !== message) return false;
  return message.status === "stopped" || (message.status === "complete" && message.finish_reason === "length");
}

function continueAnswer(message) {
  const conversation = state.current;
  streamAnswer(conversation, `${messagePath(conversation.id, message.id)}/continue`, {});
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

// Line icons (24x24, drawn with the text colour by style.css), built as DOM nodes: no markup strings.
const SVG_NS = "http://www.w3.org/2000/svg";
const ICONS = {
  pencil: ["M4 20h4L18.5 9.5a2.1 2.1 0 0 0-4-4L4 16z", "M13.5 6.5l4 4"],
  trash: ["M4 7h16", "M10 11v6", "M14 11v6", "M6 7l1 12a2 2 0 0 0 2 2h6a2 2 0 0 0 2-2l1-12", "M9 7V4h6v3"],
};

function icon(name) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  svg.classList.add("icon");
  for (const d of ICONS[name]) {
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

function iconButton(name, className, title, onClick) {
  const node = button("", `icon-button ${className}`, onClick, title);
  node.append(icon(name));
  node.setAttribute("aria-label", title);
  return node;
}

const sidebarItemOf = (id) => [...$("conversation-list").children].find((item) => item.dataset.id === id);

/** The sidebar, updated in place (items kept by conversation id), so that the periodic refresh
 * keeps keyboard focus, hover and a rename in progress. */
function renderSidebar() {
  const list = $("conversation-list");
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const items = new Map([...list.children].map((item) => [item.dataset.id, item]));
  let previous = null;
  for (const conversation of state.conversations) {
    const item = items.get(conversation.id) ?? sidebarItem(conversation.id);
    items.delete(conversation.id);
    updateSidebarItem(item, conversation);
    const place = previous ? previous.nextSibling : list.firstChild;
    if (place !== item) list.insertBefore(item, place);
    previous = item;
  }
  for (const gone of items.values()) gone.remove();
  $("more-conversations").hidden = !state.listHasMore || !$("search-results").hidden;
  if (focused?.isConnected && document.activeElement !== focused) focused.focus(); // moving an item drops it
}

function sidebarItem(id) {
  const item = el("li", "conversation");
  item.dataset.id = id;
  const open = el("button", "open");
  open.type = "button";
  open.append(el("span", "warm-dot"), el("span", "title"));
  open.addEventListener("click", () => {
    closeDrawer();
    openConversation(id);
  });
  open.addEventListener("keydown", (event) => {
    if (event.key === "F2") {
      event.preventDefault();
      startRename(item);
    } else if (event.key === "Delete") {
      event.preventDefault();
      deleteConversation(id);
    }
  });
  const actions = el("span", "item-actions");
  actions.append(iconButton("pencil", "rename", "Rename", () => startRename(item)),
                 iconButton("trash", "delete", "Delete", () => deleteConversation(id)));
  item.append(open, actions);
  return item;
}

function updateSidebarItem(item, conversation) {
  const title = conversation.title || "New chat";
  const active = conversation.id === state.current?.id;
  item.classList.toggle("active", active);
  item.classList.toggle("streaming", state.streams.has(conversation.id));
  const open = item.querySelector(".open");
  if (active) open.setAttribute("aria-current", "true");
  else open.removeAttribute("aria-current");
  open.title = `${title}\n${cacheText(conversation)}`;
  const label = item.querySelector(".title");
  if (label.textContent !== title) label.textContent = title;
  item.querySelector(".warm-dot").classList.toggle("warm", Boolean(conversation.cache?.warm));
  item.querySelector(".rename").setAttribute("aria-label", `Rename “${title}”`);
  item.querySelector(".delete").setAttribute("aria-label", `Delete “${title}”`);
}

/** Rename in place: Enter (or leaving the field) saves, Escape cancels. */
function startRename(item) {
  if (item.classList.contains("renaming")) return;
  const id = item.dataset.id;
  const conversation = state.conversations.find((c) => c.id === id);
  if (!conversation) return;
  const field = el("input", "rename-field");
  field.type = "text";
  field.maxLength = 256; // the server's bound on a title
  field.value = conversation.title;
  field.setAttribute("aria-label", "Conversation title");
  let finished = false;
  const finish = (save) => {
    if (finished) return;
    finished = true;
    const focused = document.activeElement === field;
    item.classList.remove("renaming");
    field.remove();
    if (focused) item.querySelector(".open").focus();
    if (save && item.isConnected) renameConversation(id, field.value);
  };
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      finish(false);
    }
  });
  field.addEventListener("blur", () => finish(true));
  item.classList.add("renaming");
  item.querySelector(".open").after(field);
  field.focus();
  field.select();
}

function renderHeader() {
  const conversation = state.current;
  $("chat-title").textContent = conversation ? conversation.title : "chatserve";
  document.title = conversation ? `${conversation.title} · chatserve` : "chatserve";
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
  const focus = focusedControl(container);
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
  updateContextUsage();
  if (stick) container.scrollTop = container.scrollHeight;
  if (focus) refocus(container, focus);
  updateToBottom();
}

/** The message button that has the focus, as (message's place, button's class): a re-render
 * replaces every node, and the keyboard user's place must not go back to the top of the page. */
function focusedControl(container) {
  const active = document.activeElement;
  const article = active?.closest?.("#messages article");
  if (!article || active.tagName !== "BUTTON") return null;
  return { index: [...container.children].indexOf(article), className: active.className };
}

function refocus(container, { index, className }) {
  const article = container.children[index];
  const buttons = [...(article?.querySelectorAll("button") ?? [])].filter((b) => !b.disabled);
  // The same button, else its enabled neighbour (the other version arrow at either end), else any.
  const same = buttons.find((b) => b.className === className);
  const sibling = buttons.find((b) => b.parentElement.className === "branch-nav" && /prev|next/.test(className));
  (same ?? sibling ?? buttons[0])?.focus();
}

function nearBottom(container) {
  return container.scrollHeight - container.scrollTop - container.clientHeight < 80;
}

/** The scroll-to-bottom button: on show while the messages are scrolled up from their end. */
function updateToBottom() {
  const container = $("messages");
  const hidden = nearBottom(container);
  if ($("to-bottom").hidden !== hidden) $("to-bottom").hidden = hidden;
}

/** How much of the model's context the conversation fills: the last answer's prompt and its
 * tokens (a continued answer's prompt holds the answer so far), of the context length. */
function updateContextUsage() {
  const box = $("context-usage");
  const stats = state.current?.messages?.findLast((m) => m.role === "assistant" && m.stats)?.stats;
  const used = stats ? (stats.prompt_tokens ?? 0) + (stats.completion_tokens ?? 0) : 0;
  box.hidden = !used || !state.contextLength;
  if (box.hidden) return;
  const share = Math.min(1, used / state.contextLength);
  $("context-fill").style.width = `${(share * 100).toFixed(1)}%`; // CSSOM, which the CSP allows
  box.classList.toggle("nearly-full", share >= 0.8);
  $("context-text").textContent =
    `${used.toLocaleString()} of ${state.contextLength.toLocaleString()} context tokens (${Math.round(share * 100)}%)`;
  box.title = "Tokens of the model's context the conversation takes: the last answer's prompt and answer";
}

/** The model's context length, for the context-usage line (the model must be loaded). */
async function loadContextLength() {
  try {
    const response = await fetch("/v1/conversations/sampling", { headers: headers(false) });
    if (!response.ok) return;
    state.contextLength = (await response.json()).context_length;
    updateContextUsage();
  } catch {
    // unreachable: showModel says so
  }
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
  const remove = iconButton("trash", "delete-message",
                            message.role === "user" ? "Delete this message and its answers" : "Delete this answer",
                            () => deleteMessage(message));
  remove.disabled = busy;
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
    // The answer as the model wrote it (Markdown), read when clicked: it may still be streaming in.
    actions.append(copyButton(() => message.content ?? "", "Copy this answer"), again);
    if (continuable(message)) {
      const more = button("Continue", "icon-button continue", () => continueAnswer(message),
                          "Go on with this answer where it stopped");
      more.disabled = busy;
      actions.append(more);
    }
  }
  actions.append(remove);
  meta.append(actions);
  const time = timestamp(message.created);
  if (time) meta.append(time);
  if (message.role === "assistant") {
    const badge = statusBadge(message);
    if (badge) meta.append(badge);
    const stats = statsText(message.stats);
    if (stats) meta.append(el("span", "stats", stats));
  }
  node.append(meta);
  return node;
}

const renderedReasoning = new WeakMap(); // reasoning <details> -> what its body shows

function fillBubble(bubble, message) {
  if (message.role === "user") {
    bubble.textContent = message.content;
    return;
  }
  // The reasoning stays one <details> while its answer streams in (the bubble is refilled every
  // frame): a new one each frame would swallow clicks on its summary. Collapsed unless the user
  // opened it.
  let details = bubble.querySelector(":scope > details.reasoning");
  const thinking = message.status === "generating" && !message.content && Boolean(message.reasoning_content);
  if (message.reasoning_content) {
    if (!details) {
      details = el("details", "reasoning");
      details.open = state.openReasoning.has(message.id);
      details.addEventListener("toggle", () => {
        if (details.open) state.openReasoning.add(message.id);
        else state.openReasoning.delete(message.id);
      });
      details.append(el("summary"), el("div", "reasoning-body markdown"));
      bubble.prepend(details);
    }
    const summary = details.querySelector("summary");
    const label = thinking ? "Thinking…" : "Reasoning";
    if (summary.textContent !== label) summary.textContent = label;
    summary.classList.toggle("thinking", thinking);
    const shown = `${thinking}:${message.reasoning_content}`;
    if (renderedReasoning.get(details) !== shown) {
      const body = details.querySelector(".reasoning-body");
      body.replaceChildren(renderMarkdown(message.reasoning_content, body));
      if (thinking) typingCursor(body);
      renderedReasoning.set(details, shown);
    }
  } else {
    details?.remove();
  }
  let content = bubble.querySelector(":scope > .content");
  if (!content) {
    content = el("div", "content markdown");
    bubble.append(content);
  }
  content.replaceChildren(renderMarkdown(message.content ?? "", content));
  if (message.status === "generating" && !thinking) typingCursor(content);
  bubble.querySelector(":scope > .error-text")?.remove();
  if (message.error) bubble.append(el("p", "error-text", message.error));
}

/** The blinking cursor at the end of text still streaming in. */
function typingCursor(container) {
  const last = container.lastElementChild;
  if (last && last.tagName === "P") last.classList.add("typing");
  else container.append(el("p", "typing"));
}

/** When a message was written (the server's time, seconds): the time of day, with the date unless
 * it is today; the full date and time on hover. */
function timestamp(created) {
  if (typeof created !== "number") return null;
  const date = new Date(created * 1000);
  const node = el("time", "timestamp");
  node.dateTime = date.toISOString();
  const today = date.toDateString() === new Date().toDateString();
  const time = date.toLocaleTimeString([], { hour: "numeric", minute: "2-digit" });
  node.textContent = today ? time : `${date.toLocaleDateString([], { month: "short", day: "numeric" })}, ${time}`;
  node.title = date.toLocaleString();
  return node;
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
    } else if (event.key === "Escape") {
      event.preventDefault();
      cancel();
    }
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
  updateToBottom();
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

// Every sampling value a conversation's params take (docs/conversations-api.md), with the
// server's bounds: one field each in Settings, ids setting-NAME (dashes for underscores).
const SAMPLING = [
  { name: "temperature", label: "Temperature", min: 0, max: 2, step: 0.05 },
  { name: "top_p", label: "Top p", min: 0, max: 1, step: 0.01 },
  { name: "top_k", label: "Top k", min: -1, step: 1, integer: true },
  { name: "min_p", label: "Min p", min: 0, max: 1, step: 0.01 },
  { name: "repetition_penalty", label: "Repetition penalty", min: 0, max: 2, step: 0.05 },
  { name: "presence_penalty", label: "Presence penalty", min: -2, max: 2, step: 0.1 },
  { name: "frequency_penalty", label: "Frequency penalty", min: -2, max: 2, step: 0.1 },
  { name: "max_tokens", label: "Max tokens", min: 1, step: 1, integer: true },
  { name: "seed", label: "Seed", step: 1, integer: true },
  { name: "stop", label: "Stop strings", stop: true },
];
const SOURCES = {
  conversation: "this conversation",
  server: "the server's",
  model: "the model's",
  default: "built-in",
};
const settingId = (name) => `setting-${name.replaceAll("_", "-")}`;

/** The sampling fields, built once from SAMPLING. */
function buildSamplingFields() {
  const row = $("sampling-fields");
  for (const spec of SAMPLING) {
    const setting = el("div", spec.stop ? "setting wide" : "setting");
    const label = el("label", "", spec.label);
    const field = el(spec.stop ? "textarea" : "input");
    field.id = settingId(spec.name);
    if (spec.stop) {
      field.rows = 2;
      field.placeholder = "one a line, at most 4; \\n is a newline";
    } else {
      field.type = "number";
      field.placeholder = "default";
      for (const key of ["min", "max", "step"]) if (spec[key] !== undefined) field[key] = String(spec[key]);
    }
    const effective = el("span", "effective");
    effective.id = `${field.id}-effective`;
    field.setAttribute("aria-describedby", effective.id);
    label.append(field);
    setting.append(label, effective); // outside the label: a description, not part of the name
    row.append(setting);
  }
}

// A stop string per line; a newline inside one is written \n (and a backslash \\).
const stopText = (list) => (list ?? []).map((s) => s.replaceAll("\\", "\\\\").replaceAll("\n", "\\n")).join("\n");
const stopList = (text) => text.split("\n").filter((line) => line !== "")
  .map((line) => line.replace(/\\(\\|n)/g, (_, c) => (c === "n" ? "\n" : "\\")));

function openSettings() {
  const dialog = $("settings-dialog");
  if (dialog.open) return;
  const conversation = state.current;
  const params = conversation?.params ?? {};
  $("setting-system-prompt").value = conversation?.system_prompt ?? "";
  for (const spec of SAMPLING) {
    const value = params[spec.name];
    $(settingId(spec.name)).value = spec.stop ? stopText(typeof value === "string" ? [value] : value) : value ?? "";
    $(`${settingId(spec.name)}-effective`).textContent = "";
  }
  $("setting-api-key").value = localStorage.getItem(API_KEY) ?? "";
  $("conversation-settings").querySelector("legend").textContent =
    conversation && !conversation.draft ? "This conversation" : "A new conversation";
  $("settings-error").hidden = true;
  $("export").hidden = !conversation?.id;
  dialog.showModal();
  showEffectiveSampling(conversation);
}

/** Under each field, the value the conversation's answers get and its source (GET .../sampling). */
async function showEffectiveSampling(conversation) {
  let sampling;
  try {
    sampling = await api("GET", conversation?.id ? `${conversationPath(conversation.id)}/sampling`
                                                 : "/v1/conversations/sampling");
  } catch (error) {
    for (const spec of SAMPLING) $(`${settingId(spec.name)}-effective`).textContent = `unknown: ${error.message}`;
    return;
  }
  if (state.current !== conversation || !$("settings-dialog").open) return;
  if (sampling.context_length) state.contextLength = sampling.context_length;
  for (const spec of SAMPLING) {
    const { value, source } = sampling.params[spec.name] ?? {};
    const shown = spec.stop ? (value?.length ? value.map((s) => JSON.stringify(s)).join(" ") : "none")
      : value ?? (spec.name === "max_tokens" ? "to the end of the context" : spec.name === "seed" ? "random" : "none");
    const node = $(`${settingId(spec.name)}-effective`);
    node.textContent = `${shown} · ${SOURCES[source] ?? source}`;
    node.dataset.source = source;
  }
}

function settingsProblem(problem) {
  $("settings-error").textContent = problem.message;
  $("settings-error").hidden = false;
}

function numberSetting({ name, label, integer = false }) {
  const text = $(settingId(name)).value.trim();
  if (text === "") return null;
  const value = Number(text);
  if (!Number.isFinite(value) || (integer && !Number.isSafeInteger(value))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"}`);
  }
  return value;
}

function stopSetting({ name, label }) {
  const list = stopList($(settingId(name)).value);
  if (list.length > 4) throw new Error(`${label}: at most 4`);
  return list.length ? list : null;
}

async function saveSettings(event) {
  event.preventDefault();
  const error = $("settings-error");
  error.hidden = true;
  let changes;
  try {
    changes = {
      system_prompt: $("setting-system-prompt").value.trim() ? $("setting-system-prompt").value : null,
      params: Object.fromEntries(SAMPLING.map((spec) => [spec.name, spec.stop ? stopSetting(spec)
                                                                   : numberSetting(spec)])),
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
    const conversation = state.current ?? (state.current = draft());
    if (conversation.draft) {
      conversation.system_prompt = changes.system_prompt; // sent when its first message stores it
      conversation.params = { ...conversation.params, ...changes.params };
    } else {
      const before = JSON.stringify([conversation.system_prompt ?? null, conversation.params ?? {}]);
      const after = JSON.stringify([changes.system_prompt, { ...(conversation.params ?? {}), ...changes.params }]);
      if (before !== after) {
        const updated = await api("PATCH", conversationPath(conversation.id), changes);
        Object.assign(conversation, updated, { messages: conversation.messages });
        remember(conversation);
      }
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
    if (response.ok && !state.contextLength) loadContextLength();
  } catch {
    $("model-name").textContent = "server unreachable";
  }
}

// ---------------------------------------------------------------- theme

/** The theme select: System (the system's light or dark), Light or Dark; remembered here. */
function bindTheme() {
  const select = $("theme");
  select.value = document.documentElement.dataset.theme ?? "system";
  select.addEventListener("change", () => {
    const theme = select.value;
    if (theme === "system") {
      delete document.documentElement.dataset.theme;
      localStorage.removeItem(THEME);
    } else {
      document.documentElement.dataset.theme = theme;
      localStorage.setItem(THEME, theme);
    }
  });
}

// ---------------------------------------------------------------- the drawer (phones)

// Below 768 px the conversations are a drawer over the chat: the header's menu button opens it;
// choosing a conversation, starting a new one, the backdrop or Esc close it.
const phone = matchMedia("(max-width: 767.98px)");
const roomy = matchMedia("(min-width: 1024px)"); // room for the long placeholder on one line
const drawerOpen = () => phone.matches && $("app").classList.contains("drawer-open");

function openDrawer() {
  $("app").classList.add("drawer-open");
  $("menu").setAttribute("aria-expanded", "true");
  $("chat").inert = true; // the chat behind the drawer takes no focus or clicks meanwhile
  const list = $("conversation-list");
  (list.querySelector(".active .open") ?? list.querySelector(".open") ?? $("new-chat")).focus();
}

function closeDrawer() {
  if (!$("app").classList.contains("drawer-open")) return;
  const hadFocus = $("sidebar").contains(document.activeElement);
  $("app").classList.remove("drawer-open");
  $("menu").setAttribute("aria-expanded", "false");
  $("chat").inert = false;
  if (hadFocus && phone.matches) $("menu").focus();
}

/** Screen-size details: the short placeholder where the long one would not fit on its line, the
 * drawer shut on leaving phone sizes. */
function fitScreen() {
  $("input").placeholder = roomy.matches ? "Message (Enter to send, Shift+Enter for a new line)" : "Message";
  if (!phone.matches) closeDrawer();
}

// ---------------------------------------------------------------- wiring

function autosize(area) {
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, window.innerHeight * 0.4)}px`;
}

function bind() {
  buildSamplingFields();
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
  for (const id of ["new-chat", "new-chat-top"]) {
    $(id).addEventListener("click", () => {
      closeDrawer();
      onNewChat();
    });
  }
  $("menu").addEventListener("click", () => (drawerOpen() ? closeDrawer() : openDrawer()));
  $("drawer-backdrop").addEventListener("click", closeDrawer);
  phone.addEventListener("change", fitScreen);
  roomy.addEventListener("change", fitScreen);
  fitScreen();
  document.addEventListener("keydown", onGlobalKey);
  bindTheme();
  $("messages").addEventListener("scroll", updateToBottom, { passive: true });
  $("to-bottom").addEventListener("click", () => {
    const container = $("messages");
    const still = matchMedia("(prefers-reduced-motion: reduce)").matches;
    container.scrollTo({ top: container.scrollHeight, behavior: still ? "auto" : "smooth" });
  });
  $("more-conversations").addEventListener("click", loadMoreConversations);
  const list = $("conversation-list");
  list.addEventListener("scroll", () => {
    if (list.scrollTop + list.clientHeight >= list.scrollHeight - 40) loadMoreConversations();
  });
  $("chat-settings").addEventListener("click", openSettings);
  const search = $("search");
  search.addEventListener("input", onSearchInput);
  search.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && search.value) {
      event.preventDefault(); // clears the search, and only that
      search.value = "";
      runSearch();
    }
  });
  for (const format of ["json", "markdown"]) {
    $(`export-${format}`).addEventListener("click", () => exportConversation(format).catch(settingsProblem));
  }
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", async () => {
    const file = $("import-file").files[0];
    $("import-file").value = "";
    if (!file) return;
    try {
      await importConversation(file);
      $("settings-dialog").close();
    } catch (problem) {
      settingsProblem(problem);
    }
  });
  $("settings-form").addEventListener("submit", saveSettings);
  $("settings-cancel").addEventListener("click", () => $("settings-dialog").close());
  setInterval(() => {
    if (document.visibilityState === "visible") refreshList();
  }, LIST_REFRESH_MS);
}

/** Esc anywhere the focused control has no use for it: closes the drawer, else stops the answer
 * streaming into the open conversation. */
function onGlobalKey(event) {
  if (event.key !== "Escape" || event.defaultPrevented || event.isComposing) return;
  if (document.querySelector("dialog[open]")) return; // the dialog's own Esc closes it
  if (drawerOpen()) {
    event.preventDefault();
    closeDrawer();
  } else if (state.current && state.streams.has(state.current.id)) {
    event.preventDefault();
    stopAnswer();
  }
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
