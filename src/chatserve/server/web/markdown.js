// A small Markdown renderer for model output. It builds DOM nodes and sets only text
// (createTextNode / textContent), never HTML, so whatever the model writes (<script>,
// <img onerror=...>) shows as literal text. Links are made only for http(s) URLs.
//
// Blocks: paragraphs (single newlines become line breaks), ``` fenced code (an unclosed fence runs
// to the end, as while an answer streams in), # headings, - / * / + and 1. lists (nested by
// indentation), > quotes and --- rules. Inline: `code`, **bold**, *italics*, ~~strike~~,
// [text](http://...) and bare http(s) URLs.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** The URL when it is an absolute http(s) URL, else null. */
export function safeUrl(text) {
  if (!/^https?:\/\//i.test(text)) return null;
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function link(href, children) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  a.append(...children);
  return a;
}

const isWordChar = (ch) => ch !== undefined && /[\p{L}\p{N}_]/u.test(ch);

/** Inline Markdown of one block's text into an array of nodes. */
export function renderInline(text, { links = true } = {}) {
  const nodes = [];
  let plain = "";
  const flush = () => {
    if (plain) nodes.push(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    const rest = text.slice(i);

    if (ch === "\\" && i + 1 < text.length && /[\\`*_{}[\]()#+\-.!~>]/.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }

    if (ch === "`") {
      const run = rest.match(/^`+/)[0];
      const close = text.indexOf(run, i + run.length);
      if (close !== -1) {
        flush();
        const code = el("code");
        code.textContent = text.slice(i + run.length, close).replace(/^ (.*) $/s, "$1");
        nodes.push(code);
        i = close + run.length;
        continue;
      }
      plain += run;
      i += run.length;
      continue;
    }

    const emphasis = matchEmphasis(text, i);
    if (emphasis) {
      flush();
      const node = el(emphasis.tag);
      node.append(...renderInline(emphasis.inner, { links }));
      nodes.push(node);
      i = emphasis.end;
      continue;
    }

    if (ch === "[" && links) {
      const m = rest.match(/^\[([^\]\n]+)\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"]*")?\s*\)/);
      if (m) {
        const href = safeUrl(m[2]);
        if (href) {
          flush();
          nodes.push(link(href, renderInline(m[1], { links: false })));
          i += m[0].length;
          continue;
        }
      }
    }

    if ((ch === "h" || ch === "H") && links && !isWordChar(text[i - 1])) {
      const m = rest.match(/^https?:\/\/[^\s<>"'`]+/i);
      if (m) {
        // Trailing punctuation ends a sentence, not the URL.
        let url = m[0].replace(/[.,;:!?*_~]+$/, "");
        if (url.endsWith(")") && !url.includes("(")) url = url.slice(0, -1);
        const href = safeUrl(url);
        if (href) {
          flush();
          const a = link(href, [document.createTextNode(url)]);
          nodes.push(a);
          i += url.length;
          continue;
        }
      }
    }

    plain += ch;
    i += 1;
  }
  flush();
  return nodes;
}

function matchEmphasis(text, i) {
  const ch = text[i];
  if (ch !== "*" && ch !== "_" && ch !== "~") return null;
  for (const [marker, tag] of [[ch + ch, ch === "~" ? "del" : "strong"], [ch, "em"]]) {
    if (ch === "~" && marker.length === 1) continue;
    if (!text.startsWith(marker, i)) continue;
    const start = i + marker.length;
    const next = text[start];
    if (next === undefined || /\s/.test(next) || next === ch) continue;
    // Underscores inside words (snake_case) are not emphasis.
    if (ch === "_" && isWordChar(text[i - 1])) continue;
    let close = start;
    while ((close = text.indexOf(marker, close + 1)) !== -1) {
      const before = text[close - 1];
      const after = text[close + marker.length];
      if (/\s/.test(before)) continue;
      if (marker.length === 1 && after === ch) {
        close += 1; // part of a longer run: skip it
        continue;
      }
      if (ch === "_" && isWordChar(after)) continue;
      return { tag, inner: text.slice(start, close), end: close + marker.length };
    }
  }
  return null;
}

function paragraph(lines) {
  const p = el("p");
  lines.forEach((line, index) => {
    if (index > 0) p.append(el("br"));
    p.append(...renderInline(line.trim()));
  });
  return p;
}

/** Parse list lines (already known to start a list) into nested <ul>/<ol>; returns [node, nextIndex]. */
function list(lines, start) {
  const first = lines[start].match(LIST_ITEM);
  const baseIndent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const root = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) root.start = parseInt(first[2], 10);
  let item = null;
  let itemLines = [];
  const flushItem = () => {
    if (item && itemLines.length) item.append(paragraphContent(itemLines));
    itemLines = [];
  };
  let i = start;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      // A blank line ends the list unless an indented item or continuation follows.
      const next = lines[i + 1];
      if (next !== undefined && (LIST_ITEM.test(next) || /^\s{2,}\S/.test(next)) &&
          leadingSpaces(next) >= baseIndent && (leadingSpaces(next) > baseIndent || sameKind(next, ordered))) {
        i += 1;
        continue;
      }
      break;
    }
    const m = line.match(LIST_ITEM);
    const indent = leadingSpaces(line);
    if (m && indent > baseIndent + 1 && item) {
      flushItem();
      const [nested, next] = list(lines, i);
      item.append(nested);
      i = next;
      continue;
    }
    if (m && indent <= baseIndent + 1) {
      if (!sameKind(line, ordered) || indent < baseIndent) break;
      flushItem();
      item = el("li");
      root.append(item);
      itemLines = [m[3]];
      i += 1;
      continue;
    }
    if (indent < baseIndent || (!item) || startsBlock(line)) break;
    itemLines.push(line.trim()); // a continuation line of the item
    i += 1;
  }
  flushItem();
  return [root, i];
}

function paragraphContent(lines) {
  const span = document.createDocumentFragment();
  lines.forEach((line, index) => {
    if (index > 0) span.append(el("br"));
    span.append(...renderInline(line));
  });
  return span;
}

const leadingSpaces = (line) => line.match(/^\s*/)[0].replace(/\t/g, "    ").length;
const sameKind = (line, ordered) => {
  const m = line.match(LIST_ITEM);
  return m && /\d/.test(m[2]) === ordered;
};
const startsBlock = (line) =>
  FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line);

/** Render Markdown text into a DocumentFragment of block nodes. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let para = [];
  const flushPara = () => {
    if (para.length) out.append(paragraph(para));
    para = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      flushPara();
      i += 1;
    } else if ((m = line.match(FENCE))) {
      flushPara();
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
      i += 1; // the closing fence (or past the end)
      const pre = el("pre");
      const code = el("code");
      if (m[2]) {
        code.className = `language-${m[2]}`;
        pre.dataset.language = m[2];
      }
      code.textContent = body.join("\n");
      pre.append(code);
      out.append(pre);
    } else if ((m = line.match(HEADING))) {
      flushPara();
      const heading = el(`h${m[1].length}`);
      heading.append(...renderInline(m[2]));
      out.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      flushPara();
      out.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      flushPara();
      const quoted = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) {
        quoted.push(m[1]);
        i += 1;
      }
      const quote = el("blockquote");
      quote.append(renderMarkdown(quoted.join("\n")));
      out.append(quote);
    } else if (LIST_ITEM.test(line) && (para.length === 0 || !/^\s*\d/.test(line) || /^\s*1[.)]/.test(line))) {
      flushPara();
      const [node, next] = list(lines, i);
      out.append(node);
      i = next;
    } else {
      para.push(line);
      i += 1;
    }
  }
  flushPara();
  return out;
}
