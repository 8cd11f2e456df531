// Model output to DOM nodes: markdown-it (its raw HTML off) writes HTML, DOMPurify keeps of it only
// safe tags and attributes and parses it into a fragment, highlight.js colours fenced code that
// names its language, and KaTeX typesets $...$, $$...$$, \(...\) and \[...\]. The libraries are
// vendored in ./vendor (see its README): no CDN, no build step.
//
// Math is typeset after sanitizing: the markdown step leaves only the TeX, as text, in a
// span.math; katex.render then builds the formula's nodes itself, setting their styles through
// the CSSOM, which the page's Content-Security-Policy (style-src 'self') allows where the style
// attributes of an HTML string would be refused.

import DOMPurify from "./vendor/dompurify/purify.es.js";
import hljs from "./vendor/highlight.js/highlight.min.js";
import markdownit from "./vendor/markdown-it/markdown-it.esm.min.js";
import "./vendor/katex/katex.min.js"; // a UMD build: it defines globalThis.katex

const katex = globalThis.katex;

const md = markdownit({
  html: false, // whatever HTML the model writes stays text
  linkify: true, // bare http(s) URLs become links
  breaks: true, // a single newline is a line break, as models mean it
  highlight(code, language) {
    if (!language || !hljs.getLanguage(language)) return "";
    try {
      return hljs.highlight(code, { language, ignoreIllegals: true }).value;
    } catch {
      return "";
    }
  },
});
// No images from model output: a picture the model names would be fetched from wherever it says
// (the CSP blocks other hosts too), e.g. a URL carrying the conversation away.
md.disable("image");
md.use(mathPlugin);
// A table column's alignment as a class, not a style attribute: the CSP refuses those.
md.core.ruler.push("align_class", (state) => {
  for (const token of state.tokens) {
    const style = token.attrGet?.("style");
    if (!style || (token.type !== "th_open" && token.type !== "td_open")) continue;
    token.attrs = token.attrs.filter(([name]) => name !== "style");
    const align = /text-align:\s*(left|right|center)/.exec(style);
    if (align) token.attrJoin("class", `align-${align[1]}`);
  }
});

/** Only absolute http(s) and mailto links stay links; markdown-it already refuses javascript: and
 * the like, this also drops relative ones (they would lead into this server's API). */
export function safeUrl(text) {
  try {
    const url = new URL(text);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

/** Markdown text -> a DocumentFragment, safe to insert; `previous`, the container it will replace
 * the content of, lends the formulas it has typeset already. */
export function renderMarkdown(text, previous = null) {
  const fragment = DOMPurify.sanitize(md.render(text), { RETURN_DOM_FRAGMENT: true });
  for (const link of fragment.querySelectorAll("a")) {
    if (safeUrl(link.getAttribute("href") ?? "") === null) {
      link.replaceWith(...link.childNodes);
      continue;
    }
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
  }
  for (const pre of fragment.querySelectorAll("pre")) codeBlock(pre);
  const typesetBefore = typesetIn(previous);
  for (const node of fragment.querySelectorAll(".math")) typeset(node, typesetBefore);
  return fragment;
}

/** A fenced code block gets a bar above it: its language, and a button that copies the code. */
function codeBlock(pre) {
  const code = pre.querySelector(":scope > code");
  if (!code) return;
  const language = [...code.classList].find((name) => name.startsWith("language-"))?.slice(9) ?? "";
  if (code.querySelector("[class^='hljs-']")) code.classList.add("hljs");
  const block = document.createElement("div");
  block.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.className = "code-language";
  label.textContent = language;
  const copy = copyButton(() => code.textContent.replace(/\n$/, ""), "Copy code");
  bar.append(label, copy);
  pre.replaceWith(block);
  block.append(bar, pre);
}

/** A "Copy" button: puts text() on the clipboard, then says "Copied" a moment. */
export function copyButton(text, title) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon-button copy";
  button.textContent = "Copy";
  button.title = title;
  button.setAttribute("aria-label", title);
  button.addEventListener("click", async () => {
    const done = await copyText(text());
    button.textContent = done ? "Copied" : "Copy failed";
    clearTimeout(button.reset);
    button.reset = setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

/** The clipboard API where the page is a secure context (https, localhost); over plain http from
 * another machine it is missing, and the old copy command on a hidden text area still works. */
async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    const done = document.execCommand("copy");
    area.remove();
    return done;
  }
}

// ---------------------------------------------------------------- math

/** Typeset one span.math (or div.math-display) holding TeX as text, or put in its place the same
 * formula typeset before (a streaming answer is rendered again each frame: each formula is
 * typeset once, and its nodes moved, not copied, so their CSSOM styles stay theirs). */
const typesetKeys = new WeakMap(); // a typeset .math node -> its "display:TeX" key

function typeset(node, typesetBefore) {
  const displayMode = node.classList.contains("math-display");
  const tex = node.textContent;
  const key = `${displayMode}:${tex}`;
  const before = typesetBefore.get(key)?.pop();
  if (before) {
    node.replaceWith(before);
    return;
  }
  typesetKeys.set(node, key);
  try {
    katex.render(tex, node, {
      displayMode,
      throwOnError: false, // a formula KaTeX cannot read shows as its TeX, in red, with the reason
      output: "htmlAndMathml", // MathML for screen readers
    });
  } catch {
    // not a parse error (those throwOnError covers): the TeX stays on show as text
  }
}

/** The formulas typeset in a container, by their "display:TeX" key. */
function typesetIn(container) {
  const found = new Map();
  for (const node of container?.querySelectorAll(".math") ?? []) {
    const key = typesetKeys.get(node);
    if (!key) continue;
    if (!found.has(key)) found.set(key, []);
    found.get(key).push(node);
  }
  for (const nodes of found.values()) nodes.reverse(); // pop() takes them in order
  return found;
}

/** $...$ and \(...\) inline, $$...$$ and \[...\] as display math (a block when the delimiters
 * open and close their own lines, else inline in the text). A dollar only opens math when a
 * non-space follows it and only closes it when a non-space precedes it and no digit follows it,
 * as in Pandoc: "it costs $5 or $10" stays text. */
function mathPlugin(md) {
  md.inline.ruler.before("escape", "math_inline", mathInline);
  md.block.ruler.before("fence", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
  const escape = md.utils.escapeHtml;
  md.renderer.rules.math_inline = (tokens, i) => {
    const className = tokens[i].markup === "display" ? "math math-display" : "math";
    return `<span class="${className}">${escape(tokens[i].content)}</span>`;
  };
  md.renderer.rules.math_block = (tokens, i) => `<div class="math math-display">${escape(tokens[i].content)}</div>\n`;
}

const DELIMITERS = [
  // [open, close, display], longest first
  ["$$", "$$", true],
  ["\\[", "\\]", true],
  ["\\(", "\\)", false],
  ["$", "$", false],
];

function mathInline(state, silent) {
  const { src, pos } = state;
  if (src[pos] !== "$" && src[pos] !== "\\") return false;
  for (const [open, close, display] of DELIMITERS) {
    if (!src.startsWith(open, pos)) continue;
    const start = pos + open.length;
    let end = src.indexOf(close, start);
    if (open === "$") {
      if (start >= src.length || /\s/.test(src[start])) return false;
      while (end !== -1 && (/[\s\\]/.test(src[end - 1]) || /\d/.test(src[end + 1] ?? ""))) {
        end = src.indexOf(close, end + 1);
      }
    }
    if (end === -1 || end === start) return false;
    if (!silent) {
      const token = state.push("math_inline", "math", 0);
      token.content = src.slice(start, end).trim();
      token.markup = display ? "display" : "inline";
    }
    state.pos = end + close.length;
    return true;
  }
  return false;
}

function mathBlock(state, startLine, endLine, silent) {
  const lineText = (line) => state.src.slice(state.bMarks[line] + state.tShift[line], state.eMarks[line]);
  if (state.sCount[startLine] - state.blkIndent >= 4) return false; // an indented code block
  const first = lineText(startLine);
  const pair = DELIMITERS.find(([open, , display]) => display && first.startsWith(open));
  if (!pair) return false;
  const [open, close] = pair;
  let body = first.slice(open.length);
  let line = startLine;
  let closed = body.trimEnd().endsWith(close);
  if (!closed && body.includes(close)) return false; // "$$x$$ and more": inline math in a paragraph
  if (closed) {
    body = body.trimEnd().slice(0, -close.length);
    if (!body.trim()) return false; // "$$" alone on its line opens a block below
  }
  const lines = [body];
  while (!closed && ++line < endLine) {
    if (state.sCount[line] < state.blkIndent) break;
    const text = lineText(line);
    if (text.trimEnd().endsWith(close)) {
      lines.push(text.trimEnd().slice(0, -close.length));
      closed = true;
    } else {
      lines.push(text);
    }
  }
  if (!closed) return false; // unclosed (still streaming in): text until its closing line arrives
  if (silent) return true;
  const token = state.push("math_block", "math", 0);
  token.block = true;
  token.content = lines.join("\n").trim();
  token.map = [startLine, line + 1];
  state.line = line + 1;
  return true;
}
