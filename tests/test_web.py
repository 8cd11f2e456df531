"""The chat page at /, driven in headless Chromium (Playwright) against a real server on loopback
with the dummy model (random weights: its answers are random text) and a conversation store in a
temporary SQLite file, so a page reload finds everything again.

Needs Debian's chromium at /usr/bin/chromium; without it the browser tests are skipped, saying
so, unless CHATSERVE_REQUIRE_BROWSER is set (.ci/run sets it, after installing chromium), which
makes them fail. Screenshots go to tests/artifacts/ (web.png: a
stored answer with Markdown; web-rich.png: a table, highlighted code, math; web-size-WIDTH-THEME.png
at 320, 390, 768 and 1280 px in both themes; web-phone-WIDTH-COUNT[-drawer].png; web-axe-THEME.png;
web-touch-*.png; web-copy.png, web-scrolled-up.png, web-stopped.png, web-branches.png,
web-injection.png, web-reasoning.png, web-reasoning-real.png; the sidebar alone:
web-sidebar-hover.png, web-sidebar-rename.png).

The accessibility checks inject axe-core (tests/vendor/axe-core/, see tests/vendor/README.md)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests

from chatserve.config import ServerConfig
from live_server import live_server, tiny_engine_config
from scripted_model import ANSWER, REASONING, write_scripted_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
TIMEOUT_MS = 30_000  # generous: a 2-core machine shared with other work
LONG_ANSWER = 1000  # max_tokens of the answers the tests stop: a few seconds of the dummy model

INJECTION = ('Look: <script>window.__pwned = "script"</script> and '
             '<img src=x onerror="window.__pwned = \'img\'"> and [a link](javascript:window.__pwned=1) '
             'and <a href="javascript:alert(1)">click</a>.\n\n**still bold** <b>not bold</b>')


@pytest.fixture(scope="module")
def db_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web") / "conversations.sqlite3"


@pytest.fixture(scope="module")
def server(db_path):
    # 256 blocks of 16 tokens: room for the long answer the stop test interrupts.
    with live_server(tiny_engine_config(num_kv_blocks=256), ServerConfig(db_path=str(db_path))) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run the web page tests"
        if os.environ.get("CHATSERVE_REQUIRE_BROWSER"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]'", pytrace=False)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """One browser context (its own localStorage) on the page, with the actions the tests repeat."""

    def __init__(self, browser, url: str, **context_options):
        from playwright.sync_api import expect

        self.expect = expect
        context_options.setdefault("viewport", {"width": 1280, "height": 820})
        self.context = browser.new_context(base_url=url, **context_options)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.open()

    def open(self) -> None:
        self.page.goto("/")
        self.page.wait_for_selector("body[data-ready=true]")

    def reload(self) -> None:
        self.page.reload()
        self.page.wait_for_selector("body[data-ready=true]")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"JavaScript errors on the page: {self.errors}"

    def new_chat_answered(self, text: str, **settings) -> str:
        """A new chat with these settings, `text` sent and its answer complete; the answer's id."""
        self.new_chat()
        self.settings(**settings)
        self.send(text)
        return self.wait_answer()

    def new_chat(self) -> None:
        """A new chat: a draft on the page, in no list until its first message."""
        self.page.click("#new-chat")
        self.expect(self.page.locator("#empty-state")).to_be_visible()
        self.expect(self.page.locator("#chat-title")).to_have_text("New chat")
        self.expect(self.page.locator("#conversation-list .conversation.active")).to_have_count(0)

    def settings(self, **fields) -> None:
        self.page.click("#chat-settings")
        for name, value in fields.items():
            self.page.fill(f"#setting-{name.replace('_', '-')}", str(value))
        self.page.click("#settings-save")
        self.expect(self.page.locator("#settings-dialog")).to_be_hidden()

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def messages(self, role: str):
        return self.page.locator(f"#messages article.message.{role}")

    def questions(self):
        """The text bubbles of the user messages on show."""
        return self.messages("user").locator(".bubble")

    def last_answer(self):
        return self.messages("assistant").last

    def wait_answer(self, status: str = "complete") -> str:
        """Waits for the last answer to finish; returns its id."""
        answer = self.last_answer()
        self.expect(answer).to_have_attribute("data-status", status)
        self.expect(self.page.locator("#send")).to_be_visible()
        return answer.get_attribute("data-id")

    def sidebar_item(self, title: str):
        return self.page.locator("#conversation-list .conversation", has_text=title)


@pytest.fixture
def page(browser, server):
    page = Page(browser, server.url)
    yield page
    page.close()


def screenshot(p, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / name))


def stop_long_answer(page: Page, keyboard: bool = False) -> None:
    """Asks for a long answer and clicks Stop (or, keyboard, types it and presses Enter, then Esc)
    once its text streams in; checks it ends stopped with its partial text. The random model may
    end an answer by itself with its stop token before the click lands: then it asks again."""
    from playwright.sync_api import Error as PlaywrightError

    p = page.page
    for attempt in range(5):
        answers = page.messages("assistant").count()
        if keyboard:
            page.page.keyboard.type(f"Tell me a long story, take {attempt + 1}")
            page.page.keyboard.press("Enter")
        else:
            page.send(f"Tell me a long story, take {attempt + 1}")
        # The new answer streaming in: its text shown, the Stop button up, the conversation marked
        # busy in the sidebar (or it ended already).
        p.wait_for_function("""(count) => {
            const answers = document.querySelectorAll("#messages article.assistant");
            if (answers.length <= count) return false;
            const answer = answers[answers.length - 1];
            if (answer.dataset.status !== "generating") return true;
            return answer.querySelector(".content").textContent.length > 0 && !document.querySelector("#stop").hidden
                && document.querySelector("#conversation-list .conversation.active.streaming") !== null;
        }""", arg=answers)
        if page.last_answer().get_attribute("data-status") == "generating":
            try:  # force: no waiting for the button to hold still while the page re-renders each frame
                if keyboard:
                    p.keyboard.press("Escape")
                else:
                    p.click("#stop", timeout=2000, force=True)
            except PlaywrightError:  # the answer ended meanwhile, and the button went away
                pass
        page.expect(page.last_answer()).to_have_attribute("data-status", re.compile("stopped|complete"))
        page.expect(p.locator("#send")).to_be_visible()
        if page.last_answer().get_attribute("data-status") == "stopped":
            break
    else:
        pytest.fail("every long answer ended by itself before the stop button was clicked")
    answer = page.last_answer()
    page.expect(answer.locator(".badge")).to_have_text("stopped")
    assert answer.locator(".content").inner_text().strip()
    page.expect(p.locator("#conversation-list .conversation.streaming")).to_have_count(0)
    stats = answer.locator(".stats")
    if stats.count():  # it must not have run to max_tokens
        assert int(re.match(r"(\d+) tokens", stats.inner_text()).group(1)) < LONG_ANSWER


def test_page_and_static_files_are_served(server):
    index = requests.get(f"{server.url}/", timeout=10)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in index.text
    policy = dict(part.strip().split(" ", 1) for part in index.headers["content-security-policy"].split(";"))
    assert policy["script-src"] == policy["style-src"] == policy["font-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and "unsafe" not in index.headers["content-security-policy"]
    for name, kind in [("app.js", "javascript"), ("render.js", "javascript"), ("style.css", "text/css"),
                       ("vendor/markdown-it/markdown-it.esm.min.js", "javascript"),
                       ("vendor/dompurify/purify.es.js", "javascript"),
                       ("vendor/highlight.js/highlight.min.js", "javascript"),
                       ("vendor/katex/katex.min.js", "javascript"), ("vendor/katex/katex.min.css", "text/css"),
                       ("vendor/katex/fonts/KaTeX_Main-Regular.woff2", "font/woff2")]:
        response = requests.get(f"{server.url}/static/{name}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    for gone in ("nothing.js", "markdown.js"):  # markdown.js: the hand-written renderer, replaced by render.js
        assert requests.get(f"{server.url}/static/{gone}", timeout=10).status_code == 404


def test_vendored_files_ship_in_the_package():
    """Every vendored file is package data (a wheel holds the page's libraries, fonts included),
    with its licence beside it and its package named in vendor/README.md."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from chatserve.server.app import WEB_DIR

    patterns = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["chatserve"]
    package = WEB_DIR.parents[1]  # src/chatserve
    shipped = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    vendor = WEB_DIR / "vendor"
    files = [path for path in vendor.rglob("*") if path.is_file()]
    assert len(files) > 20 and set(files) <= shipped, sorted(str(f) for f in set(files) - shipped)
    readme = (vendor / "README.md").read_text()
    for library in ("markdown-it", "dompurify", "highlight.js", "katex"):
        assert (vendor / library / "LICENSE").is_file(), library
        assert library in readme.lower(), library


def render(page: "Page", text: str) -> str:
    """text through the page's own renderer (render.js), into div#rendered; returns its HTML."""
    return page.page.evaluate("""async (text) => {
        const { renderMarkdown } = await import("/static/render.js");
        document.querySelector("#rendered")?.remove();
        const root = document.createElement("div");
        root.id = "rendered";
        root.className = "markdown";
        root.append(renderMarkdown(text));
        document.body.append(root);
        return root.innerHTML;
    }""", text)


def test_markdown_renderer(page):
    text = "\n".join([
        "# Title", "Some **bold**, *italic*, `code <b>x</b>` and a [link](https://example.com/a?b=1).",
        "Second line of the paragraph", "", "- one", "- two", "  - nested", "", "1. first", "2. second", "",
        "```python", "print('<script>')", "```", "", "Bare https://example.org/x, snake_case_name stays.",
        "", INJECTION,
    ])
    html = render(page, text)
    root = page.page.locator("#rendered")
    assert root.locator("h1").inner_text() == "Title"
    paragraph = root.locator("p").first
    assert paragraph.locator("strong").inner_text() == "bold"
    assert paragraph.locator("em").inner_text() == "italic"
    assert paragraph.locator("code").inner_text() == "code <b>x</b>"
    assert paragraph.locator("a").get_attribute("href") == "https://example.com/a?b=1"
    assert paragraph.locator("a").get_attribute("rel") == "noopener noreferrer nofollow"
    assert paragraph.locator("br").count() == 1
    assert root.locator("ul > li").count() == 3 and root.locator("ul > li > ul > li").inner_text() == "nested"
    assert root.locator("ol > li").all_inner_texts() == ["first", "second"]
    assert root.locator("pre > code.language-python").inner_text().strip() == "print('<script>')"
    assert root.locator("a[href='https://example.org/x']").inner_text() == "https://example.org/x"
    assert "snake_case_name" in root.inner_text()
    # The injection attempts are text, nothing else.
    assert root.locator("script, img, b, a[href^='javascript']").count() == 0
    assert "<script>" not in html and "<img" not in html and "<b>" not in html
    shown = root.inner_text()
    assert '<script>window.__pwned = "script"</script>' in shown
    assert "<img src=x onerror=" in shown and "[a link](javascript:window.__pwned=1)" in shown
    assert root.locator("strong", has_text="still bold").count() == 1
    assert page.page.evaluate("window.__pwned") is None


def test_formulas_are_typeset_once_while_an_answer_streams(page):
    """Rendered again with more text (as each frame of a streaming answer is), a formula already
    typeset is moved into the new rendering, not typeset again; a changed one is typeset anew."""
    same = page.page.evaluate("""async () => {
        const { renderMarkdown } = await import("/static/render.js");
        const root = document.createElement("div");
        document.body.append(root);
        root.append(renderMarkdown("Inline $a^2$ and\\n\\n$$\\\\int_0^1 x\\,dx$$\\n\\nmore", root));
        const [inline, display] = root.querySelectorAll(".math");
        root.replaceChildren(renderMarkdown("Inline $a^2$ and\\n\\n$$\\\\int_0^1 x\\,dx$$\\n\\nmore text $b$", root));
        const [inline2, display2, added] = root.querySelectorAll(".math");
        root.replaceChildren(renderMarkdown("Inline $a^3$", root));
        const [changed] = root.querySelectorAll(".math");
        return [inline === inline2, display === display2, Boolean(added.querySelector(".katex")),
                changed !== inline && changed.querySelector("annotation").textContent === "a^3"];
    }""")
    assert same == [True, True, True, True]


# Markdown that puts the injection payloads where markup is built around them: table cells, a code
# block's info string (which becomes a class name), link targets and texts, and math (TeX that
# KaTeX typesets).
INJECTION_IN_MARKUP = "\n".join([
    "| <script>window.__pwned = 'cell'</script> | <img src=x onerror=\"window.__pwned='cell'\"> |",
    "|---|---|",
    "| [cell link](javascript:window.__pwned='cell') | <a href=\"javascript:alert(1)\">click</a> |",
    "",
    "```python\" onmouseover=\"window.__pwned='info'\" x=\"",
    "print(1)",
    "```",
    "",
    "```<img src=x onerror=\"window.__pwned='info'\">",
    "code",
    "```",
    "",
    "[upper](JaVaScRiPt:window.__pwned='link') [data](data:text/html,<script>window.__pwned=1</script>)",
    "[relative](/v1/conversations) [<img src=x onerror=\"window.__pwned='label'\">](https://example.com/ok)",
    "[title](https://example.com/t \"x\\\" onmouseover=\\\"window.__pwned='title'\") <javascript:alert(1)>",
    "![image](https://example.com/pixel.png)",
    "",
    "Math $<img src=x onerror=\"window.__pwned='math'\">$ and $</span><script>window.__pwned='m'</script>$",
    "",
    "$$\\href{javascript:window.__pwned='href'}{click} \\url{javascript:alert(1)} \\htmlId{x}{y}$$",
    "",
    "\\[ \\includegraphics{https://example.com/x.png} \\]",
])


def test_injection_in_tables_code_links_and_math(browser, server):
    page = Page(browser, server.url, bypass_csp=True)  # the renderer alone must keep it inert
    try:
        check_injection_in_markup(page)
    finally:
        page.close()


def check_injection_in_markup(page: "Page") -> None:
    html = render(page, INJECTION_IN_MARKUP)
    root = page.page.locator("#rendered")
    assert root.locator("table th, table td").count() == 4  # the table itself is markup, its cells text
    assert root.locator("script, img, iframe, object, embed, svg image, [onerror], [onmouseover], "
                        "a[href^='javascript' i], a[href^='data' i], a[href^='/']").count() == 0, html
    assert "<script" not in html and "<img" not in html
    shown = root.inner_text()
    assert "<script>window.__pwned = 'cell'</script>" in shown
    assert "[cell link](javascript:window.__pwned='cell')" in shown
    # Links: only the absolute https ones are links, the others their text; an image is only a link
    # to it (never fetched by itself).
    assert root.locator("a").evaluate_all("links => links.map(a => a.href)") == [
        "https://example.com/ok", "https://example.com/t", "https://example.com/pixel.png"]
    assert "<img src=x onerror=" in root.locator("a").first.inner_text()
    assert "relative" in shown and "image" in shown
    # Math: KaTeX typeset what it could and shows the rest as text; no links, no HTML from TeX.
    math = root.locator(".math")
    assert math.evaluate_all("nodes => nodes.map((n) => Boolean(n.querySelector('.katex, .katex-error')))") == [
        True] * 4
    assert math.locator("a, [href]").count() == 0
    assert "\\href" in math.nth(2).inner_text()  # untrusted: shown as the command, not run
    page.page.wait_for_timeout(100)  # an onerror handler would have run by now
    assert page.page.evaluate("window.__pwned") is None


RICH = """| Model | Params | Context |
|:------|------:|--------:|
| Qwen2.5 | 0.5B | 32768 |
| SmolLM2 | 135M | 8192 |

```python
def area(r: float) -> float:
    return 3.14159 * r ** 2
```

The energy is $E = mc^2$, and the roots of $ax^2 + bx + c = 0$ are

$$
x = \\frac{-b \\pm \\sqrt{b^2 - 4ac}}{2a}
$$

which costs $5 or $10 to say."""


def test_tables_highlighted_code_and_math(browser, server, db_path):
    """A stored answer with a table, a fenced code block naming its language, inline and display
    math: the page (under its own Content-Security-Policy) shows a <table>, code coloured by
    highlight.js, and formulas typeset by KaTeX in its own fonts, served by this server."""
    from chatserve.server.store import Store

    store = Store.open(str(db_path))
    try:
        store_exchange(store, "Rich answer", "Show me everything", RICH)
    finally:
        store.close()
    page = Page(browser, server.url)
    try:
        p = page.page
        p.evaluate("""() => {
            window.__violations = [];
            document.addEventListener("securitypolicyviolation",
                                      (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
        }""")
        page.sidebar_item("Rich answer").click()
        content = page.last_answer().locator(".content")
        table = content.locator("table")
        page.expect(table.locator("th")).to_have_text(["Model", "Params", "Context"])
        page.expect(table.locator("tbody tr")).to_have_count(2)
        page.expect(table.locator("tbody tr").first.locator("td")).to_have_text(["Qwen2.5", "0.5B", "32768"])
        assert table.locator("td").nth(1).evaluate("td => getComputedStyle(td).textAlign") == "right"

        code = content.locator("pre > code.hljs.language-python")
        page.expect(code.locator(".hljs-keyword").first).to_have_text("def")
        page.expect(code.locator(".hljs-title")).to_have_text("area")
        assert code.locator(".hljs-number").count() >= 2
        keyword, plain = code.locator(".hljs-keyword").first.evaluate(
            "k => [getComputedStyle(k).color, getComputedStyle(k.closest('code')).color]")
        assert keyword != plain  # coloured by the page's palette

        inline = content.locator("p .katex:not(.katex-display .katex)")
        page.expect(inline).to_have_count(2)
        assert inline.first.locator("annotation").text_content() == "E = mc^2"  # the MathML for screen readers
        display = content.locator(".katex-display")
        page.expect(display).to_have_count(1)
        assert display.locator("annotation").text_content() == "x = \\frac{-b \\pm \\sqrt{b^2 - 4ac}}{2a}"
        assert display.locator(".mfrac").count() == 1 and display.locator(".sqrt").count() == 1
        assert "costs $5 or $10 to say" in content.inner_text()  # dollars, not math
        # KaTeX's layout is there (its struts' heights: styles the CSP would refuse as attributes) and
        # its fonts came from this server.
        assert display.locator(".katex-html").evaluate(
            "html => [...html.querySelectorAll('span')].filter((s) => s.style.height).length") > 3
        fonts = p.evaluate("""async () => {
            await document.fonts.ready;
            return [...document.fonts].filter((f) => f.family.includes("KaTeX") && f.status === "loaded")
                                      .map((f) => f.family);
        }""")
        assert "KaTeX_Main" in fonts and "KaTeX_Math" in fonts, fonts
        assert p.evaluate("window.__violations") == []
        # The policy holds: an inline script does not run, a style attribute is refused (why KaTeX
        # sets its styles through the CSSOM).
        refused = p.evaluate("""async () => {
            const script = document.createElement("script");
            script.textContent = "window.__inline = true";
            document.body.append(script);
            const box = document.createElement("div");
            box.setAttribute("style", "color: rgb(1, 2, 3)");
            document.body.append(box);
            await new Promise((resolve) => setTimeout(resolve, 100));
            return [window.__inline === undefined, getComputedStyle(box).color !== "rgb(1, 2, 3)"];
        }""")
        assert refused == [True, True]
        screenshot(p, "web-rich.png")
    finally:
        page.close()


COPY_CODE = "for i in range(3):\n\tprint(f\"<{i}>  é ✓\")   \n\n# done"
COPY_ANSWER = f"Here is **the loop**:\n\n```python\n{COPY_CODE}\n```\n\nAnd a shell one:\n\n```\nls -la ~\n```\n"


def test_copy_buttons_put_the_exact_text_on_the_clipboard(browser, server, db_path):
    """Each answer has a Copy button (its Markdown, as the model wrote it) and each code block one
    (the code alone, exactly: tabs, trailing spaces, blank lines, no fence)."""
    from chatserve.server.store import Store

    store = Store.open(str(db_path))
    try:
        store_exchange(store, "Copy me", "A loop, please", COPY_ANSWER)
    finally:
        store.close()
    page = Page(browser, server.url, permissions=["clipboard-read", "clipboard-write"])
    try:
        p = page.page
        clipboard = lambda: p.evaluate("navigator.clipboard.readText()")  # noqa: E731
        page.sidebar_item("Copy me").click()
        answer = page.last_answer()
        blocks = answer.locator(".code-block")
        page.expect(blocks).to_have_count(2)
        page.expect(blocks.first.locator(".code-language")).to_have_text("python")
        blocks.first.locator("button.copy").click()
        page.expect(blocks.first.locator("button.copy")).to_have_text("Copied")
        assert clipboard() == COPY_CODE
        blocks.nth(1).locator("button.copy").click()
        assert clipboard() == "ls -la ~"
        answer.locator(".message-meta button.copy").click()
        page.expect(answer.locator(".message-meta button.copy")).to_have_text("Copied")
        assert clipboard() == COPY_ANSWER
        page.expect(answer.locator(".message-meta button.copy")).to_have_text("Copy")  # after a moment
        page.expect(page.messages("user").locator("button.copy")).to_have_count(0)
        screenshot(p, "web-copy.png")
    finally:
        page.close()


def test_answer_streams_in_and_stops(page):
    p = page.page
    page.new_chat()
    page.settings(max_tokens=200)
    # Record the answer's length on every change, to see it grow while it is still generating.
    p.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const answer = [...document.querySelectorAll("#messages article.assistant")].pop();
            if (answer) window.__lengths.push([answer.dataset.status,
                                               answer.querySelector(".content").textContent.length]);
        }).observe(document.querySelector("#messages"), {childList: true, subtree: true, characterData: true});
    }""")
    page.send("Hello there")
    page.expect(page.questions()).to_have_text(["Hello there"])
    page.wait_answer()
    growing = {length for status, length in p.evaluate("window.__lengths") if status == "generating" and length}
    assert len(growing) >= 2, f"the answer did not stream in: {p.evaluate('window.__lengths')}"
    assert page.last_answer().locator(".content").inner_text().strip()
    page.expect(page.last_answer().locator(".stats")).to_have_text(
        re.compile(r"\d+ tokens · [\d.]+ tok/s · \d+ (ms|\.\d+ s) to first token · \d+/\d+ prompt tokens cached"))
    # The first message names the conversation; its KV blocks are still cached.
    page.expect(p.locator("#chat-title")).to_have_text("Hello there")
    page.expect(p.locator("#conversation-list .conversation.active .title")).to_have_text("Hello there")
    page.expect(p.locator("#conversation-list .conversation.active .warm-dot")).to_have_class(re.compile("warm"))

    # Shift+Enter is a new line, not a send.
    p.fill("#input", "one")
    p.press("#input", "Shift+Enter")
    p.type("#input", "two")
    assert p.input_value("#input") == "one\ntwo"
    page.expect(page.messages("user")).to_have_count(1)

    # A long answer, stopped mid-stream: the partial text stays, marked stopped; by the stop route
    # first, then by closing the connection (the page's fallback when the route fails).
    page.settings(max_tokens=LONG_ANSWER)
    stop_long_answer(page)
    screenshot(p, "web-stopped.png")
    p.route("**/stop", lambda route: route.abort())
    try:
        stop_long_answer(page)
    finally:
        p.unroute("**/stop")
    partial = page.last_answer().locator(".content").inner_text()

    page.reload()  # the page reopens the last conversation, as stored
    page.expect(page.questions().first).to_have_text("Hello there")
    page.expect(page.questions().last).to_have_text(re.compile("Tell me a long story"))
    page.expect(page.last_answer()).to_have_attribute("data-status", "stopped")
    assert page.last_answer().locator(".content").inner_text() == partial


def tab_to(p, selector: str, limit: int = 200) -> None:
    """Presses Tab until the focus is on selector."""
    for _ in range(limit):
        if p.evaluate("(s) => document.activeElement?.matches(s) ?? false", selector):
            return
        p.keyboard.press("Tab")
    pytest.fail(f"Tab never reached {selector}")


def test_keyboard_only(page):
    """Without a mouse: a new chat, settings, a message typed and sent, Esc stops its answer,
    Regenerate, and the version arrows, the focus staying on them as the versions change."""
    p, expect = page.page, page.expect
    tab_to(p, "#new-chat")
    p.keyboard.press("Enter")
    expect(p.locator("#chat-title")).to_have_text("New chat")
    expect(p.locator("#input")).to_be_focused()
    tab_to(p, "#chat-settings")
    p.keyboard.press("Enter")
    expect(p.locator("#settings-dialog")).to_be_visible()
    tab_to(p, "#setting-max-tokens")
    p.keyboard.type(str(LONG_ANSWER))
    p.keyboard.press("Enter")  # submits the form
    expect(p.locator("#settings-dialog")).to_be_hidden()
    tab_to(p, "#input")
    stop_long_answer(page, keyboard=True)
    expect(page.questions()).to_have_text([re.compile("Tell me a long story")] * page.questions().count())
    first = page.last_answer().get_attribute("data-id")

    tab_to(p, "#messages article.assistant:last-of-type button.regenerate")
    p.keyboard.press("Enter")
    expect(page.last_answer()).not_to_have_attribute("data-id", first)
    p.keyboard.press("Escape")  # stops it, unless it ended already
    expect(page.last_answer()).to_have_attribute("data-status", re.compile("stopped|complete"))
    expect(p.locator("#send")).to_be_visible()
    second = page.last_answer().get_attribute("data-id")
    nav = page.last_answer().locator(".branch-nav")
    expect(nav.locator(".branch-index")).to_have_text("2/2")
    tab_to(p, "#messages article.assistant:last-of-type .branch-nav button.prev")
    p.keyboard.press("Enter")
    expect(page.last_answer()).to_have_attribute("data-id", first)
    expect(nav.locator(".branch-index")).to_have_text("1/2")
    expect(nav.locator("button.next")).to_be_focused()  # the arrow pressed is disabled at the end
    p.keyboard.press("Enter")
    expect(page.last_answer()).to_have_attribute("data-id", second)
    expect(nav.locator("button.prev")).to_be_focused()


def test_new_chat_is_stored_with_its_first_message(browser, tmp_path):
    """"+ New chat" stores nothing; the settings chosen for it wait on the page; the first message
    stores the conversation with them."""
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(tmp_path / "draft.sqlite3"))) as srv:
        listed = lambda: requests.get(f"{srv.url}/v1/conversations", timeout=10).json()["data"]  # noqa: E731
        page = Page(browser, srv.url)
        try:
            page.new_chat()
            page.settings(max_tokens=6, system_prompt="Be brief.")
            page.new_chat()  # again: still the one draft, settings kept
            page.page.click("#chat-settings")
            page.expect(page.page.locator("#conversation-settings legend")).to_have_text("A new conversation")
            page.expect(page.page.locator("#setting-max-tokens")).to_have_value("6")
            page.page.click("#settings-cancel")
            page.reload()
            assert listed() == []
            page.new_chat_answered("First words", max_tokens=6, system_prompt="Be brief.")
            (stored,) = listed()
            assert stored["title"] == "First words" and stored["system_prompt"] == "Be brief."
            assert stored["params"]["max_tokens"] == 6
            page.expect(page.sidebar_item("First words")).to_have_class(re.compile("active"))
            page.new_chat()
            page.expect(page.page.locator("#conversation-list .conversation")).to_have_count(1)
            assert len(listed()) == 1
        finally:
            page.close()


def test_theme_switch_is_remembered(page):
    """The theme select: Dark and Light override the system's (this browser's is light), System
    follows it again; the choice outlives a reload."""
    p, expect = page.page, page.expect
    background = lambda: p.evaluate("getComputedStyle(document.body).backgroundColor")  # noqa: E731
    light = background()
    assert light == "rgb(255, 255, 255)"
    p.select_option("#theme", "dark")
    expect(p.locator("html")).to_have_attribute("data-theme", "dark")
    dark = background()
    assert dark != light
    page.reload()
    assert background() == dark
    expect(p.locator("#theme")).to_have_value("dark")
    p.emulate_media(color_scheme="dark")
    p.select_option("#theme", "light")
    assert background() == light  # the system says dark: the choice wins
    p.select_option("#theme", "system")
    assert background() == dark
    assert p.evaluate("localStorage.getItem('chatserve.theme')") is None
    page.reload()
    expect(p.locator("#theme")).to_have_value("system")
    assert p.evaluate("document.documentElement.dataset.theme") is None
    p.emulate_media(color_scheme="light")
    assert background() == light


def test_scroll_to_bottom_button_and_timestamps(browser, server, db_path):
    """A long answer scrolled up shows the scroll-to-bottom button, which goes back to the end;
    each message shows when it was written (the stored time)."""
    from chatserve.server.store import Store

    store = Store.open(str(db_path))
    try:
        store_exchange(store, "A long read", "Tell me everything",
                       "\n\n".join(f"Paragraph {i}: " + "words " * 40 for i in range(40)))
    finally:
        store.close()
    page = Page(browser, server.url)
    try:
        p, expect = page.page, page.expect
        page.sidebar_item("A long read").click()
        button, messages = p.locator("#to-bottom"), p.locator("#messages")
        expect(page.last_answer()).to_be_visible()
        expect(button).to_be_hidden()  # opened at the end
        messages.evaluate("m => m.scrollTo(0, 0)")
        expect(button).to_be_visible()
        screenshot(p, "web-scrolled-up.png")
        button.click()
        p.wait_for_function("() => { const m = document.querySelector('#messages');"
                            " return m.scrollHeight - m.scrollTop - m.clientHeight < 2; }")
        expect(button).to_be_hidden()

        stored = requests.get(f"{server.url}/v1/conversations", timeout=10).json()["data"]
        conversation = next(c for c in stored if c["title"] == "A long read")
        full = requests.get(f"{server.url}/v1/conversations/{conversation['id']}", timeout=10).json()
        for message, role in zip(full["messages"], ("user", "assistant")):
            shown = page.messages(role).last.locator("time.timestamp")
            expect(shown).to_have_count(1)
            iso = p.evaluate("(s) => new Date(s * 1000).toISOString()", message["created"])
            expect(shown).to_have_attribute("datetime", iso)
            expect(shown).to_have_text(re.compile(r"\d{1,2}:\d{2}"))
    finally:
        page.close()


def test_edit_regenerate_and_branch_arrows(page):
    p = page.page
    page.new_chat()
    page.settings(max_tokens=12)
    page.send("First question")
    first_answer = page.wait_answer()

    page.last_answer().locator("button.regenerate").click()
    page.expect(page.last_answer()).not_to_have_attribute("data-id", first_answer)
    second_answer = page.wait_answer()
    nav = page.last_answer().locator(".branch-nav")
    page.expect(nav.locator(".branch-index")).to_have_text("2/2")
    page.expect(page.messages("user")).to_have_count(1)

    nav.locator("button.prev").click()
    page.expect(page.last_answer()).to_have_attribute("data-id", first_answer)
    page.expect(page.last_answer().locator(".branch-index")).to_have_text("1/2")
    page.expect(page.last_answer().locator("button.prev")).to_be_disabled()
    page.last_answer().locator("button.next").click()
    page.expect(page.last_answer()).to_have_attribute("data-id", second_answer)

    # Edit the question: a new branch beside the old one, answered afresh.
    user = page.messages("user").first
    user.locator("button.edit").click()
    p.fill("#messages .edit-box textarea", "Second question")
    p.press("#messages .edit-box textarea", "Enter")
    page.expect(page.questions()).to_have_text([re.compile("Second question")])
    edited_answer = page.wait_answer()
    assert edited_answer not in (first_answer, second_answer)
    user = page.messages("user").first
    page.expect(user.locator(".branch-index")).to_have_text("2/2")
    page.expect(page.last_answer().locator(".branch-nav")).to_have_count(0)  # its only answer

    user.locator("button.prev").click()
    page.expect(page.messages("user").first.locator(".bubble")).to_have_text("First question")
    page.expect(page.messages("user").first.locator(".branch-index")).to_have_text("1/2")
    assert page.last_answer().get_attribute("data-id") in (first_answer, second_answer)
    page.expect(page.last_answer().locator(".branch-index")).to_have_text(re.compile("[12]/2"))
    page.messages("user").first.locator("button.next").click()
    page.expect(page.messages("user").first.locator(".bubble")).to_have_text("Second question")
    page.expect(page.last_answer()).to_have_attribute("data-id", edited_answer)

    # The branch on show is stored: a reload shows the same one.
    page.reload()
    page.expect(page.messages("user").first.locator(".bubble")).to_have_text("Second question")
    page.expect(page.last_answer()).to_have_attribute("data-id", edited_answer)

    page.messages("user").first.locator("button.prev").click()  # a richer page for the screenshot
    page.expect(page.messages("user").first.locator(".branch-index")).to_have_text("1/2")
    screenshot(p, "web-branches.png")


def length_stopped_answer(page: Page, max_tokens: int = 4) -> str:
    """A new chat whose answer runs to max_tokens (the random model may end one by itself with its
    stop token first: then it regenerates); returns the answer's text."""
    page.new_chat()
    page.settings(max_tokens=max_tokens)
    page.send("Say something long")
    for _ in range(5):
        page.wait_answer()
        if page.last_answer().locator(".badge.length").count():
            return page.last_answer().locator(".content").inner_text()
        page.last_answer().locator("button.regenerate").click()
        page.expect(page.last_answer()).to_have_attribute("data-status", "generating")
    pytest.fail("every answer ended by itself before max_tokens")


def stored_branch(server, page: Page) -> list[dict]:
    """The messages of the open conversation's branch, as the server has them."""
    conversation_id = page.page.evaluate("localStorage.getItem('chatserve.lastConversation')")
    return requests.get(f"{server.url}/v1/conversations/{conversation_id}", timeout=10).json()["messages"]


def test_continue_a_length_stopped_answer(page, server):
    """An answer cut by max_tokens has a Continue button: the extension streams into the same
    message, which grows from the text it had; a question has none. So has an answer stopped by
    the user, while it is its branch's last message."""
    from playwright.sync_api import Error as PlaywrightError

    p = page.page
    length_stopped_answer(page)
    answer = page.last_answer()
    answer_id = answer.get_attribute("data-id")
    before = stored_branch(server, page)[-1]["content"]
    page.expect(answer.locator("button.continue")).to_have_count(1)
    page.expect(page.messages("user").locator("button.continue")).to_have_count(0)
    answer.locator("button.continue").click()
    page.expect(page.last_answer()).to_have_attribute("data-status", re.compile("complete|stopped"))
    page.expect(p.locator("#send")).to_be_visible()
    page.expect(page.messages("assistant")).to_have_count(1)  # no new message, no sibling
    answer = page.last_answer()
    assert answer.get_attribute("data-id") == answer_id
    page.expect(answer.locator(".branch-nav")).to_have_count(0)
    after = stored_branch(server, page)[-1]
    assert after["id"] == answer_id and after["content"].startswith(before) and len(after["content"]) > len(before)
    shown = answer.locator(".content").inner_text()
    page.reload()  # stored: the same message, the longer text
    page.expect(page.last_answer()).to_have_attribute("data-id", answer_id)
    assert page.last_answer().locator(".content").inner_text() == shown

    # An answer the user stopped goes on too, and its continuation stops with the Stop button.
    page.settings(max_tokens=LONG_ANSWER)
    stop_long_answer(page)
    stopped_id = page.last_answer().get_attribute("data-id")
    before = stored_branch(server, page)[-1]["content"]
    page.expect(page.messages("assistant").first.locator("button.continue")).to_have_count(0)  # not the last
    page.last_answer().locator("button.continue").click()
    page.expect(page.last_answer()).to_have_attribute("data-status", "generating")
    p.wait_for_function("""(length) => {
        const answer = [...document.querySelectorAll("#messages article.assistant")].pop();
        return answer.dataset.status !== "generating" || answer.querySelector(".content").textContent.length > length;
    }""", arg=len(page.last_answer().locator(".content").inner_text()))
    try:
        p.click("#stop", timeout=2000, force=True)
    except PlaywrightError:  # the continuation ended by itself meanwhile
        pass
    page.wait_answer(re.compile("stopped|complete"))
    after = stored_branch(server, page)[-1]
    assert after["id"] == stopped_id and after["content"].startswith(before) and len(after["content"]) > len(before)
    page.expect(page.messages("assistant")).to_have_count(2)


def test_delete_a_message_with_a_confirm(page, server):
    """Each message has a delete button; after a confirm, the message and its replies go (an only
    answer takes its question); dismissing the confirm deletes nothing."""
    p = page.page
    page.new_chat_answered("keep this question", max_tokens=4)
    page.send("delete this question")
    page.wait_answer()
    page.expect(page.questions()).to_have_count(2)
    answer = page.last_answer()
    page.expect(answer.locator("button.delete-message")).to_have_attribute("aria-label", "Delete this answer")
    p.once("dialog", lambda dialog: dialog.dismiss())
    answer.locator("button.delete-message").click()
    page.expect(page.questions()).to_have_count(2)
    assert len(stored_branch(server, page)) == 4
    p.once("dialog", lambda dialog: dialog.accept())
    page.last_answer().locator("button.delete-message").click()
    page.expect(page.questions()).to_have_text(["keep this question"])  # the only answer took its question
    page.expect(page.messages("assistant")).to_have_count(1)
    assert [m["content"] for m in stored_branch(server, page)][0] == "keep this question"
    assert len(stored_branch(server, page)) == 2
    # Deleting the first question takes everything; the conversation stays, empty.
    p.once("dialog", lambda dialog: dialog.accept())
    page.messages("user").first.locator("button.delete-message").click()
    page.expect(p.locator("#empty-state")).to_be_visible()
    assert stored_branch(server, page) == []
    page.expect(p.locator("#chat-title")).to_have_text("keep this question")


def test_search_finds_conversations_and_opens_them(page):
    p = page.page
    page.new_chat_answered("Where do quokkas live?", max_tokens=4)
    page.new_chat()
    p.fill("#search", "quokkas")
    results = p.locator("#search-results .search-result")
    page.expect(results).to_have_count(1)
    page.expect(p.locator("#conversation-list")).to_be_hidden()
    page.expect(p.locator("#search-status")).to_have_text("1 found")
    page.expect(results.first.locator("mark")).to_have_text(["quokkas"])
    results.first.locator(".open").click()
    page.expect(p.locator("#chat-title")).to_have_text("Where do quokkas live?")
    page.expect(page.questions()).to_have_text(["Where do quokkas live?"])
    # A prefix; nothing found; a query FTS5 cannot read says so; Esc clears the search.
    p.fill("#search", "quokk*")
    page.expect(results).to_have_count(1)
    p.fill("#search", "wombatsnotthere")
    page.expect(p.locator("#search-status")).to_have_text("Nothing found")
    page.expect(results).to_have_count(0)
    p.fill("#search", '"unclosed')
    page.expect(p.locator("#search-status")).to_have_text(re.compile("^Search failed: "))
    p.press("#search", "Escape")
    page.expect(p.locator("#search")).to_have_value("")
    page.expect(p.locator("#search-results")).to_be_hidden()
    page.expect(p.locator("#conversation-list")).to_be_visible()
    page.expect(page.sidebar_item("Where do quokkas live?")).to_have_count(1)


def test_export_json_and_markdown_and_import(page, tmp_path):
    """Settings download the open conversation as JSON (the whole tree) and Markdown (the branch on
    show); Import takes the JSON back as a new conversation, opened."""
    import json

    p = page.page
    page.new_chat_answered("Export me please", max_tokens=4)
    page.last_answer().locator("button.regenerate").click()  # two versions: the tree, not just the branch
    page.wait_answer()
    answer = page.last_answer().locator(".content").inner_text()
    p.click("#chat-settings")
    with p.expect_download() as download:
        p.click("#export-json")
    assert download.value.suggested_filename == "Export me please.json"
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["object"] == "conversation.export" and exported["title"] == "Export me please"
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "assistant"]
    with p.expect_download() as download:
        p.click("#export-markdown")
    assert download.value.suggested_filename == "Export me please.md"
    markdown = Path(download.value.path()).read_text()
    assert markdown.startswith("# Export me please") and "## You\n\nExport me please" in markdown

    saved = tmp_path / "export.json"
    saved.write_text(json.dumps(exported))
    with p.expect_file_chooser() as chooser:
        p.click("#import")
    chooser.value.set_files(str(saved))
    page.expect(p.locator("#settings-dialog")).to_be_hidden()
    page.expect(page.sidebar_item("Export me please")).to_have_count(2)
    page.expect(p.locator("#conversation-list .conversation.active .title")).to_have_text("Export me please")
    page.expect(page.questions()).to_have_text(["Export me please"])
    page.expect(page.last_answer().locator(".branch-index")).to_have_text("2/2")
    assert page.last_answer().locator(".content").inner_text() == answer
    imported_id = p.evaluate("localStorage.getItem('chatserve.lastConversation')")
    assert imported_id not in {m["id"] for m in exported["messages"]}

    # Not JSON: said in the dialog, nothing imported.
    bad = tmp_path / "notes.json"
    bad.write_text("not json")
    p.click("#chat-settings")
    with p.expect_file_chooser() as chooser:
        p.click("#import")
    chooser.value.set_files(str(bad))
    page.expect(p.locator("#settings-error")).to_have_text(re.compile("notes.json is not JSON"))
    p.click("#settings-cancel")
    page.expect(page.sidebar_item("Export me please")).to_have_count(2)


def test_settings_show_every_sampling_value_with_its_source(browser, tmp_path):
    """Settings have a field for every sampling value the API takes; under each, the value answers
    get and where it comes from (GET .../sampling): the server's override, the built-in default, or
    the conversation's own once set; they are stored with the conversation."""
    engine_config = tiny_engine_config(override_generation_config={"top_p": 0.5})
    with live_server(engine_config, ServerConfig(db_path=str(tmp_path / "sampling.sqlite3"))) as srv:
        page = Page(browser, srv.url)
        try:
            p = page.page
            names = ["temperature", "top-p", "top-k", "min-p", "repetition-penalty", "presence-penalty",
                     "frequency-penalty", "max-tokens", "seed", "stop"]
            p.click("#chat-settings")
            for name in names:
                page.expect(p.locator(f"#setting-{name}")).to_be_visible()
            page.expect(p.locator("#setting-top-p-effective")).to_have_text("0.5 · the server's")
            page.expect(p.locator("#setting-temperature-effective")).to_have_text("1 · built-in")
            page.expect(p.locator("#setting-seed-effective")).to_have_text("random · built-in")
            page.expect(p.locator("#setting-stop-effective")).to_have_text("none · built-in")
            p.click("#settings-cancel")
            # A draft's settings go with its first message; then each shows as the conversation's.
            page.settings(max_tokens=4, top_k=5, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5,
                          frequency_penalty=-0.5, seed=42, stop="END\\nhere\nSTOP")
            page.send("Sample me")
            page.wait_answer()
            p.click("#chat-settings")
            page.expect(p.locator("#setting-top-k")).to_have_value("5")
            page.expect(p.locator("#setting-stop")).to_have_value("END\\nhere\nSTOP")
            page.expect(p.locator("#setting-top-k-effective")).to_have_text("5 · this conversation")
            page.expect(p.locator("#setting-stop-effective")).to_have_text('"END\\nhere" "STOP" · this conversation')
            page.expect(p.locator("#setting-top-p-effective")).to_have_text("0.5 · the server's")
            # Edited: only this conversation's values change; emptied: back to the server's.
            p.fill("#setting-top-p", "0.9")
            p.fill("#setting-seed", "")
            p.click("#settings-save")
            page.expect(p.locator("#settings-dialog")).to_be_hidden()
            conversation_id = p.evaluate("localStorage.getItem('chatserve.lastConversation')")
            params = requests.get(f"{srv.url}/v1/conversations/{conversation_id}", timeout=10).json()["params"]
            assert params == {"temperature": None, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                              "presence_penalty": 0.5, "frequency_penalty": -0.5, "max_tokens": 4, "seed": None,
                              "stop": ["END\nhere", "STOP"]}
            p.click("#chat-settings")
            page.expect(p.locator("#setting-top-p-effective")).to_have_text("0.9 · this conversation")
            # A value out of the API's bounds is refused in the dialog (the field's own range); nothing saved.
            p.fill("#setting-min-p", "3")
            p.click("#settings-save")
            page.expect(p.locator("#setting-min-p:invalid")).to_have_count(1)
            page.expect(p.locator("#settings-dialog")).to_be_visible()
            p.click("#settings-cancel")
            assert requests.get(f"{srv.url}/v1/conversations/{conversation_id}", timeout=10).json()["params"] == params
        finally:
            page.close()


def test_context_usage_of_the_model_context(browser, tmp_path):
    """Under the composer: the tokens the conversation takes (its last answer's prompt and answer)
    of the model's context length, growing each turn, in the danger colour from 80%."""
    engine_config = tiny_engine_config(max_model_len=160)
    with live_server(engine_config, ServerConfig(db_path=str(tmp_path / "context.sqlite3"))) as srv:
        page = Page(browser, srv.url)
        try:
            p = page.page
            usage = p.locator("#context-usage")
            page.expect(usage).to_be_hidden()  # nothing said yet
            page.settings(max_tokens=4)
            page.send("How much room is left?")
            page.wait_answer()
            page.expect(usage).to_be_visible()
            stats = stored_branch(srv, page)[-1]["stats"]
            used = stats["prompt_tokens"] + stats["completion_tokens"]
            page.expect(p.locator("#context-text")).to_have_text(
                f"{used} of 160 context tokens ({round(used * 100 / 160)}%)")
            assert requests.get(f"{srv.url}/v1/conversations/sampling", timeout=10).json()["context_length"] == 160
            page.expect(usage).not_to_have_class(re.compile("nearly-full"))
            width = p.eval_on_selector("#context-fill", "e => e.getBoundingClientRect().width")
            assert width > 0
            for turn in range(6):
                if "nearly-full" in (usage.get_attribute("class") or ""):
                    break
                page.settings(max_tokens=16)
                page.send(f"And now? {turn}")
                page.wait_answer(re.compile("complete|stopped"))
                stats = stored_branch(srv, page)[-1]["stats"]
                grown = stats["prompt_tokens"] + stats["completion_tokens"]
                assert grown > used
                used = grown
                page.expect(p.locator("#context-text")).to_have_text(re.compile(f"^{used} of 160 "))
            page.expect(usage).to_have_class(re.compile("nearly-full"))
            assert p.eval_on_selector("#context-fill", "e => e.getBoundingClientRect().width") > width
            page.new_chat()
            page.expect(usage).to_be_hidden()
        finally:
            page.close()


def test_conversations_switch_rename_delete_and_reload(page):
    p = page.page
    expect = page.expect
    page.new_chat_answered("alpha message", max_tokens=8)
    page.new_chat_answered("beta message", max_tokens=8, system_prompt="Be brief.", temperature=0.5)

    page.sidebar_item("alpha message").click()
    expect(page.questions()).to_have_text(["alpha message"])
    expect(p.locator("#chat-title")).to_have_text("alpha message")
    page.sidebar_item("beta message").click()
    expect(page.questions()).to_have_text(["beta message"])

    # Each item's rename and delete buttons: labelled icons, shown on hover and on keyboard focus.
    alpha, beta = page.sidebar_item("alpha message"), page.sidebar_item("beta message")
    expect(alpha.locator(".item-actions")).to_have_css("opacity", "0")
    expect(alpha.locator("button.rename")).to_have_attribute("aria-label", "Rename “alpha message”")
    expect(alpha.locator("button.delete")).to_have_attribute("aria-label", "Delete “alpha message”")
    expect(alpha.locator("button.delete")).to_have_attribute("title", "Delete")
    alpha.hover()
    expect(alpha.locator(".item-actions")).to_have_css("opacity", "1")
    alpha.locator("button.delete").hover()
    screenshot(p.locator("#sidebar"), "web-sidebar-hover.png")

    # Rename the open conversation in place; Enter saves.
    beta.hover()
    beta.locator("button.rename").click()
    field = p.locator("#conversation-list .rename-field")
    expect(field).to_be_focused()
    expect(field).to_have_value("beta message")
    field.fill("Renamed chat")
    field.press("Enter")
    expect(field).to_have_count(0)
    expect(p.locator("#chat-title")).to_have_text("Renamed chat")
    expect(page.sidebar_item("Renamed chat")).to_have_count(1)

    # Rename one that is not open, from the keyboard: F2 starts, Escape cancels, Enter saves.
    alpha.locator("button.open").focus()
    expect(alpha.locator(".item-actions")).to_have_css("opacity", "1")
    p.keyboard.press("F2")
    expect(field).to_be_focused()
    p.keyboard.type("never saved")
    screenshot(p.locator("#sidebar"), "web-sidebar-rename.png")
    p.keyboard.press("Escape")
    expect(field).to_have_count(0)
    expect(alpha.locator("button.open")).to_be_focused()
    expect(alpha.locator(".title")).to_have_text("alpha message")
    alpha.locator("button.rename").click()
    field.fill("Alpha renamed")
    field.press("Enter")
    alpha = page.sidebar_item("Alpha renamed")
    expect(p.locator("#conversation-list .conversation").first).to_have_text("Alpha renamed")  # updated now
    expect(alpha.locator("button.open")).to_be_focused()
    expect(p.locator("#chat-title")).to_have_text("Renamed chat")  # still the open one
    expect(page.questions()).to_have_text(["beta message"])

    # Delete one that is not open: asks first; the open conversation stays.
    p.once("dialog", lambda dialog: dialog.dismiss())
    alpha.hover()
    alpha.locator("button.delete").click()
    expect(alpha).to_have_count(1)
    p.once("dialog", lambda dialog: dialog.accept())
    alpha.locator("button.delete").click()
    expect(alpha).to_have_count(0)
    expect(p.locator("#chat-title")).to_have_text("Renamed chat")
    expect(page.questions()).to_have_text(["beta message"])

    # Delete the open one: the conversation that takes its place in the list opens.
    page.new_chat()
    page.send("gamma message")
    page.wait_answer()
    new = page.sidebar_item("gamma message")
    expect(new).to_have_class(re.compile("active"))
    p.once("dialog", lambda dialog: dialog.accept())
    new.hover()
    new.locator("button.delete").click()
    expect(p.locator("#chat-title")).to_have_text("Renamed chat")
    expect(page.sidebar_item("Renamed chat")).to_have_class(re.compile("active"))

    expect(page.questions()).to_have_text(["beta message"])
    page.reload()
    page.expect(p.locator("#chat-title")).to_have_text("Renamed chat")
    page.expect(page.questions()).to_have_text(["beta message"])
    page.expect(page.sidebar_item("Alpha renamed")).to_have_count(0)
    p.click("#chat-settings")
    page.expect(p.locator("#setting-system-prompt")).to_have_value("Be brief.")
    page.expect(p.locator("#setting-temperature")).to_have_value("0.5")
    page.expect(p.locator("#setting-max-tokens")).to_have_value("8")
    p.click("#settings-cancel")

    # A browser that never saw the page lists the stored conversations and opens the latest.
    fresh = Page(page.context.browser, p.url.rstrip("/"))
    try:
        page.expect(fresh.sidebar_item("Renamed chat")).to_have_count(1)
        page.expect(fresh.page.locator("#conversation-list .conversation.active")).to_have_count(1)
        page.expect(fresh.page.locator("#chat-title")).not_to_have_text("chatserve")
    finally:
        fresh.close()


def store_exchange(store, title: str, question: str, answer: str, reasoning=None, status: str = "complete") -> None:
    """A conversation with one question and its finished (or stopped) answer, written straight into
    the store."""
    from chatserve.server.store import new_id

    conversation = store.create_conversation(title, None, {"temperature": None, "top_p": None, "max_tokens": None})
    user = {"id": new_id("msg"), "parent_id": None, "role": "user", "status": "complete", "content": question}
    reply = {"id": new_id("msg"), "parent_id": user["id"], "role": "assistant", "status": "generating",
             "content": ""}
    store.start_answer(conversation["id"], user, reply, [], "", None)
    stats = {"prompt_tokens": 31, "cached_tokens": 16, "completion_tokens": 118, "time_to_first_token": 0.042,
             "tokens_per_second": 57.3}
    store.save_answer(conversation["id"], reply["id"], answer, reasoning, [], status=status,
                      finish_reason="stop" if status == "complete" else None, stats=stats)


SHOWCASE = """## Reversing a list in Python

There are **two** common ways, and both keep the *original* list intact:

1. Slicing: `items[::-1]` returns a new list.
2. The built-in `reversed()`, which returns an iterator:
   - cheap: no copy until you ask for one
   - works on any sequence

```python
items = [1, 2, 3]
print(items[::-1])          # [3, 2, 1]
print(list(reversed(items)))
```

> `items.reverse()` reverses *in place* and returns `None`.

See the [Python tutorial](https://docs.python.org/3/tutorial/datastructures.html) for more."""


def test_model_output_cannot_inject_html(browser, server, db_path):
    """Model output reaches the page only as text: stored answers (whatever the model wrote) are
    put in the store directly, since the random model cannot be made to write them."""
    from chatserve.server.store import Store

    store = Store.open(str(db_path))
    try:
        store_exchange(store, "Reverse a list", "How do I reverse a list in Python?", SHOWCASE,
                       reasoning="The user wants the idiomatic ways: slicing and `reversed()`.")
        store_exchange(store, "Injection <img src=x onerror=\"window.__pwned='title'\">",
                       "<script>window.__pwned = 'user'</script>", INJECTION,
                       reasoning="<img src=x onerror=\"window.__pwned='reasoning'\">")
    finally:
        store.close()

    # Without the page's Content-Security-Policy: the renderer alone must keep the text inert.
    page = Page(browser, server.url, bypass_csp=True)
    try:
        p = page.page
        page.sidebar_item("Reverse a list").click()
        answer = page.last_answer()
        page.expect(answer.locator(".content h2")).to_have_text("Reversing a list in Python")
        page.expect(answer.locator(".content pre code.language-python")).to_contain_text("print(items[::-1])")
        page.expect(answer.locator(".content ol > li > ul > li")).to_have_count(2)
        page.expect(answer.locator(".content a")).to_have_attribute(
            "href", "https://docs.python.org/3/tutorial/datastructures.html")
        page.expect(answer.locator("details.reasoning")).not_to_have_attribute("open", "")
        answer.locator("details.reasoning summary").click()
        page.expect(answer.locator(".reasoning-body")).to_be_visible()
        page.expect(answer.locator(".stats")).to_have_text(
            "118 tokens · 57.3 tok/s · 42 ms to first token · 16/31 prompt tokens cached")
        screenshot(p, "web.png")

        page.sidebar_item("Injection").click()
        answer = page.last_answer()
        page.expect(answer.locator(".content")).to_contain_text('<script>window.__pwned = "script"</script>')
        answer.locator("details.reasoning summary").click()
        page.expect(answer.locator(".reasoning-body")).to_have_text(
            "<img src=x onerror=\"window.__pwned='reasoning'\">")
        page.expect(page.questions()).to_have_text(["<script>window.__pwned = 'user'</script>"])
        page.expect(p.locator("#chat-title")).to_contain_text("<img src=x onerror=")
        assert p.locator("#messages script, #messages img, #app img, #messages a[href^='javascript']").count() == 0
        assert answer.locator("strong", has_text="still bold").count() == 1
        p.wait_for_timeout(200)  # an onerror handler would have run by now
        assert p.evaluate("window.__pwned") is None
        screenshot(p, "web-injection.png")
    finally:
        page.close()


# Replaces the page's fetch for POST .../messages: the answer stream then comes from the test, one
# event per window.__emit(event), instead of from the server.
SCRIPTED_ANSWERS = """() => {
    const realFetch = window.fetch;
    window.fetch = (resource, options) => {
        if (!/\\/messages$/.test(String(resource))) return realFetch(resource, options);
        const encoder = new TextEncoder();
        const body = new ReadableStream({ start(controller) {
            window.__emit = (event) => controller.enqueue(encoder.encode(
                `data: ${typeof event === "string" ? event : JSON.stringify(event)}\\n\\n`));
        } });
        return Promise.resolve(new Response(body, { headers: { "Content-Type": "text/event-stream" } }));
    };
}"""


def test_reasoning_starts_collapsed(page):
    """Reasoning is a collapsed <details> while the answer thinks, while it answers and once it is
    done; one the user opens stays open as the answer streams on. The random model does not think
    out loud, so the answer streams are scripted in the page."""
    p = page.page
    expect = page.expect
    page.new_chat()
    p.evaluate(SCRIPTED_ANSWERS)
    p.evaluate("""() => {
        window.__everOpen = false;
        new MutationObserver(() => {
            if (document.querySelector("#messages details.reasoning[open]")) window.__everOpen = true;
        }).observe(document.querySelector("#messages"),
                   {subtree: true, childList: true, attributes: true, attributeFilter: ["open"]});
    }""")

    def emit(event) -> None:
        p.evaluate("(event) => window.__emit(event)", event)

    def ask(question: str, n: int) -> dict:
        p.evaluate("() => { window.__emit = undefined; }")
        page.send(question)
        p.wait_for_function("() => window.__emit !== undefined")
        user = {"id": f"msg_q{n}", "parent_id": f"msg_a{n - 1}" if n > 1 else None, "role": "user",
                "content": question, "status": "complete"}
        answer = {"id": f"msg_a{n}", "parent_id": user["id"], "role": "assistant", "content": "",
                  "reasoning_content": None, "status": "generating", "finish_reason": None}
        emit({"type": "message", "message": user})
        emit({"type": "message", "message": answer})
        return answer

    def delta(answer: dict, **text) -> None:
        for key, value in text.items():
            answer[key] = (answer[key] or "") + value
        emit({"type": "delta", "message_id": answer["id"], **text})

    def done(answer: dict) -> None:
        emit({"type": "done", "message": {**answer, "status": "complete", "finish_reason": "stop"}})
        emit("[DONE]")
        page.wait_answer()

    answer = ask("Why is the sky blue?", 1)
    delta(answer, reasoning_content="Rayleigh scattering <img src=x onerror=\"window.__pwned='reasoning'\">:")
    reasoning = page.last_answer().locator("details.reasoning")
    expect(reasoning.locator("summary")).to_have_text("Thinking…")
    expect(reasoning.locator(".reasoning-body")).to_be_hidden()
    delta(answer, reasoning_content=" short wavelengths scatter **more**.")
    delta(answer, content="Because of **Rayleigh** scattering")
    expect(reasoning.locator("summary")).to_have_text("Reasoning")
    expect(page.last_answer().locator(".content strong")).to_have_text("Rayleigh")
    expect(reasoning.locator(".reasoning-body")).to_be_hidden()
    delta(answer, content=" <script>window.__pwned = 'content'</script>.")
    done(answer)
    expect(reasoning.locator(".reasoning-body")).to_be_hidden()
    assert p.evaluate("window.__everOpen") is False
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-body strong")).to_have_text("more")
    expect(reasoning.locator(".reasoning-body")).to_contain_text("<img src=x onerror=")
    expect(page.last_answer().locator(".content")).to_contain_text("<script>window.__pwned = 'content'</script>")

    # Opened while the answer streams: it stays open through the deltas and the end.
    answer = ask("And at sunset?", 2)
    delta(answer, reasoning_content="The light crosses more air")
    reasoning = page.last_answer().locator("details.reasoning")
    expect(reasoning).to_have_js_property("open", False)
    screenshot(p, "web-reasoning.png")  # thinking, collapsed; the answer above opened
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-body")).to_be_visible()
    for step in range(3):
        delta(answer, reasoning_content=f", step {step}")
    delta(answer, content="Red and orange light is left.")
    expect(reasoning.locator("summary")).to_have_text("Reasoning")
    expect(reasoning.locator(".reasoning-body")).to_contain_text("step 2")
    expect(reasoning).to_have_js_property("open", True)
    done(answer)
    expect(reasoning).to_have_js_property("open", True)
    expect(page.messages("assistant").first.locator("details.reasoning")).to_have_js_property("open", True)
    assert p.locator("#messages script, #messages img").count() == 0
    p.wait_for_timeout(100)  # an onerror handler would have run by now
    assert p.evaluate("window.__pwned") is None


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory):
    """A second server, on the scripted model (tests/scripted_model.py): a real model whose greedy
    answer thinks out loud, REASONING, then says ANSWER."""
    model_dir, _ = write_scripted_model(tmp_path_factory.mktemp("scripted"))
    db = tmp_path_factory.mktemp("web-reasoning") / "conversations.sqlite3"
    with live_server(tiny_engine_config(model=str(model_dir)), ServerConfig(db_path=str(db))) as srv:
        yield srv


def test_reasoning_of_a_real_model(browser, reasoning_server):
    """End to end: the model's <think> part reaches the page as collapsed reasoning, apart from the
    answer, both while it streams and once stored (a reload)."""
    page = Page(browser, reasoning_server.url)
    try:
        p = page.page
        expect = page.expect
        page.new_chat()
        page.settings(temperature=0, max_tokens=40)  # greedy: the model's generation_config samples
        page.send("Hi there. How are you?")
        page.wait_answer()
        # The zero reached the server (not dropped as falsy): the exact answer alone would not show
        # it, since the scripted answer is likely at the model's default temperature too.
        listed = requests.get(f"{reasoning_server.url}/v1/conversations", timeout=10).json()["data"]
        assert [c["params"]["temperature"] for c in listed] == [0]

        def check() -> None:
            answer = page.last_answer()
            expect(answer).to_have_attribute("data-status", "complete")
            reasoning = answer.locator("details.reasoning")
            expect(reasoning).to_have_count(1)
            expect(reasoning).to_have_js_property("open", False)
            expect(reasoning.locator("summary")).to_have_text("Reasoning")
            expect(reasoning.locator(".reasoning-body")).to_be_hidden()
            expect(answer.locator(".content")).to_have_text(ANSWER)
            assert "think>" not in answer.locator(".bubble").inner_text()
            reasoning.locator("summary").click()
            expect(reasoning).to_have_js_property("open", True)
            expect(reasoning.locator(".reasoning-body")).to_be_visible()
            expect(reasoning.locator(".reasoning-body")).to_have_text(REASONING)

        check()
        screenshot(p, "web-reasoning-real.png")
        page.reload()
        expect(page.questions()).to_have_text(["Hi there. How are you?"])
        check()
    finally:
        page.close()


def test_api_key_from_settings(browser, server):
    from chatserve.server.streaming import Users

    config, state = server.app.state.server_config, server.app.state
    config.api_key = "web-secret"
    state.users = Users.from_config(config)  # the keys are read at start: this server starts needing one now
    try:
        created = requests.post(f"{server.url}/v1/conversations", json={"title": "Behind a key"},
                                headers={"Authorization": "Bearer web-secret"}, timeout=10)
        assert created.status_code == 201, created.text
        page = Page(browser, server.url)
        try:
            p = page.page
            page.expect(p.locator("#settings-dialog")).to_be_visible()
            page.expect(p.locator("#banner")).to_contain_text("API key")
            page.expect(p.locator("#conversation-list .conversation")).to_have_count(0)
            p.fill("#setting-api-key", "web-secret")
            p.click("#settings-save")
            page.expect(p.locator("#settings-dialog")).to_be_hidden()
            page.expect(page.sidebar_item("Behind a key")).to_have_count(1)
            assert p.evaluate("localStorage.getItem('chatserve.apiKey')") == "web-secret"
        finally:
            page.close()
    finally:
        config.api_key = None
        state.users = Users.from_config(config)


def test_the_sidebar_loads_older_conversations_a_page_at_a_time(browser, tmp_path):
    """The list is paged (50 a page): "More conversations" and scrolling to the list's end each add a page."""
    from chatserve.server.store import Store

    db = tmp_path / "many.sqlite3"
    store = Store.open(str(db))
    try:
        for i in range(110):
            store.create_conversation(f"Chat {i:03d}", None, {"temperature": None, "top_p": None, "max_tokens": None})
    finally:
        store.close()
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(db))) as srv:
        page = Page(browser, srv.url)
        try:
            p = page.page
            items, more = p.locator("#conversation-list .conversation"), p.locator("#more-conversations")
            page.expect(items).to_have_count(50)
            page.expect(items.first).to_contain_text("Chat 109")  # most recently updated first
            page.expect(more).to_be_visible()
            more.click()
            page.expect(items).to_have_count(100)
            page.expect(items.nth(99)).to_contain_text("Chat 010")
            p.eval_on_selector("#conversation-list", "list => list.scrollTo(0, list.scrollHeight)")
            page.expect(items).to_have_count(110)
            page.expect(items.last).to_contain_text("Chat 000")
            page.expect(more).to_be_hidden()
            screenshot(p, "web-sidebar-more.png")
        finally:
            page.close()


def store_conversations(db: Path, count: int) -> None:
    """count conversations with no messages: short titles, and every third one of the longest title."""
    from chatserve.server.store import MAX_TITLE_CHARS, Store

    store = Store.open(str(db))
    try:
        for i in range(count):
            title = f"Chat {i}" if i % 3 else "A long title " + "x" * (MAX_TITLE_CHARS - 13)
            store.create_conversation(title, None, {"temperature": None, "top_p": None, "max_tokens": None})
    finally:
        store.close()


PHONE = 768  # below this width the conversations are a drawer
WIDTHS = (320, 390, 768, 1024, 1440)

# Every control on show smaller than size x size px (24: WCAG 2.2's minimum target size).
SMALL_TARGETS = """(size = 24) => [...document.querySelectorAll("button, summary, select, a[href]")]
    .filter((b) => b.checkVisibility({ visibilityProperty: true }))
    .map((b) => [b.id || b.className || b.textContent, b.getBoundingClientRect()])
    .filter(([, r]) => r.width > 0 && (r.width < size || r.height < size))
    .map(([name, r]) => `${name} ${Math.round(r.width)}x${Math.round(r.height)}`)"""


@pytest.mark.parametrize("count", [0, 3, 50])
def test_no_sideways_overflow_on_phones_and_tablets(browser, tmp_path, count):
    """At 320 to 1440 px wide, with 0, 3 or 50 conversations (short titles and 256-character ones),
    the page is never wider than the screen; New chat, Settings and Send are on it and clickable;
    every button is at least 24x24 px. Below 768 px the conversations are in a drawer, closed."""
    db = tmp_path / "phone.sqlite3"
    store_conversations(db, count)
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(db))) as srv:
        for width in WIDTHS:
            page = Page(browser, srv.url, viewport={"width": width, "height": 844})
            try:
                p = page.page
                page.expect(p.locator("#conversation-list .conversation")).to_have_count(count)
                if count:  # the open conversation shows its buttons, which take room of their own
                    if width < PHONE:
                        p.click("#menu")
                    p.locator("#conversation-list .conversation").first.locator(".open").click()
                    page.expect(p.locator("#app.drawer-open")).to_have_count(0)
                page.expect(p.locator("#send")).to_be_visible()
                scroll_width, inner = p.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
                assert scroll_width <= inner, (width, count, scroll_width)
                new_chat = "#new-chat-top" if width < PHONE else "#new-chat"
                for button in (new_chat, "#chat-settings", "#send"):
                    box = p.locator(button).bounding_box()
                    assert box and box["x"] >= 0 and box["x"] + box["width"] <= inner, (width, count, button, box)
                    assert box["y"] >= 0 and box["y"] + box["height"] <= 844, (width, count, button, box)
                    p.locator(button).click(trial=True, timeout=5000)  # nothing covers it
                if width < PHONE:
                    page.expect(p.locator("#sidebar")).to_be_hidden()
                    page.expect(p.locator("#new-chat")).to_be_hidden()
                else:
                    page.expect(p.locator("#menu")).to_be_hidden()
                    page.expect(p.locator("#new-chat-top")).to_be_hidden()
                assert p.evaluate(SMALL_TARGETS) == [], width
                screenshot(p, f"web-phone-{width}-{count}.png")
                if width < PHONE:  # the drawer open: no wider either, its buttons as big
                    p.click("#menu")
                    page.expect(p.locator("#sidebar")).to_be_in_viewport()
                    p.wait_for_timeout(300)  # the slide-in
                    assert p.evaluate("document.documentElement.scrollWidth") <= inner
                    assert p.evaluate(SMALL_TARGETS) == [], width
                    screenshot(p, f"web-phone-{width}-{count}-drawer.png")
            finally:
                page.close()


AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
# axe-core's serious and critical violations on the page as it is now, one line each.
AXE_RUN = """async () => {
    const result = await axe.run(document, { resultTypes: ["violations"] });
    return result.violations.filter((v) => v.impact === "serious" || v.impact === "critical")
        .flatMap((v) => v.nodes.map((n) => `${v.id} (${v.impact}): ${n.target.join(" ")}: ${n.failureSummary}`));
}"""


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_accessibility_with_axe(browser, tmp_path, theme):
    """axe-core, injected into the page, finds no serious or critical violation (contrast, names,
    roles, ...) in either theme: on an answer just streamed (warm cache badge, stats, context
    usage), search results, a stored one
    with a table, code, math, reasoning and the stopped badge, the settings dialog, and on a phone
    with the drawer open."""
    db = tmp_path / "axe.sqlite3"
    from chatserve.server.store import Store

    store = Store.open(str(db))
    try:
        store_exchange(store, "Rich answer", "Show me everything", RICH + "\n\n" + SHOWCASE,
                       reasoning="Tables, code and math.", status="stopped")
    finally:
        store.close()
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(db))) as srv:
        page = Page(browser, srv.url, color_scheme=theme)
        try:
            p = page.page
            page.context.add_init_script(path=str(AXE))  # not subject to the page's CSP, as a <script> would be
            page.reload()

            def check(where: str) -> None:
                assert p.evaluate(AXE_RUN) == [], f"{theme}, {where}"

            # axe runs, and sees what it should: a grey-on-grey canary fails its contrast rule.
            p.evaluate("""() => {
                const canary = document.createElement("p");
                canary.id = "canary";
                canary.textContent = "canary";
                canary.style.cssText = "color: #999; background: #aaa";  // CSSOM: allowed by the CSP
                document.body.append(canary);
            }""")
            canary = p.evaluate(AXE_RUN)
            p.evaluate("document.querySelector('#canary').remove()")
            assert any(line.startswith("color-contrast (serious)") for line in canary), canary
            page.new_chat_answered("Hello", max_tokens=8)
            page.expect(p.locator("#cache-badge.warm")).to_be_visible()
            page.expect(p.locator("#context-usage")).to_be_visible()
            check("a streamed answer")
            p.fill("#search", "rich OR hello")
            page.expect(p.locator("#search-results .search-result mark").first).to_be_visible()
            check("search results")
            p.press("#search", "Escape")
            page.sidebar_item("Rich answer").click()
            page.expect(page.last_answer().locator(".badge.stopped")).to_be_visible()
            page.last_answer().locator("details.reasoning summary").click()
            check("a stored answer")
            p.click("#chat-settings")
            check("the settings dialog")
            p.click("#settings-cancel")
            p.set_viewport_size({"width": 390, "height": 844})
            check("a phone")
            p.click("#menu")
            page.expect(p.locator("#sidebar")).to_be_in_viewport()
            p.wait_for_timeout(300)  # the slide-in
            check("a phone, the drawer open")
            screenshot(p, f"web-axe-{theme}.png")
        finally:
            page.close()


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_screenshots_at_each_size(browser, tmp_path, theme):
    """The page at 320, 390, 768 and 1280 px wide, on an answer with a table, code, math and a
    stopped badge: no sideways overflow; screenshots to look at (web-size-WIDTH-THEME.png)."""
    from chatserve.server.store import Store

    db = tmp_path / "sizes.sqlite3"
    store_conversations(db, 3)
    store = Store.open(str(db))
    try:
        store_exchange(store, "How to solve a quadratic equation, with a table of examples",
                       "How do I solve ax² + bx + c = 0? Show examples in a table, and code.",
                       RICH + "\n\n" + SHOWCASE, reasoning="Formula, table, code.", status="stopped")
    finally:
        store.close()
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(db))) as srv:
        for width in (320, 390, 768, 1280):
            page = Page(browser, srv.url, viewport={"width": width, "height": 844 if width < 1280 else 800},
                        color_scheme=theme)
            try:
                p = page.page
                page.expect(p.locator("#chat-title")).to_have_text(re.compile("quadratic"))
                page.expect(page.last_answer().locator(".katex-display")).to_have_count(1)
                p.evaluate("document.fonts.ready")
                scroll_width, inner = p.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
                assert scroll_width <= inner, (width, scroll_width)
                # The placeholder fits its line (at 768 px the long one wrapped, cut in half).
                assert p.locator("#input").evaluate("i => i.scrollHeight <= i.clientHeight + 1"), width
                p.locator("#messages").evaluate("m => m.scrollTo(0, 0)")
                screenshot(p, f"web-size-{width}-{theme}.png")
            finally:
                page.close()


def test_touch_targets_on_a_touch_screen(browser, tmp_path):
    """On a touch screen (a coarse pointer) every control is at least 44x44 px: the chat with an
    answer's buttons and its version arrows, the drawer, the settings."""
    from chatserve.server.store import Store

    db = tmp_path / "touch.sqlite3"
    store_conversations(db, 3)
    store = Store.open(str(db))
    try:
        store_exchange(store, "Touch me", "A question", COPY_ANSWER + "\n\n" + RICH)
    finally:
        store.close()
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(db))) as srv:
        page = Page(browser, srv.url, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
        try:
            p = page.page
            assert p.evaluate("matchMedia('(pointer: coarse)').matches")
            page.expect(p.locator("#chat-title")).to_have_text("Touch me")
            page.expect(page.last_answer().locator(".code-block")).to_have_count(3)
            page.settings(max_tokens=4)
            page.last_answer().locator("button.regenerate").tap()
            page.expect(page.last_answer().locator(".branch-index")).to_have_text("2/2")
            page.wait_answer()
            assert p.evaluate(SMALL_TARGETS, 44) == []
            p.tap("#menu")
            page.expect(p.locator("#sidebar")).to_be_in_viewport()
            p.wait_for_timeout(300)  # the slide-in
            assert p.evaluate(SMALL_TARGETS, 44) == []
            screenshot(p, "web-touch-drawer.png")
            p.keyboard.press("Escape")
            p.tap("#chat-settings")
            assert p.evaluate(SMALL_TARGETS, 44) == []
            screenshot(p, "web-touch-settings.png")
        finally:
            page.close()


def test_conversations_drawer_on_phones(browser, tmp_path):
    """Below 768 px: the menu button opens the drawer; Esc, the backdrop, choosing a conversation
    or starting a new one close it; while it is open the chat behind it takes no focus."""
    db = tmp_path / "drawer.sqlite3"
    store_conversations(db, 3)
    with live_server(tiny_engine_config(), ServerConfig(db_path=str(db))) as srv:
        page = Page(browser, srv.url, viewport={"width": 390, "height": 844})
        try:
            p, expect = page.page, page.expect
            sidebar, menu = p.locator("#sidebar"), p.locator("#menu")
            expect(sidebar).to_be_hidden()
            expect(menu).to_have_attribute("aria-expanded", "false")
            menu.click()
            expect(sidebar).to_be_visible()
            expect(menu).to_have_attribute("aria-expanded", "true")
            expect(p.locator("#conversation-list .conversation.active .open")).to_be_focused()
            assert p.evaluate("document.querySelector('#chat').inert") is True
            p.keyboard.press("Escape")
            expect(sidebar).to_be_hidden()
            expect(menu).to_be_focused()

            p.keyboard.press("Enter")  # the menu button, from the keyboard
            expect(sidebar).to_be_visible()
            p.mouse.click(380, 400)  # the backdrop, right of the drawer
            expect(sidebar).to_be_hidden()

            menu.click()
            page.sidebar_item("Chat 1").locator(".open").click()
            expect(sidebar).to_be_hidden()
            expect(p.locator("#chat-title")).to_have_text("Chat 1")

            menu.click()
            p.click("#new-chat")
            expect(sidebar).to_be_hidden()
            expect(p.locator("#empty-state")).to_be_visible()
            expect(p.locator("#input")).to_have_attribute("placeholder", "Message")
        finally:
            page.close()
