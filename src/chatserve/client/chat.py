"""`chatserve chat`: a terminal chat over the stored-conversations API (docs/conversations-api.md).

It talks HTTP to a running server, or starts the real server app in-process on a free loopback
port (`--model`) and talks HTTP to that, so both paths exercise the same API."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from contextlib import closing, suppress
from typing import Callable, Iterator, Optional

import httpx
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.formatted_text import ANSI
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from ..config import data_dir

try:
    import readline
except ImportError:  # Windows, or a Python built without it: plain input() still works
    readline = None

DEFAULT_URL = "http://127.0.0.1:8000"
# The conversation's params /params sets (stop: one string here).
PARAM_TYPES = {"temperature": float, "top_p": float, "max_tokens": int, "top_k": int, "min_p": float,
               "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float, "seed": int,
               "stop": str}
LIST_PAGE, MAX_LIST_PAGE = 50, 100  # conversations a /list shows at once; the most the server gives a page
NOT_REACHABLE_HINT = ("start one with `chatserve serve` (or chat with a model in-process: "
                      "`chatserve chat --model MODEL`)")

MULTILINE_HELP = ('Multi-line: end a line with \\ to continue on the next one, or put """ on a line '
                  'to start a block and again to end it. In a terminal, the up arrow recalls a whole '
                  'message, Tab completes a /command, and answers are shown as rendered Markdown.')

HELP_COLUMN = 26  # where each command's description starts in COMMANDS_HELP
COMMANDS_HELP = """\
Commands:
  /new                    start a new conversation (stored once you send its first message)
  /list [more]            list the stored conversations, most recently updated first, 50 at a
                          time; /list more shows the next 50
  /switch N|ID            resume conversation N of /list (or its id, or a unique start of it)
  /rename TITLE           rename this conversation
  /delete [N|ID]          delete a conversation (default: this one), after asking
  /history                reprint the current branch of this conversation: your messages are
                          #1, #2, ..., the answer to #N is #Na; "(K/M)": version K of M
  /edit [N] [TEXT]        rewrite your message #N (default: the last one) as TEXT and answer it
                          again; the old version stays as a branch ("(1/2)"). Without TEXT you
                          are asked for it.
  /regen                  answer your last message again, as a new branch
  /continue               go on with the last answer (one cut at max_tokens or stopped): the
                          new text is appended to the same answer
  /branch N [next|prev|K] show another version of message N (#N or #Na as /history numbers
                          them): the next one (the default; after the last, the first), the
                          previous one, or version K; then the branch through it. /branch
                          alone lists the messages on this branch that have other versions.
  /system [TEXT|none]     show or set (none: clear) this conversation's system prompt
  /params [K=V ...]       show or set the sampling values: temperature, top_p, max_tokens,
                          top_k, min_p, repetition_penalty, presence_penalty,
                          frequency_penalty, seed, stop (V = default to unset), e.g.
                          /params temperature=0.7 top_p=0.9 max_tokens=256; then shows the
                          values answers get and where each comes from (the conversation,
                          the server, the model's generation_config or the built-in default)
  /help                   this help
  /quit                   exit (also Ctrl-D on an empty prompt, or Ctrl-C at the prompt)
Ctrl-C while an answer streams stops it (the partial answer is kept, marked stopped).
Start a message with // to send text that begins with /.
"""


def message_complete(raw: str) -> bool:
    """Whether the text typed so far is a whole message: not a \"\"\" block still open, not a
    last line ending with \\ (which continues on the next)."""
    stripped = raw.lstrip()
    if stripped.startswith('"""'):
        return stripped[3:].rstrip().endswith('"""')
    return not raw.endswith("\\")


def parse_message(raw: str) -> str:
    """The message a complete input stands for: a \"\"\" block's lines (without the quotes, and
    without the lines they stand alone on), or lines joined where one ended with \\."""
    stripped = raw.lstrip()
    if stripped.startswith('"""'):
        lines = stripped[3:].rstrip()[:-3].split("\n")
        if len(lines) > 1 and not lines[-1]:
            lines.pop()  # the closing quotes on a line of their own
        if lines and not lines[0]:
            lines.pop(0)  # the opening quotes on a line of their own
        return "\n".join(lines)
    lines = raw.split("\n")
    return "\n".join(line[:-1] if line.endswith("\\") and i < len(lines) - 1 else line
                     for i, line in enumerate(lines))


class Discarded(Exception):
    """Ctrl-C on an unfinished message: it is thrown away, the chat goes on."""


class CommandCompleter(Completer):
    """Completes a /command at the start of the input (Tab), each with its line of /help."""

    def __init__(self, commands: dict[str, str]):
        self.commands = commands

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or any(c.isspace() for c in text):
            return
        for name, meta in self.commands.items():
            if f"/{name}".startswith(text):
                yield Completion(f"/{name}", start_position=-len(text), display_meta=meta)


class LineEditor:
    """Line editing in a real terminal (prompt_toolkit): the arrows move through the text and the
    history, a message of several lines is one history entry (recalled whole by the up arrow),
    Tab completes a /command. Enter sends a complete message and starts a new line in an
    unfinished one (message_complete)."""

    def __init__(self, commands: dict[str, str], history_path: Optional[str], style: "Style"):
        history = InMemoryHistory()
        if history_path:
            with suppress(OSError):
                os.makedirs(os.path.dirname(history_path), exist_ok=True)
                history = FileHistory(history_path)
        keys = KeyBindings()

        @keys.add("enter")
        def _enter(event) -> None:
            buffer = event.current_buffer
            buffer.complete_state = None  # an open completion menu: Enter takes the completion
            if message_complete(buffer.text):
                buffer.validate_and_handle()
            else:
                buffer.insert_text("\n")

        @keys.add("c-c")
        def _interrupt(event) -> None:
            text = event.current_buffer.text
            event.app.exit(exception=Discarded() if text else KeyboardInterrupt())

        continuation = ANSI(style("...> ", "dim"))
        self.session = PromptSession(history=history, multiline=True, key_bindings=keys,
                                     completer=CommandCompleter(commands), complete_while_typing=False,
                                     prompt_continuation=lambda width, line, wrapped: continuation if not wrapped
                                     else "", enable_open_in_editor=False, reserve_space_for_menu=4)

    def read(self, prompt: str, default: str = "") -> str:
        """One input, as typed (parse_message makes it a message); EOFError on Ctrl-D at an empty
        prompt, KeyboardInterrupt on Ctrl-C at an empty one, Discarded on Ctrl-C at a non-empty one."""
        return self.session.prompt(ANSI(prompt), default=default)

    def ask(self, question: str) -> str:
        """A one-line answer, kept out of the history."""
        return PromptSession().prompt(question)


class ChatError(Exception):
    """Something the user should read as one line: an API error or an unreachable server."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.message, self.status = message, status


class Unreachable(ChatError):
    pass


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:300] or response.reason_phrase


class ChatAPI:
    """A thin, synchronous client of the conversations API: dicts in, dicts out, ChatError on failure."""

    def __init__(self, url: str, api_key: Optional[str] = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A read timeout guards against a stuck server; generous, since a long prompt on a slow
        # CPU model may take minutes before its first token.
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=600.0))

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise Unreachable(f"cannot reach the server at {self.url} ({exc}); {NOT_REACHABLE_HINT}") from None
        except httpx.HTTPError as exc:
            raise ChatError(f"{method} {self.url}{path} failed: {exc}") from None

    def request(self, method: str, path: str, **kwargs) -> dict:
        response = self._send(method, path, **kwargs)
        if response.status_code >= 400:
            raise ChatError(_error_message(response), response.status_code)
        return response.json()

    def health(self) -> tuple[int, dict]:
        response = self._send("GET", "/health")
        try:
            body = response.json()
        except ValueError:
            body = {}
        return response.status_code, body if isinstance(body, dict) else {}

    def page(self, limit: int = LIST_PAGE, after: Optional[str] = None) -> dict:
        """One page of the conversations, most recently updated first: {"data", "has_more", "last_id", ...}."""
        params = {"limit": limit, **({"after": after} if after else {})}
        return self.request("GET", "/v1/conversations", params=params)

    def list(self) -> list[dict]:
        """Every conversation, most recently updated first, a page at a time."""
        out, after = [], None
        while True:
            page = self.page(MAX_LIST_PAGE, after)
            out += page["data"]
            if not page["has_more"] or not page["data"]:
                return out
            after = page["last_id"]

    def create(self, **fields) -> dict:
        return self.request("POST", "/v1/conversations", json=fields)

    def get(self, conv_id: str) -> dict:
        return self.request("GET", f"/v1/conversations/{conv_id}")

    def patch(self, conv_id: str, **fields) -> dict:
        return self.request("PATCH", f"/v1/conversations/{conv_id}", json=fields)

    def delete(self, conv_id: str) -> dict:
        return self.request("DELETE", f"/v1/conversations/{conv_id}")

    def switch(self, conv_id: str, message_id: str) -> dict:
        """Show the branch through message_id (down to a leaf by the newest child at each level)."""
        return self.request("POST", f"/v1/conversations/{conv_id}/switch", json={"message_id": message_id})

    def stop(self, conv_id: str, message_id: str) -> dict:
        return self.request("POST", f"/v1/conversations/{conv_id}/messages/{message_id}/stop")

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The events of an answer stream (SSE `data:` lines), until `[DONE]`. Closing the
        generator closes the connection, which stops the answer on the server."""
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ChatError(_error_message(response), response.status_code)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event:/id: fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.ConnectError as exc:
            raise Unreachable(f"cannot reach the server at {self.url} ({exc}); {NOT_REACHABLE_HINT}") from None
        except httpx.HTTPError as exc:
            raise ChatError(f"the answer stream from {self.url} broke: {exc}") from None


class Style:
    """ANSI styling, only for a terminal and only when NO_COLOR is unset (https://no-color.org)."""

    CODES = {"bold": "1", "dim": "2", "italic": "3", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, *styles: str, prompt: bool = False) -> str:
        if not self.enabled or not styles:
            return text
        start = "\x1b[" + ";".join(self.CODES[s] for s in styles) + "m"
        end = "\x1b[0m"
        if prompt and readline is not None:
            # readline must not count invisible bytes in the prompt's width
            start, end = f"\001{start}\002", f"\001{end}\002"
        return f"{start}{text}{end}"


def colour_wanted(stream=sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


# C0 controls but tab and newline, DEL, and C1 controls: a model's output must not move the
# cursor, clear the screen or restyle the terminal.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return CONTROL_CHARS.sub("", text)


def sibling_tag(message: dict) -> str:
    siblings = message.get("siblings") or []
    if len(siblings) > 1 and message.get("sibling_index") is not None:
        return f" ({message['sibling_index'] + 1}/{len(siblings)})"
    return ""


def stats_text(stats: Optional[dict], finish_reason: Optional[str] = None) -> str:
    parts = []
    if stats:
        parts.append(f"{stats.get('completion_tokens', 0)} tokens")
        if stats.get("tokens_per_second") is not None:
            parts.append(f"{stats['tokens_per_second']:.1f} tokens/s")
        if stats.get("time_to_first_token") is not None:
            parts.append(f"first token {stats['time_to_first_token'] * 1000:.0f} ms")
        if stats.get("prompt_tokens") is not None:
            parts.append(f"{stats.get('cached_tokens') or 0}/{stats['prompt_tokens']} prompt tokens cached")
    if finish_reason == "length":
        parts.append("stopped at max_tokens")
    return "[" + ", ".join(parts) + "]" if parts else ""


def ago(timestamp: Optional[float]) -> str:
    if not timestamp:
        return ""
    seconds = max(0, time.time() - timestamp)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return time.strftime("%Y-%m-%d", time.localtime(timestamp))


def command_help() -> dict[str, str]:
    """Each /command's first line of help (for completion), from COMMANDS_HELP."""
    return {line[3:].split()[0]: line[HELP_COLUMN:].strip() for line in COMMANDS_HELP.splitlines()
            if line.startswith("  /")}


def fancy_terminal() -> bool:
    """Line editing and redrawn answers need a terminal at both ends that can move its cursor."""
    return sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


class StreamedAnswer:
    """An answer written as its text comes (a pipe, a dumb terminal): the label, the reasoning dim
    italic after "(thinking) ", a new line, then the answer's text as it is."""

    def __init__(self, out, style: Style):
        self.out, self.style = out, style
        self.started = self.reasoning = self.content = False
        self.at_line_start = True

    def __enter__(self) -> "StreamedAnswer":
        return self

    def __exit__(self, *exc) -> None:
        if self.started and not self.at_line_start:
            self.out.write("\n")
            self.out.flush()

    def start(self, label: str) -> None:
        self.out.write(label)
        self.out.flush()
        self.started, self.at_line_start = True, False

    def feed(self, reasoning: str, content: str) -> None:
        if reasoning:
            if not self.reasoning:
                self.out.write(self.style("(thinking) ", "dim", "italic"))
                self.reasoning = True
            self.out.write(self.style(reasoning, "dim", "italic"))
        if content:
            if self.reasoning and not self.content:
                self.out.write("\n")
            self.content = True
            self.out.write(content)
        if reasoning or content:
            self.at_line_start = (content or reasoning).endswith("\n")  # content is written last
        self.out.flush()


FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def split_block(text: str) -> tuple[Optional[str], str]:
    """(the first finished Markdown block of text, the rest), or (None, text) when none is finished
    yet: a block ends at a blank line outside a code fence."""
    fence, pos, seen = None, 0, False
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a line still being written
        opening = FENCE.match(line)
        if opening and (fence is None or opening.group(1).startswith(fence)):
            fence = opening.group(1)[:3] if fence is None else None
        elif fence is None and not line.strip() and seen:
            return text[:pos], text[pos + len(line):].lstrip("\n")
        seen = seen or bool(line.strip())
        pos += len(line)
    return None, text


def rendered(kind: str, text: str):
    """What rich prints for a part of an answer: its reasoning dim italic, its text as Markdown."""
    if kind == "reasoning":
        return Text("(thinking) " + text, style="dim italic")
    return Markdown(text)


class Tail:
    """The last `height` lines of a renderable: how a block too tall for the screen is shown while
    it grows, so that the newest text is in view and a redraw never scrolls (which would leave
    copies of the earlier lines above)."""

    def __init__(self, renderable, height: int):
        self.renderable, self.height = renderable, height

    def __rich_console__(self, console: Console, options):
        # Two columns short: the "^C" a terminal echoes at the cursor then never wraps to a new
        # line, which the redraw would not know of and would leave behind.
        options = options.update_width(max(1, options.max_width - 2))
        lines = console.render_lines(self.renderable, options, pad=False)[-self.height:]
        for i, line in enumerate(lines):
            yield from line
            if i < len(lines) - 1:  # no new line after the last: the region must not grow past `height`
                yield Segment.line()


class RenderedAnswer:
    """An answer in a real terminal, rendered as it streams: the reasoning dim italic, the answer as
    Markdown, both wrapped by word at the terminal's width. Each finished block (text up to a blank
    line outside a code fence: a paragraph, a list, a code block) is printed for good; the block
    being written is redrawn in place (rich's Live) as it grows, its last screenful only (Tail)
    until it is finished and printed whole."""

    REDRAW_S = 0.05  # at most this often while text arrives

    def __init__(self, console: Console):
        self.console = console
        self.live: Optional[Live] = None
        self.kind: Optional[str] = None  # of the block being written: "reasoning" or "content"
        self.text = ""
        self.content_blocks = 0  # printed for good
        self.last_draw = 0.0

    def __enter__(self) -> "RenderedAnswer":
        return self

    def __exit__(self, *exc) -> None:
        self.end_block()

    def start(self, label: str) -> None:
        self.console.print(Text.from_ansi(label))

    def feed(self, reasoning: str, content: str) -> None:
        for kind, text in (("reasoning", reasoning), ("content", content)):
            if not text:
                continue
            if kind != self.kind:
                self.end_block()
                self.kind = kind
            self.text += text
            while kind == "content":
                block, rest = split_block(self.text)
                if block is None:
                    break
                self.text = block
                self.end_block()
                self.text = rest
            self.draw()

    def draw(self) -> None:
        now = time.monotonic()
        if not self.text.strip() or now - self.last_draw < self.REDRAW_S:
            return
        if self.live is None:
            # Transient: the growing block is erased when it ends, and printed whole instead (end_block).
            self.live = Live(console=self.console, auto_refresh=False, vertical_overflow="visible", transient=True,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        self.live.update(Tail(rendered(self.kind, self.text.strip("\n")), max(1, self.console.size.height - 1)),
                         refresh=True)
        self.last_draw = now

    def end_block(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.text.strip():
            if self.content_blocks and self.kind == "content":
                self.console.line()  # a blank line between blocks, as Markdown shows them
            self.console.print(rendered(self.kind, self.text.strip("\n")))
            self.content_blocks += self.kind == "content"
        self.text = ""


class Chat:
    """The interactive loop: read a message or a /command, act on it through ChatAPI, print."""

    def __init__(self, api: ChatAPI, style: Style, out=sys.stdout, err=sys.stderr, where: Optional[str] = None,
                 terminal: bool = False):
        """terminal: a real terminal (fancy_terminal()): line editing, and answers rendered as Markdown,
        wrapped by word. Otherwise (a pipe, a dumb terminal) lines are read with input() and text written as it comes."""
        self.api, self.style, self.out, self.err = api, style, out, err
        self.where = where or f"the server at {api.url}"
        self.conv: Optional[dict] = None  # None: a new chat, stored when its first message is sent
        self.branch: list[dict] = []  # the current branch, root first
        self.listed: list[dict] = []  # what /list showed last, for /switch N and /delete N
        self.list_more = False  # /list more has more to show
        self.model = "?"
        self.commands: dict[str, Callable[[str], None]] = {
            "new": self.cmd_new, "list": self.cmd_list, "ls": self.cmd_list, "switch": self.cmd_switch,
            "rename": self.cmd_rename, "delete": self.cmd_delete, "history": self.cmd_history,
            "edit": self.cmd_edit, "regen": self.cmd_regen, "continue": self.cmd_continue, "branch": self.cmd_branch, "system": self.cmd_system,
            "params": self.cmd_params,
            "help": self.cmd_help, "?": self.cmd_help,
        }
        self.editor: Optional[LineEditor] = None
        self.console: Optional[Console] = None
        if terminal:
            self.editor = LineEditor(command_help(), str(data_dir() / "chat_prompt_history"), style)
            self.console = Console(file=out, highlight=False, emoji=False, no_color=not style.enabled,
                                   force_terminal=True)

    # -- output -------------------------------------------------------------------------------

    def say(self, text: str = "", *styles: str, end: str = "\n") -> None:
        if self.console is not None:  # wrapped by word at the terminal's width
            self.console.print(Text.from_ansi(self.style(text, *styles)), end=end, soft_wrap=False)
            return
        self.out.write(self.style(text, *styles) + end)
        self.out.flush()

    def note(self, text: str) -> None:
        self.say(text, "dim")

    def error(self, text: str) -> None:
        self.out.flush()
        self.err.write(self.style(f"error: {text}", "red") + "\n")
        self.err.flush()

    def report(self, exc: ChatError) -> None:
        if exc.status == 401:
            self.error(f"{exc.message}\n  The server at {self.api.url} needs an API key: pass --api-key KEY "
                       "or set CHATSERVE_API_KEY.")
        elif exc.status == 409:
            self.error(f"{exc.message} (wait for that answer to finish, or stop it)")
        else:
            self.error(exc.message)

    # -- start-up ----------------------------------------------------------------------------

    def connect(self, local: Optional["LocalServer"] = None) -> None:
        """Wait (Ctrl-C gives up) for the model to be ready; raises ChatError when it cannot be."""
        said = False
        while True:
            try:
                status, body = self.api.health()
            except Unreachable:
                if local is None:
                    raise
                if not local.thread.is_alive():
                    raise ChatError("the in-process server did not start (see the errors above)") from None
                time.sleep(0.05)  # its thread is still starting to listen
                continue
            self.model = body.get("model") or self.model
            if status == 200 or status == 404:  # 404: not a chatserve /health; the API calls will tell
                return
            if body.get("status") == "error":
                raise ChatError(f"{self.where} could not load its model: {body.get('error') or 'unknown error'}")
            if status != 503:
                raise ChatError(f"{self.where} is not ready: HTTP {status} {body}")
            if not said:
                self.note(f"waiting for the server to load {self.model} (Ctrl-C gives up) ...")
                said = True
            time.sleep(0.25)

    def start(self, new: bool = False) -> None:
        try:
            conversations = self.api.page(limit=1)["data"]
        except ChatError as exc:
            if exc.status == 404:
                raise ChatError(f"the server at {self.api.url} has no conversations API (GET /v1/conversations "
                                "gave 404): is it a chatserve server, and recent enough?", 404) from None
            raise
        if conversations and not new:
            self.load(conversations[0]["id"])

    def load(self, conv_id: str) -> None:
        conv = self.api.get(conv_id)
        self.branch = conv.pop("messages", None) or []
        self.conv = conv

    def banner(self) -> None:
        self.say(f"chatserve chat: {self.model} at {self.api.url}", "bold")
        self.note(f"Enter sends. {MULTILINE_HELP}")
        self.note("/help lists the commands. Ctrl-C stops an answer; Ctrl-D (or /quit) exits.")
        if self.conv is None:
            self.note("New conversation.")
        else:
            self.note(f"Resumed {self.title()!r} ({len(self.branch)} messages on this branch); "
                      "/history shows it all, /new starts another.")
            self.print_messages(self.branch[-2:], first_number=self.user_count(self.branch[:-2]) + 1)

    # -- the loop ----------------------------------------------------------------------------

    def prompt(self, label: str = "you") -> str:
        return self.style(f"{label}> ", "bold", "green", prompt=True)

    def read_message(self, label: str = "you", default: str = "") -> Optional[str]:
        """One message: a line, a line ending with \\ and its continuations, or a \"\"\" block.
        EOFError/KeyboardInterrupt at an empty first prompt propagate (they exit); an unfinished
        message that Ctrl-C (or Ctrl-D) ends is discarded: None."""
        if self.editor is not None:
            try:
                return parse_message(self.editor.read(self.style(f"{label}> ", "bold", "green"), default))
            except Discarded:
                self.note("(unfinished message discarded)")
                return None
        raw = input(self.prompt(label))
        try:
            while not message_complete(raw):
                raw += "\n" + input(self.style("...> ", "dim", prompt=True))
        except (EOFError, KeyboardInterrupt):
            self.say()
            self.note("(unfinished message discarded)")
            return None
        return parse_message(raw)

    def run(self) -> int:
        while True:
            try:
                text = self.read_message()
            except (EOFError, KeyboardInterrupt):
                self.say()
                return 0
            if text is None or not text.strip():
                continue
            try:
                if text.startswith("//"):
                    self.send(text[1:])
                elif text.startswith("/"):
                    if not self.command(text):
                        return 0
                else:
                    self.send(text)
            except ChatError as exc:
                self.report(exc)
            except KeyboardInterrupt:
                self.say()
                self.note("(interrupted)")

    def command(self, text: str) -> bool:
        """Run one /command; False means quit."""
        match = re.match(r"/(\S+)\s*(.*)", text, re.S)
        name, rest = match.group(1).lower(), match.group(2).strip()
        if name in ("quit", "exit", "q"):
            return False
        handler = self.commands.get(name)
        if handler is None:
            self.error(f"unknown command /{name}; /help lists them (start a message with // to send a leading /)")
        else:
            handler(rest)
        return True

    # -- answers -----------------------------------------------------------------------------

    def ensure_conv(self, **fields) -> dict:
        if self.conv is None:
            conv = self.api.create(**fields)
            conv.pop("messages", None)
            self.conv, self.branch = conv, []
        return self.conv

    def send(self, text: str) -> None:
        conv = self.ensure_conv()
        body = {"content": text}
        if self.branch:
            body["parent_id"] = self.branch[-1]["id"]  # continue the branch on show here
        self.answer(f"/v1/conversations/{conv['id']}/messages", body)

    def answer(self, path: str, body: dict, show_user: bool = False, continuing: bool = False) -> None:
        """Stream one answer to the terminal; Ctrl-C stops it and keeps the program running."""
        conv_id = self.conv["id"]
        assistant: Optional[dict] = None
        final: Optional[dict] = None
        view = RenderedAnswer(self.console) if self.console is not None else StreamedAnswer(self.out, self.style)
        stopped, failure = False, None
        events = self.api.stream(path, body)
        try:
            with closing(events), view:
                for event in events:
                    kind = event.get("type")
                    if kind == "message":
                        message = event["message"]
                        self.attach(message)
                        if message["role"] == "user":
                            if show_user:
                                self.print_messages([message], first_number=self.user_count(self.branch[:-1]) + 1)
                        else:
                            assistant = message
                            view.start(self.label(message) + (self.style("(continued) ", "dim") if continuing
                                                              else ""))
                    elif kind == "delta":
                        view.feed(printable(event.get("reasoning_content") or ""),
                                  printable(event.get("content") or ""))
                    elif kind == "done":
                        final = event["message"]
                        self.attach(final)
                        conv = event.get("conversation")
                        if conv:
                            conv.pop("messages", None)
                            self.conv = conv
                    elif kind == "error":
                        failure = (event.get("error") or {}).get("message") or "the answer failed"
        except KeyboardInterrupt:
            stopped = True
        except ChatError:
            if assistant is not None:  # it broke mid-answer: say so, then read back what is stored
                self.note("[aborted: the connection to the server broke]")
                self.refresh(quiet=True)
            raise
        if stopped:
            self.stopped(conv_id, assistant)
        elif final is not None:
            if final.get("status") == "stopped":  # ended on the server, not by us: no stats, it did not finish
                self.note(f"[{self.why_cut_off()}]")
            else:
                line = stats_text(final.get("stats"), final.get("finish_reason"))
                if line:
                    self.note(line)
        else:
            self.error(failure or "the answer stream ended without a result")
            self.refresh()  # the stored message, with its status (error, or stopped)

    def why_cut_off(self) -> str:
        """Why the server ended an answer that we did not stop: it is shutting down (or already
        gone), or someone stopped it there (e.g. from the web page)."""
        try:
            status, body = self.api.health()
        except ChatError:
            return "aborted: the server went away"
        if status == 503 and body.get("status") == "shutting down":
            return "aborted: the server is shutting down"
        return "stopped on the server (e.g. from the web page)"

    def stopped(self, conv_id: str, assistant: Optional[dict]) -> None:
        """The connection is closed, which stops the answer; say so explicitly too, so the stored
        message is marked stopped before we read it back, then show what was kept."""
        message = None
        if assistant is not None:
            try:
                message = self.api.stop(conv_id, assistant["id"])
            except ChatError:
                pass
        line = stats_text(message.get("stats")) if message else ""
        self.note("[stopped" + (f"; {line[1:-1]}" if line else "") + "]")
        self.refresh()

    def refresh(self, quiet: bool = False) -> None:
        if self.conv is not None:
            try:
                self.load(self.conv["id"])
            except ChatError as exc:
                if not quiet:
                    self.report(exc)

    def attach(self, message: dict) -> None:
        """Put a streamed message on the local branch: after its parent, replacing what followed."""
        parent = message.get("parent_id")
        ids = [m["id"] for m in self.branch]
        if message["id"] in ids:
            self.branch[ids.index(message["id"])] = message
            return
        cut = ids.index(parent) + 1 if parent in ids else 0
        self.branch = self.branch[:cut] + [message]

    # -- showing messages ----------------------------------------------------------------------

    def label(self, message: dict, number: Optional[int] = None) -> str:
        """"you #2 (2/3)> ", "assistant #2a (1/2)> "; without a number (a streaming answer), none shown."""
        tag = sibling_tag(message)
        if message["role"] == "user":
            return self.style(f"you #{number}{tag}> " if number else f"you{tag}> ", "bold", "green")
        return self.style(f"assistant #{number}a{tag}> " if number else f"assistant{tag}> ", "bold", "cyan")

    @staticmethod
    def user_count(messages: list[dict]) -> int:
        return sum(1 for m in messages if m["role"] == "user")

    @staticmethod
    def numbered(messages: list[dict]) -> list[tuple[str, dict]]:
        """The branch's messages with the names /history shows and /branch takes: your messages
        "1", "2", ...; the answer to your message #N "Na"."""
        names, number = [], 0
        for message in messages:
            if message["role"] == "user":
                number += 1
                names.append((str(number), message))
            else:
                names.append((f"{number}a", message))
        return names

    def print_messages(self, messages: list[dict], first_number: int = 1) -> None:
        """first_number: the number of the first user message in `messages` (an answer before it
        is the answer to #first_number-1)."""
        number = first_number
        for message in messages:
            if message["role"] == "user":
                self.say(self.label(message, number) + printable(message.get("content", "")))
                number += 1
                continue
            text = self.label(message, number - 1 if number > 1 else None)
            if self.console is not None:
                self.console.print(Text.from_ansi(text))
                if message.get("reasoning_content"):
                    self.console.print(rendered("reasoning", printable(message["reasoning_content"])))
                self.console.print(rendered("content", printable(message.get("content") or "")))
                if message.get("status") in ("stopped", "error", "generating"):
                    self.note(f"[{message['status']}]")
                continue
            if message.get("reasoning_content"):
                text += self.style("(thinking) " + printable(message["reasoning_content"]), "dim", "italic") + "\n"
            text += printable(message.get("content") or "")
            status = message.get("status")
            if status in ("stopped", "error", "generating"):
                text += self.style(f" [{status}]", "dim")
            self.say(text)

    def title(self) -> str:
        return printable((self.conv or {}).get("title") or "New chat")

    # -- commands ----------------------------------------------------------------------------

    def cmd_help(self, _rest: str) -> None:
        self.say(MULTILINE_HELP)
        self.say(COMMANDS_HELP, end="")

    def cmd_new(self, _rest: str) -> None:
        self.conv, self.branch = None, []
        self.note("New conversation (stored when you send its first message).")

    def cmd_list(self, rest: str) -> None:
        if rest not in ("", "more"):
            raise ChatError("usage: /list, or /list more for the next 50")
        more = rest == "more"
        if more and not (self.listed and self.list_more):
            raise ChatError("nothing more to list; /list starts from the most recent")
        page = self.api.page(LIST_PAGE, self.listed[-1]["id"] if more else None)
        first = len(self.listed) + 1 if more else 1
        self.listed = (self.listed if more else []) + page["data"]
        self.list_more = page["has_more"]
        if not self.listed:
            self.note("No stored conversations yet.")
            return
        current = (self.conv or {}).get("id")
        width = len(str(len(self.listed)))
        for n, conv in enumerate(page["data"], first):
            mark = "*" if conv["id"] == current else " "
            self.say(f"{mark}{n:>{width}}. {printable(conv.get('title') or 'New chat')}  "
                     + self.style(f"{conv['id']}  {ago(conv.get('updated'))}", "dim"))
        if self.list_more:
            self.note("More conversations: /list more")

    def resolve(self, ref: str) -> dict:
        """A conversation from a /list number, an id, or a unique start of an id."""
        if ref.isdigit():
            listed = self.listed or self.api.page()["data"]
            n = int(ref)
            if not 1 <= n <= len(listed):
                raise ChatError(f"no conversation #{n}: /list shows {len(listed)}")
            return listed[n - 1]
        conversations = self.api.list()
        matches = [c for c in conversations if c["id"] == ref] or [c for c in conversations if c["id"].startswith(ref)]
        if len(matches) != 1:
            raise ChatError(f"no conversation {ref!r}" if not matches else
                            f"{ref!r} matches {len(matches)} conversations; give more of the id")
        return matches[0]

    def cmd_switch(self, rest: str) -> None:
        if not rest:
            raise ChatError("usage: /switch N|ID (N as /list shows it)")
        self.load(self.resolve(rest)["id"])
        self.note(f"Switched to {self.title()!r} ({len(self.branch)} messages on this branch).")
        self.print_messages(self.branch[-2:], first_number=self.user_count(self.branch[:-2]) + 1)

    def cmd_rename(self, rest: str) -> None:
        if not rest:
            raise ChatError("usage: /rename TITLE")
        conv = self.ensure_conv()
        updated = self.api.patch(conv["id"], title=rest)
        updated.pop("messages", None)
        self.conv = updated
        self.note(f"Renamed to {self.title()!r}.")

    def cmd_delete(self, rest: str) -> None:
        if rest:
            target = self.resolve(rest)
        elif self.conv is not None:
            target = self.conv
        else:
            raise ChatError("this conversation is not stored yet; nothing to delete")
        title = printable(target.get("title") or "New chat")
        try:
            question = f"Delete {title!r} ({target['id']})? [y/N] "
            answer = self.editor.ask(question) if self.editor is not None else input(question)
            if self.editor is None and readline is not None and answer and readline.get_current_history_length():
                readline.remove_history_item(readline.get_current_history_length() - 1)  # a "y" is no history
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            self.note("Not deleted.")
            return
        self.api.delete(target["id"])
        self.listed = [c for c in self.listed if c["id"] != target["id"]]
        self.note(f"Deleted {title!r}.")
        if self.conv is not None and target["id"] == self.conv["id"]:
            remaining = self.api.page(limit=1)["data"]
            if remaining:
                self.load(remaining[0]["id"])
                self.note(f"Now in {self.title()!r}.")
            else:
                self.conv, self.branch = None, []
                self.note("New conversation.")

    def cmd_history(self, _rest: str) -> None:
        if not self.branch:
            self.note("(no messages yet)")
            return
        self.note(f"{self.title()!r}, {self.conv['id']}:")
        self.print_messages(self.branch)

    def cmd_edit(self, rest: str) -> None:
        users = [m for m in self.branch if m["role"] == "user"]
        if not users:
            raise ChatError("no message of yours to edit yet")
        # "/edit 2 text" or "/edit 2": message #2; anything else is the new text of the last one.
        if re.match(r"#?\d+a(\s|$)", rest, re.I):
            raise ChatError("only your messages can be edited (#1, #2, ...); /regen answers your last one again, "
                            "/branch Na shows another version of answer #Na")
        match = re.match(r"#?(\d+)(?:\s+(.*))?$", rest, re.S)
        number, text = (int(match.group(1)), (match.group(2) or "").strip()) if match else (len(users), rest)
        if not 1 <= number <= len(users):
            raise ChatError(f"no message #{number}: this branch has {len(users)} of yours (/history numbers them)")
        target = users[number - 1]
        if not text:
            text = self.ask_edit(target["content"])
            if not text:
                self.note("Not edited.")
                return
        self.answer(f"/v1/conversations/{self.conv['id']}/messages/{target['id']}/edit", {"content": text},
                    show_user=True)
        self.hint_versions(str(number), target)

    def ask_edit(self, old: str) -> Optional[str]:
        """Read the new text, pre-filled with the old one (with readline: one-line messages only)."""
        self.note(f"Editing: {old}")
        self.note("Type the new text (empty: cancel).")
        if self.editor is not None:
            try:
                text = self.read_message("edit", old if "\n" not in old else f'"""\n{old}\n"""')
            except (EOFError, KeyboardInterrupt):
                return None
            return text if text and text.strip() else None
        prefill = readline is not None and "\n" not in old
        if prefill:
            readline.set_pre_input_hook(lambda: (readline.insert_text(old), readline.redisplay()))
        try:
            text = self.read_message("edit")
        except (EOFError, KeyboardInterrupt):
            self.say()
            return None
        finally:
            if prefill:
                readline.set_pre_input_hook(None)
        return text if text and text.strip() else None

    def cmd_regen(self, _rest: str) -> None:
        answers = [m for m in self.branch if m["role"] == "assistant"]
        if not answers:
            raise ChatError("no answer to regenerate yet")
        target = answers[-1]
        name = next(name for name, message in self.numbered(self.branch) if message is target)
        self.answer(f"/v1/conversations/{self.conv['id']}/messages/{target['id']}/regenerate", {})
        self.hint_versions(name, target)

    def cmd_continue(self, _rest: str) -> None:
        if not self.branch or self.branch[-1]["role"] != "assistant":
            raise ChatError("no answer to continue yet" if not self.branch else
                            "the last message is yours, with no answer to continue: send it again with /regen")
        target = self.branch[-1]
        self.answer(f"/v1/conversations/{self.conv['id']}/messages/{target['id']}/continue", {}, continuing=True)

    def hint_versions(self, name: str, old: dict) -> None:
        """After /edit or /regen: one dim line on how to go back to the version they replaced."""
        new = dict(self.numbered(self.branch)).get(name)
        siblings = (new or {}).get("siblings") or []
        if new is None or new["id"] == old["id"] or old["id"] not in siblings:
            return  # nothing new came (the answer failed before it started)
        k = siblings.index(old["id"]) + 1
        self.note(f"(the old version is kept as {k}/{len(siblings)}: /branch {name} {k} goes back to it)")

    def cmd_branch(self, rest: str) -> None:
        named = self.numbered(self.branch)
        if not rest:
            versions = [f"#{name}{sibling_tag(message)}" for name, message in named
                        if len(message.get("siblings") or []) > 1]
            if versions:
                self.note("Messages with other versions on this branch: " + ", ".join(versions))
            else:
                self.note("No message on this branch has other versions (/edit and /regen make them).")
            self.note("usage: /branch N [next|prev|K], N as /history numbers them (#2: your message, #2a: its answer)")
            return
        match = re.match(r"#?(\d+a?)(?:\s+(next|prev|previous|\d+))?$", rest.lower())
        if not match:
            raise ChatError(f"cannot read {rest!r}: use /branch N [next|prev|K], e.g. /branch 2 prev or /branch 2a 1 "
                            "(N as /history numbers them: #2 your message, #2a its answer)")
        name, which = match.group(1), match.group(2) or "next"
        message = dict(named).get(name)
        if message is None:
            users = self.user_count(self.branch)
            raise ChatError(f"no message #{name} on this branch: it has #1 to #{users} of yours and their answers "
                            "#1a, ... (/history numbers them)" if users else "no messages on this branch yet")
        siblings = message.get("siblings") or [message["id"]]
        index = siblings.index(message["id"]) if message["id"] in siblings else 0
        if len(siblings) < 2:
            raise ChatError(f"message #{name} has no other versions (/edit and /regen make them)")
        if which == "next":
            index = (index + 1) % len(siblings)
        elif which.startswith("prev"):
            index = (index - 1) % len(siblings)
        else:
            k = int(which)
            if not 1 <= k <= len(siblings):
                raise ChatError(f"no version {k} of message #{name}: it has {len(siblings)}")
            index = k - 1
        conv = self.api.switch(self.conv["id"], siblings[index])
        self.branch = conv.pop("messages", None) or []
        self.conv = conv
        self.note(f"Message #{name}: version {index + 1}/{len(siblings)}.")
        self.cmd_history("")

    def cmd_system(self, rest: str) -> None:
        if not rest:
            prompt = (self.conv or {}).get("system_prompt")
            self.say(prompt if prompt else self.style("(no system prompt)", "dim"))
            return
        value = None if rest.lower() == "none" else rest
        if self.conv is None:
            conv = self.ensure_conv(system_prompt=value)
        else:
            conv = self.api.patch(self.conv["id"], system_prompt=value)
            conv.pop("messages", None)
        self.conv = conv
        self.note("System prompt cleared." if value is None else "System prompt set.")

    def cmd_params(self, rest: str) -> None:
        current = dict((self.conv or {}).get("params") or {})
        if rest:
            changes = {}
            for item in rest.split():
                key, sep, value = item.partition("=")
                key = key.strip().replace("-", "_")
                if not sep or key not in PARAM_TYPES:
                    raise ChatError(f"cannot read {item!r}: use NAME=VALUE with NAME one of "
                                    f"{', '.join(PARAM_TYPES)}, e.g. temperature=0.7 (VALUE default to unset)")
                if value.lower() in ("default", "none", "null", ""):
                    changes[key] = None
                else:
                    try:
                        changes[key] = PARAM_TYPES[key](value)
                    except ValueError:
                        raise ChatError(f"{key} must be a{'n integer' if PARAM_TYPES[key] is int else ' number'}, "
                                        f"got {value!r}") from None
            params = {name: current.get(name) for name in PARAM_TYPES}
            params.update(changes)  # send them all: right whether PATCH merges params or replaces them
            if self.conv is None:
                self.ensure_conv(params=params)
            else:
                conv = self.api.patch(self.conv["id"], params=params)
                conv.pop("messages", None)
                self.conv = conv
            current = self.conv.get("params") or params
        shown = " ".join(f"{name}={'default' if current.get(name) is None else current.get(name)}"
                         for name in PARAM_TYPES)
        self.say(shown)
        path = f"/v1/conversations/{self.conv['id']}/sampling" if self.conv else "/v1/conversations/sampling"
        try:
            effective = self.api.request("GET", path)["params"]
        except ChatError:
            return  # a server without the route, or still loading: the values set are shown already
        self.note("In effect: " + ", ".join(f"{name} {json.dumps(v['value'])} ({v['source']})"
                                            for name, v in effective.items()))


# -- in-process server ---------------------------------------------------------------------------


class LocalServer:
    """The real server app (create_app) on a free loopback port, in a daemon thread."""

    def __init__(self, engine_config, db_path: Optional[str] = None):
        import socket

        import uvicorn

        from ..config import ServerConfig
        from ..server.app import create_app
        from ..server.store import Store, default_db_path

        # No --db: the same default file as `chatserve serve`, so both see the same conversations.
        self.db_path = db_path or str(default_db_path())
        Store.open(self.db_path).close()  # a bad path is one clear line here, not a traceback from the lifespan
        app = create_app(engine_config, ServerConfig(db_path=self.db_path))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        # Not the main thread, so uvicorn leaves SIGINT to us: Ctrl-C stays the chat's to handle.
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning",
                                                    timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="chatserve-local-server", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def _setup_readline() -> None:
    if readline is None:
        return
    path = str(data_dir() / "chat_history")
    try:
        readline.read_history_file(path)
    except (OSError, ValueError):
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    import atexit

    atexit.register(save)


def run_chat(url: str = DEFAULT_URL, api_key: Optional[str] = None, engine_config=None,
             db_path: Optional[str] = None, new: bool = False) -> int:
    """The whole `chatserve chat` session; returns the exit status."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a model's odd characters never crash a C-locale terminal
    style = Style(colour_wanted())
    local: Optional[LocalServer] = None
    if engine_config is not None:
        try:
            local = LocalServer(engine_config, db_path)
        except (ValueError, RuntimeError) as exc:
            print(style(f"error: {exc}", "red"), file=sys.stderr)
            return 2
        local.start()
        url, api_key = local.url, None
        print(style(f"loading {engine_config.model} in-process (conversations in {local.db_path}) ...", "dim"),
              flush=True)
    api = ChatAPI(url, api_key)
    terminal = fancy_terminal()
    chat = Chat(api, style, where="the in-process server" if local else None, terminal=terminal)
    try:
        try:
            chat.connect(local)
            chat.start(new=new)
        except KeyboardInterrupt:
            print()
            return 130
        except ChatError as exc:
            chat.report(exc)
            return 1
        if not terminal:
            _setup_readline()
        chat.banner()
        return chat.run()
    finally:
        api.close()
        if local is not None:
            local.stop()
