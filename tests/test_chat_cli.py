"""`chatserve chat` through a pseudo-terminal (pexpect), against a real server on loopback with
dummy_model (and one on the scripted reasoning model of scripted_model.py), checking what it
stored through the conversations REST API."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pyte
import pytest
import requests
from live_server import WAIT_S, idle, live_server, tiny_engine_config, wait_until
from scripted_model import ANSWER, REASONING, write_scripted_model

from chatserve.cli import build_parser
from chatserve.client.chat import PARAM_TYPES, command_help, printable
from chatserve.config import ServerConfig

API_KEY = "chat-test-key"
PROMPT = "you> "
STATS = r"\[\d+ tokens"  # the dim line after each answer
UNSET = dict.fromkeys(PARAM_TYPES)  # a conversation's params, none set
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("chat-db") / "conversations.sqlite3"
    # 256 blocks x 16 tokens: room for the long answer the Ctrl-C test interrupts.
    config = ServerConfig(db_path=str(db), api_key=API_KEY)
    with live_server(tiny_engine_config(num_kv_blocks=256), config) as srv:
        yield srv


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory):
    """A live server on the scripted reasoning model: its greedy answer to any turn is
    <think> REASONING </think> ANSWER; conversations in memory."""
    model_dir, _ = write_scripted_model(tmp_path_factory.mktemp("scripted"))
    with live_server(tiny_engine_config(model=str(model_dir)), ServerConfig(api_key=API_KEY)) as srv:
        yield srv


class API:
    """The conversations REST API, as the tests check it."""

    def __init__(self, url: str):
        self.url = url
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def call(self, method: str, path: str, **kwargs) -> dict:
        r = requests.request(method, f"{self.url}/v1/conversations{path}", headers=self.headers,
                             timeout=WAIT_S, **kwargs)
        assert r.status_code < 300, r.text
        return r.json()

    def list(self) -> list[dict]:
        """Every conversation, following the list's pages."""
        out, query = [], {"limit": 100}
        while True:
            page = self.call("GET", "", params=query)
            out += page["data"]
            if not page["has_more"]:
                return out
            query["after"] = page["last_id"]

    def get(self, conv_id: str) -> dict:
        return self.call("GET", f"/{conv_id}")

    def create(self, **body) -> dict:
        return self.call("POST", "", json=body)

    def only(self) -> dict:
        conversations = self.list()
        assert len(conversations) == 1, conversations
        return self.get(conversations[0]["id"])


@pytest.fixture
def api(server):
    """The API, with the store emptied, so each test sees only its own conversations."""
    api = API(server.url)
    for conv in api.list():
        api.call("DELETE", f"/{conv['id']}")
    return api


@pytest.fixture
def spawn(server, tmp_path):
    children = []

    def spawn(*args: str, url: str | None = None, colour: bool = False, env: dict | None = None,
              width: int | None = None) -> pexpect.spawn:
        """A dumb terminal 200 columns wide; with width, a real one (xterm) that wide, 24 rows."""
        environ = {**os.environ, "TERM": "dumb", "XDG_DATA_HOME": str(tmp_path), "CHATSERVE_API_KEY": API_KEY}
        if width is not None:
            # No one answers prompt_toolkit's cursor position requests here (a terminal would).
            environ.update(TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
        environ.pop("NO_COLOR", None)
        if not colour:
            environ["NO_COLOR"] = "1"
        environ.update(env or {})
        environ = {k: v for k, v in environ.items() if v is not None}
        argv = ["-m", "chatserve.cli", "chat", *(["--url", url or server.url] if "--model" not in args else []), *args]
        # SIGINT back to its default in the chat: a test run started in the background by a
        # non-interactive shell has it ignored, and the child would inherit that (Ctrl-C tests).
        child = pexpect.spawn(sys.executable, argv, env=environ, encoding="utf-8", timeout=WAIT_S,
                              dimensions=(50, 200) if width is None else (24, width), cwd=str(REPO),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def say(child: pexpect.spawn, text: str) -> None:
    """Send a message at the prompt and wait for its answer, its stats line and the next prompt."""
    child.sendline(text)
    child.expect("assistant[^>]*> ")
    child.expect(STATS)
    child.expect_exact(PROMPT)


def command(child: pexpect.spawn, text: str, *expected: str) -> None:
    child.sendline(text)
    for pattern in expected:
        child.expect_exact(pattern)
    child.expect_exact(PROMPT)


def quit_with_ctrl_d(child: pexpect.spawn) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_chat_help_explains_every_flag():
    chat = build_parser()._subparsers._group_actions[0].choices["chat"]
    for action in chat._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    out = subprocess.run([sys.executable, "-m", "chatserve.cli", "chat", "--help"], capture_output=True,
                         text=True, timeout=WAIT_S, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for flag in ("--url", "--api-key", "--model", "--db", "--new", "--device", "--num-kv-blocks"):
        assert flag in out.stdout
    assert '"""' in out.stdout and "/edit" in out.stdout and "/branch" in out.stdout and "/continue" in out.stdout
    # And every command of the chat's /help.
    assert all(f"/{name}" in out.stdout for name in command_help()), out.stdout


def test_banner_message_answer_and_stats(api, spawn):
    conv = api.create(params={"max_tokens": 8, "temperature": 0})
    child = spawn()
    child.expect_exact("chatserve chat: dummy_model at ")
    child.expect_exact('end a line with \\ to continue')
    child.expect_exact('"""')
    child.expect_exact("/help")
    child.expect_exact("Resumed 'New chat'")  # the most recently updated conversation
    child.expect_exact(PROMPT)
    child.sendline("Hello there")
    child.expect_exact("assistant> ")
    child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s, first token \d+ ms, (\d+)/(\d+) prompt tokens cached")
    shown_tokens, shown_prompt = int(child.match.group(1)), int(child.match.group(3))
    child.expect_exact(PROMPT)
    quit_with_ctrl_d(child)

    stored = api.get(conv["id"])
    user, answer = stored["messages"]
    assert user["content"] == "Hello there" and user["role"] == "user"
    assert answer["role"] == "assistant" and answer["status"] == "complete"
    assert answer["finish_reason"] in ("stop", "length")
    assert 1 <= answer["stats"]["completion_tokens"] <= 8
    assert (shown_tokens, shown_prompt) == (answer["stats"]["completion_tokens"], answer["stats"]["prompt_tokens"])
    assert stored["title"] == "Hello there"


def test_colour_only_on_a_terminal_without_no_color(api, spawn):
    child = spawn(colour=True)
    child.expect_exact("\x1b[1mchatserve chat: ")
    child.expect_exact(PROMPT)
    quit_with_ctrl_d(child)
    child = spawn()
    child.expect_exact(PROMPT)
    assert "\x1b[" not in child.before
    quit_with_ctrl_d(child)


def test_multiline_input(api, spawn):
    api.create(params={"max_tokens": 4})
    child = spawn()
    child.expect_exact(PROMPT)
    child.sendline("alpha \\")
    child.expect_exact("...> ")
    say(child, "beta")
    child.sendline('"""')
    child.expect_exact("...> ")
    child.sendline("gamma")
    child.expect_exact("...> ")
    child.sendline("")
    child.expect_exact("...> ")
    say(child, 'delta"""')
    # An unfinished block is discarded by Ctrl-C, and the program keeps running.
    child.sendline('"""never sent')
    child.expect_exact("...> ")
    child.sendintr()
    child.expect_exact("discarded")
    child.expect_exact(PROMPT)
    quit_with_ctrl_d(child)

    users = [m["content"] for m in api.only()["messages"] if m["role"] == "user"]
    assert users == ["alpha \nbeta", "gamma\n\ndelta"]


def test_list_shows_fifty_at_a_time_and_list_more_the_next(api, spawn):
    for i in range(55):
        api.create(title=f"Topic {i:02d}")
    child = spawn()
    child.expect_exact(PROMPT)
    child.sendline("/list")
    child.expect(r"\* ?1\. Topic 54")
    child.expect(r"50\. Topic 05")
    child.expect_exact("More conversations: /list more")
    child.expect_exact(PROMPT)
    assert "Topic 04" not in child.before
    child.sendline("/list more")
    child.expect(r"51\. Topic 04")
    child.expect(r"55\. Topic 00")
    child.expect_exact(PROMPT)
    assert "More conversations" not in child.before
    command(child, "/switch 55", "Switched to 'Topic 00'")
    command(child, "/list more", "error: nothing more to list")
    quit_with_ctrl_d(child)


def test_conversation_commands(api, spawn):
    child = spawn("--new")
    child.expect_exact("New conversation.")
    child.expect_exact(PROMPT)
    command(child, "/params max_tokens=6", "max_tokens=6")
    say(child, "first topic")
    command(child, "/new", "New conversation")
    command(child, "/params max_tokens=6", "max_tokens=6")
    say(child, "second topic")
    assert [c["title"] for c in api.list()] == ["second topic", "first topic"]

    child.sendline("/list")
    child.expect(r"\* ?1\. second topic")
    child.expect(r"2\. first topic")
    child.expect_exact(PROMPT)
    command(child, "/switch 2", "Switched to 'first topic'", "you #1> first topic")
    command(child, "/rename Renamed one", "Renamed to 'Renamed one'")
    titles = {c["id"]: c["title"] for c in api.list()}
    assert sorted(titles.values()) == ["Renamed one", "second topic"]

    # By number (as /list showed it), after confirming.
    child.sendline("/delete 1")
    child.expect_exact("Delete 'second topic'")
    child.expect_exact("[y/N] ")
    command(child, "y", "Deleted 'second topic'")
    assert [c["title"] for c in api.list()] == ["Renamed one"]
    # The current one; saying no keeps it.
    child.sendline("/delete")
    child.expect_exact("[y/N] ")
    command(child, "n", "Not deleted")
    child.sendline("/delete")
    child.expect_exact("[y/N] ")
    command(child, "y", "Deleted 'Renamed one'", "New conversation")
    assert api.list() == []
    command(child, "/switch 7", "error: no conversation #7")
    command(child, "/frobnicate", "unknown command /frobnicate")
    # Ctrl-C at the prompt exits.
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def branch_siblings(conv: dict) -> list[int]:
    return [len(m["siblings"]) for m in conv["messages"]]


def test_edit_and_regen_make_branches(api, spawn):
    conv = api.create(params={"max_tokens": 5})
    child = spawn()
    child.expect_exact(PROMPT)
    say(child, "one")
    say(child, "two")

    child.sendline("/regen")
    child.expect_exact("assistant (2/2)> ")
    child.expect(STATS)
    child.expect_exact(PROMPT)
    stored = api.get(conv["id"])
    assert branch_siblings(stored) == [1, 1, 1, 2]
    first_answer = stored["messages"][3]["siblings"][0]
    assert stored["messages"][3]["sibling_index"] == 1 and stored["messages"][3]["id"] != first_answer

    # Default: the last message of yours; the new text after the command.
    child.sendline("/edit two, edited")
    child.expect_exact("you #2 (2/2)> two, edited")
    child.expect_exact("assistant> ")
    child.expect(STATS)
    child.expect_exact(PROMPT)
    stored = api.get(conv["id"])
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["one", "two, edited"]
    assert branch_siblings(stored) == [1, 1, 2, 1]

    # By number: the first message, which drops the rest of the branch.
    child.sendline("/edit 1 uno")
    child.expect_exact("you #1 (2/2)> uno")
    child.expect(STATS)
    child.expect_exact(PROMPT)
    stored = api.get(conv["id"])
    assert [m["content"] for m in stored["messages"]][0] == "uno"
    assert branch_siblings(stored) == [2, 1]
    # The old branches are all kept: 2 roots, and "two" has its edit beside it.
    command(child, "/history", "you #1 (2/2)> uno", "assistant #1a> ")
    command(child, "/edit 5 nope", "error: no message #5")
    quit_with_ctrl_d(child)


def first_line(text: str) -> str:
    """What the terminal shows of an answer's text, in one piece (the pty turns newlines into \\r\\n)."""
    lines = printable(text).strip().splitlines()
    return lines[0].strip() if lines else ""


def test_branch_switches_between_versions(api, spawn):
    conv = api.create(params={"max_tokens": 4})
    child = spawn()
    child.expect_exact(PROMPT)
    command(child, "/help", "/branch N [next|prev|K]")
    say(child, "one")
    say(child, "two")
    command(child, "/branch", "No message on this branch has other versions")
    command(child, "/branch 2a", "error: message #2a has no other versions")

    # A second answer to #2; a dim line says the first one is kept and how to go back to it.
    child.sendline("/regen")
    child.expect_exact("assistant (2/2)> ")
    child.expect(STATS)
    child.expect_exact("(the old version is kept as 1/2: /branch 2a 1 goes back to it)")
    child.expect_exact(PROMPT)
    stored = api.get(conv["id"])
    old_answer, new_answer = stored["messages"][3]["siblings"]
    assert stored["current_message_id"] == new_answer
    command(child, "/branch", "#2a (2/2)")

    # prev: the first answer, and the branch is reprinted with it, numbered as /history numbers it.
    command(child, "/branch 2a prev", "Message #2a: version 1/2.", "you #1> one", "assistant #1a> ",
            "you #2> two", "assistant #2a (1/2)> ")
    stored = api.get(conv["id"])
    assert stored["current_message_id"] == old_answer == stored["messages"][3]["id"]
    old_text = stored["messages"][3]["content"]
    assert first_line(old_text) in child.before
    # next (the default), wrapping around after the last; or a version by number.
    command(child, "/branch 2a", "Message #2a: version 2/2.", "assistant #2a (2/2)> ")
    assert api.get(conv["id"])["current_message_id"] == new_answer
    command(child, "/branch #2A next", "Message #2a: version 1/2.", "assistant #2a (1/2)> ")
    assert api.get(conv["id"])["current_message_id"] == old_answer
    command(child, "/branch 2a 2", "Message #2a: version 2/2.", "assistant #2a (2/2)> ")
    assert api.get(conv["id"])["current_message_id"] == new_answer

    # A second version of the user message #2.
    child.sendline("/edit 2 two, edited")
    child.expect_exact("you #2 (2/2)> two, edited")
    child.expect(STATS)
    child.expect_exact("(the old version is kept as 1/2: /branch 2 1 goes back to it)")
    child.expect_exact(PROMPT)
    stored = api.get(conv["id"])
    old_user, new_user = stored["messages"][2]["siblings"]
    assert stored["messages"][2]["id"] == new_user and stored["messages"][2]["content"] == "two, edited"
    edited_answer = stored["messages"][3]["id"]
    assert stored["current_message_id"] == edited_answer

    # Back to the old "two": its branch goes down to its newest answer, the regenerated one.
    command(child, "/branch 2 prev", "Message #2: version 1/2.", "you #1> one", "you #2 (1/2)> two\r\n",
            "assistant #2a (2/2)> ")
    stored = api.get(conv["id"])
    assert stored["current_message_id"] == new_answer
    assert [m["id"] for m in stored["messages"]][2:] == [old_user, new_answer]
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["one", "two"]
    command(child, "/branch 2", "you #2 (2/2)> two, edited", "assistant #2a> ")
    assert api.get(conv["id"])["current_message_id"] == edited_answer
    command(child, "/branch 2 1", "you #2 (1/2)> two\r\n", "assistant #2a (2/2)> ")
    assert api.get(conv["id"])["current_message_id"] == new_answer
    # The next message continues the branch on show.
    say(child, "three")
    stored = api.get(conv["id"])
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["one", "two", "three"]
    assert [m["id"] for m in stored["messages"]][2:4] == [old_user, new_answer]
    assert branch_siblings(stored) == [1, 1, 2, 2, 1, 1]

    command(child, "/branch 9", "error: no message #9")
    command(child, "/branch 2 5", "error: no version 5 of message #2: it has 2")
    command(child, "/branch 2 sideways", "error: cannot read '2 sideways'")
    command(child, "/edit 2a hello", "error: only your messages can be edited")
    assert "Traceback" not in child.before
    quit_with_ctrl_d(child)


def test_system_prompt_and_params(api, spawn):
    conv = api.create()
    child = spawn()
    child.expect_exact(PROMPT)
    command(child, "/system", "(no system prompt)")
    command(child, "/system You are terse.", "System prompt set.")
    command(child, "/system", "You are terse.")
    command(child, "/params", "temperature=default top_p=default max_tokens=default")
    command(child, "/params temperature=0.5 top_p=0.9 max_tokens=3", "temperature=0.5 top_p=0.9 max_tokens=3")
    stored = api.get(conv["id"])
    assert stored["system_prompt"] == "You are terse."
    assert stored["params"] == {**UNSET, "temperature": 0.5, "top_p": 0.9, "max_tokens": 3}
    command(child, "/params temperature=default", "temperature=default top_p=0.9 max_tokens=3",
            "In effect: temperature 1.0 (default), top_p 0.9 (conversation), max_tokens 3 (conversation)")
    assert api.get(conv["id"])["params"] == {**UNSET, "top_p": 0.9, "max_tokens": 3}
    command(child, "/params top_k=5 stop=END seed=7", "top_k=5", "stop=END",
            "top_k 5 (conversation)", 'seed 7 (conversation), stop ["END"] (conversation)')
    assert api.get(conv["id"])["params"] == {**UNSET, "top_p": 0.9, "max_tokens": 3, "top_k": 5, "stop": ["END"],
                                             "seed": 7}
    # Bad values: a clear message, no traceback, the chat goes on.
    command(child, "/params temperature=warm", "error: temperature must be a number")
    command(child, "/params colour=blue", "error: cannot read 'colour=blue'")
    command(child, "/params top_p=7", "error: ")
    assert "Traceback" not in child.before
    say(child, "hi")
    assert api.get(conv["id"])["messages"][1]["stats"]["completion_tokens"] <= 3
    command(child, "/system none", "System prompt cleared.")
    assert api.get(conv["id"])["system_prompt"] is None
    quit_with_ctrl_d(child)


def test_ctrl_c_stops_the_answer_not_the_program(api, spawn, server):
    # Greedy: dummy_model then answers this with 3000 tokens, never a stop token; sampled, it
    # may stop after a few, before the Ctrl-C.
    conv = api.create(params={"max_tokens": 3000, "temperature": 0})
    child = spawn()
    child.expect_exact(PROMPT)
    child.sendline("Tell me a very long story")
    child.expect_exact("assistant> ")
    # Some text has streamed: the answer is under way.
    child.expect(r"\S{3}")
    child.sendintr()
    child.expect_exact("[stopped")
    child.expect_exact(PROMPT)
    answer = api.get(conv["id"])["messages"][1]
    assert answer["status"] == "stopped" and answer["finish_reason"] == "abort"
    assert answer["content"]
    wait_until(lambda: idle(server.engine), "the engine to free the stopped request")

    # The program is still running and the conversation goes on.
    command(child, "/params max_tokens=4", "max_tokens=4")
    say(child, "shorter, please")
    command(child, "/history", "[stopped]", "you #2> shorter, please")
    quit_with_ctrl_d(child)
    assert [m["status"] for m in api.get(conv["id"])["messages"]] == ["complete", "stopped", "complete", "complete"]


def test_unreachable_server_is_a_clear_error(spawn):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there now
    child = spawn(url=url)
    child.expect_exact(f"cannot reach the server at {url}")
    child.expect_exact("chatserve serve")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "Traceback" not in child.before


def test_missing_api_key_says_how_to_give_one(api, spawn):
    child = spawn(env={"CHATSERVE_API_KEY": None})
    child.expect_exact("--api-key")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "Traceback" not in child.before
    child = spawn("--api-key", "wrong")
    child.expect_exact("CHATSERVE_API_KEY")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_in_process_model_answers(spawn, tmp_path):
    db = tmp_path / "local.sqlite3"
    child = spawn("--model", "dummy_model", "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "32",
                  "--num-threads", "1", "--db", str(db), env={"CHATSERVE_API_KEY": None})
    child.expect_exact(f"loading dummy_model in-process (conversations in {db})")
    child.expect_exact("chatserve chat: dummy_model at http://127.0.0.1:", timeout=120)
    child.expect_exact("New conversation.")
    child.expect_exact(PROMPT)
    command(child, "/params max_tokens=5", "max_tokens=5")
    say(child, "Hello, model in this process")
    command(child, "/list", "1. Hello, model in this process")
    quit_with_ctrl_d(child)
    assert db.stat().st_size > 0


ANSI = re.compile(r"\x1b\[[\d;]*m")
DIM_ITALIC = re.compile(r"\x1b\[2;3m(.*?)\x1b\[0m", re.S)


def check_reasoning_answer(child: pexpect.spawn) -> None:
    """An answer streams (in colour) as: the dim italic "(thinking)" label and the reasoning, a new
    line, the answer in plain text, a new line, then the stats line."""
    child.expect_exact("assistant> ")
    child.expect(STATS)
    shown = child.before
    assert "".join(DIM_ITALIC.findall(shown)) == f"(thinking) {REASONING}", repr(shown)
    assert ANSWER not in "".join(DIM_ITALIC.findall(shown))
    assert ANSI.sub("", shown) == f"(thinking) {REASONING}\r\n{ANSWER}\r\n", repr(shown)
    child.expect_exact(PROMPT)


def test_reasoning_model_end_to_end(reasoning_server, spawn):
    api = API(reasoning_server.url)
    child = spawn(url=reasoning_server.url, colour=True)
    child.expect_exact("New conversation.")
    child.expect_exact(PROMPT)
    # The scripted model's generation_config samples: greedy, it says its script.
    command(child, "/params temperature=0", "temperature=0.0")
    child.sendline("What is the capital of France?")
    check_reasoning_answer(child)
    conv = api.only()
    user, answer = conv["messages"]
    assert user["content"] == "What is the capital of France?" and user["reasoning_content"] is None
    assert (answer["reasoning_content"], answer["content"]) == (REASONING, ANSWER)
    assert (answer["status"], answer["finish_reason"]) == ("complete", "stop")

    # Every turn's greedy answer is the script again (the logits depend on the last token alone).
    child.sendline("And of Italy?")
    check_reasoning_answer(child)
    messages = api.get(conv["id"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "And of Italy?"
    assert (messages[3]["reasoning_content"], messages[3]["content"]) == (REASONING, ANSWER)
    assert (messages[3]["status"], messages[3]["finish_reason"]) == ("complete", "stop")

    # /history reprints each answer's reasoning, dim italic, before its text.
    child.sendline("/history")
    child.expect_exact(PROMPT)
    shown = child.before
    assert DIM_ITALIC.findall(shown) == [f"(thinking) {REASONING}"] * 2, repr(shown)
    history = ANSI.sub("", shown)
    for n, question in ((1, "What is the capital of France?"), (2, "And of Italy?")):
        assert f"you #{n}> {question}\r\nassistant #{n}a> (thinking) {REASONING}\r\n{ANSWER}\r\n" in history, \
            repr(history)
    quit_with_ctrl_d(child)

    # Resuming shows the last exchange the same way.
    child = spawn(url=reasoning_server.url)
    child.expect_exact("Resumed 'What is the capital of France?'")
    child.expect_exact(f"you #2> And of Italy?\r\nassistant #2a> (thinking) {REASONING}\r\n{ANSWER}\r\n")
    child.expect_exact(PROMPT)
    quit_with_ctrl_d(child)


@pytest.mark.parametrize("terminal", ["dumb", "xterm"])
def test_an_answer_cut_off_by_a_server_shutdown_is_marked_aborted(spawn, tmp_path, terminal):
    from chatserve.server.app import drain

    config = ServerConfig(db_path=str(tmp_path / "conversations.sqlite3"), api_key=API_KEY)
    with live_server(tiny_engine_config(num_kv_blocks=256), config) as srv:
        API(srv.url).create(params={"max_tokens": 3000, "temperature": 0})
        child = spawn(url=srv.url, width=None if terminal == "dumb" else 200)
        prompt = PROMPT if terminal == "dumb" else "you>"
        child.expect_exact(prompt)
        child.send("Tell me a very long story\r")
        child.expect_exact("assistant> ")
        child.expect(r"\S{3}")  # the answer is under way
        drain(srv.app)  # what SIGTERM and Ctrl-C on the server do
        child.expect_exact("[aborted: the server is shutting down]")
        child.expect_exact(prompt)
        assert not re.search(STATS, child.before)  # no stats line: it did not finish
        quit_with_ctrl_d(child)


# -- in a real terminal: line editing (prompt_toolkit) and rendered answers (rich) -----------------


class Screen:
    """What a terminal shows of a child's output: its bytes played on a pyte screen as wide as the
    child's, and tall enough that nothing scrolls off; or, given its height, as tall as the child's,
    with the lines scrolled off above kept (as a terminal's scrollback)."""

    def __init__(self, child: pexpect.spawn, width: int, height: int | None = None):
        self.child = child
        self.screen = pyte.Screen(width, 1000) if height is None else pyte.HistoryScreen(width, height, 100_000)
        self.stream = pyte.Stream(self.screen)

    def lines(self) -> list[str]:
        history = getattr(self.screen, "history", None)
        scrolled = [] if history is None else ["".join(c.data for c in line.values()) for line in history.top]
        lines = [line.rstrip() for line in scrolled + self.screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def wait(self, condition, what: str) -> list[str]:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.05))
            except (pexpect.TIMEOUT, pexpect.EOF):
                pass
            lines = self.lines()
            if condition(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen ends:\n" + "\n".join(lines[-30:]))

    def prompt(self, answers: int = 0) -> list[str]:
        """Wait for the prompt, after `answers` stats lines in all."""
        return self.wait(lambda lines: lines and lines[-1] == "you>" and
                         sum(bool(re.match(STATS, line)) for line in lines) == answers,
                         f"the prompt after {answers} answers")


def test_terminal_recalls_a_block_whole_completes_commands_and_continues(api, spawn):
    conv = api.create(params={"max_tokens": 6, "temperature": 0})
    child = spawn(width=60)
    screen = Screen(child, 60)
    screen.prompt()
    child.send('"""\r')
    child.send("line one\r")
    child.send('line two"""\r')  # Enter inside the block starts a new line; after its end, it sends
    screen.prompt(1)
    # The up arrow brings back the whole block, ready to send again as it was.
    child.send("\x1b[A")
    screen.wait(lambda lines: lines[-3:] == ['you> """', "...> line one", '...> line two"""'], "the block recalled")
    child.send("\r")
    screen.prompt(2)
    users = [m["content"] for m in api.get(conv["id"])["messages"] if m["role"] == "user"]
    assert users == ["line one\nline two"] * 2

    # Tab completes a command; /continue goes on with the answer, in the same message.
    before = api.get(conv["id"])["messages"][-1]
    assert before["finish_reason"] == "length"
    child.send("/cont\t")
    screen.wait(lambda lines: lines[-1] == "you> /continue", "the command completed")
    child.send("\r")
    lines = screen.prompt(3)
    assert "assistant> (continued)" in lines
    after = api.get(conv["id"])["messages"][-1]
    assert after["id"] == before["id"] and after["siblings"] == [before["id"]]
    assert after["content"].startswith(before["content"]) and len(after["content"]) > len(before["content"])
    assert after["stats"]["prompt_tokens"] == before["stats"]["prompt_tokens"] + 6
    assert len(api.get(conv["id"])["messages"]) == 4

    # Ctrl-C throws an unfinished message away; at an empty prompt, it exits.
    child.send('"""never sent\r')
    child.sendintr()
    screen.wait(lambda lines: lines[-2:] == ["(unfinished message discarded)", "you>"], "the message discarded")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(api.get(conv["id"])["messages"]) == 4


# Words each one token of the scripted model's tokenizer (with the space before them): its script
# must not repeat a token. Together, an answer many lines long at 40 columns.
WORDS = ("about answer assist asyncio before block check code computer early error every first function good "
         "help item keeps know largest leave like list look love main mean meeting model morning name next night "
         "numbers only planet poem point").split()


def test_terminal_wraps_a_streamed_answer_by_word(tmp_path, spawn):
    answer = " " + " ".join(WORDS)
    model_dir, _ = write_scripted_model(tmp_path / "model", answer)
    with live_server(tiny_engine_config(model=str(model_dir)), ServerConfig(api_key=API_KEY)) as srv:
        API(srv.url).create(params={"temperature": 0, "max_tokens": 100})
        child = spawn(url=srv.url, width=40)
        screen = Screen(child, 40)
        screen.prompt()
        child.send("Hi there. How are you?\r")
        lines = screen.prompt(1)
        quit_with_ctrl_d(child)
    shown = lines[lines.index("assistant>") + 1:]
    shown = shown[:next(i for i, line in enumerate(shown) if re.match(STATS, line))]
    assert shown[0] == f"(thinking) {REASONING}"
    rows = shown[1:]
    assert len(rows) >= 6 and all(len(row) <= 40 for row in rows), rows
    # Every row holds whole words: read in order, they are the answer, broken only between words.
    assert " ".join(rows) == answer.strip(), rows
    assert all(set(row.split()) <= set(WORDS) for row in rows)


def test_terminal_shows_an_answer_taller_than_the_screen_once(api, spawn):
    """While a block grows past the screen, only its last screenful is redrawn; once done it is
    printed whole: the scrollback holds each line once."""
    conv = api.create(params={"max_tokens": 600, "temperature": 0})
    child = spawn(width=60)
    screen = Screen(child, 60, height=24)
    screen.prompt()
    child.send("Tell me a very long story\r")
    lines = screen.prompt(1)
    quit_with_ctrl_d(child)
    shown = lines[lines.index("assistant>") + 1:next(i for i, line in enumerate(lines) if re.match(STATS, line))]
    content = api.get(conv["id"])["messages"][-1]["content"]
    assert len(shown) > 24 and "".join("".join(shown).split()) == "".join(printable(content).split())


def test_terminal_ctrl_c_leaves_the_answer_shown_as_received(api, spawn, server):
    """Ctrl-C mid-block: the redrawn part is replaced by the text received, nothing left behind
    (not even a line the echoed ^C wrapped)."""
    conv = api.create(params={"max_tokens": 3000, "temperature": 0})
    child = spawn(width=60)
    screen = Screen(child, 60, height=24)
    screen.prompt()
    child.send("Tell me a very long story\r")
    # The block being written fills the screen (its last screenful only: nothing scrolls off yet).
    screen.wait(lambda lines: sum(len(line) > 50 for line in lines[-24:]) >= 20, "the answer to fill the screen")
    child.sendintr()
    lines = screen.wait(lambda lines: lines[-1] == "you>" and any(line.startswith("[stopped") for line in lines),
                        "the answer stopped")
    quit_with_ctrl_d(child)
    wait_until(lambda: idle(server.engine), "the engine to free the stopped request")
    shown = lines[lines.index("assistant>") + 1:next(i for i, line in enumerate(lines) if line.startswith("[stopped"))]
    shown_text = "".join("".join(shown).split())
    stored = "".join(printable(api.get(conv["id"])["messages"][-1]["content"]).split())
    assert len(shown_text) >= 20 * 50 and stored.startswith(shown_text)


def test_terminal_renders_markdown(api, spawn):
    text = ("## Shopping\n\nBuy **three** apples and `one` pear.\n\n- first item\n- second item\n\n"
            "```python\nprint('hi')\n```\n\n| name | count |\n|------|-------|\n| pear | 1 |")
    api.call("POST", "/import", json={"title": "Markdown", "messages": [
        {"id": "q", "parent_id": None, "role": "user", "content": "A list?"},
        {"id": "a", "parent_id": "q", "role": "assistant", "content": text}]})
    child = spawn(width=60)
    screen = Screen(child, 60)
    lines = screen.prompt()
    quit_with_ctrl_d(child)
    shown = "\n".join(lines[lines.index("assistant #1a>") + 1:])
    assert "Shopping" in shown and "##" not in shown
    assert "Buy three apples and one pear." in shown and "**" not in shown and "`" not in shown
    assert re.search(r"• first item\n\s*• second item", shown), shown
    assert "print('hi')" in shown and "```" not in shown
    assert re.search(r"name +count\n *─+\n *pear +1", shown) and "|" not in shown, shown  # a table
