"""The conversation store: SQLite (stdlib sqlite3), one file per server (or ":memory:").

Conversations hold a tree of messages. Every write is one transaction, so a crash or a
disconnect mid-answer leaves the last saved state, never half of one; answers still marked
"generating" when the store opens were cut off by a crash and become "stopped".

Used from the event loop thread only: each call is a few small statements, so it blocks the
loop for far less than a generation step."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Optional

from ..config import DEFAULT_USER, data_dir

log = logging.getLogger("chatserve.server")

DEFAULT_TITLE = "New chat"
MAX_TITLE_CHARS = 256  # the API refuses longer titles; longer ones stored before that are cut at open

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    system_prompt TEXT,
    params TEXT NOT NULL,                -- JSON {"temperature", "top_p", "max_tokens", ...}: server/conversations.py Params
    current_message_id TEXT,
    owner TEXT NOT NULL DEFAULT 'default'   -- the user whose key created it (DEFAULT_USER)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,             -- creation order (siblings are listed in it)
    id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    reasoning_content TEXT,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    finish_reason TEXT,
    stats TEXT,                          -- JSON, once an answer is finished
    -- Assistant messages: the exact token ids the answer was prompted with and generated (JSON
    -- lists), and a digest of the rendered history they were prompted with, so the next turn
    -- can extend the ids only when that history is unchanged.
    prompt_token_ids TEXT,
    output_token_ids TEXT,
    prompt_key TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
"""
# After the migrations: the owner column may be new.
INDEXES = "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated);"
# Full-text search over titles and message text (SQLite's FTS5): indexes kept by triggers over the
# tables themselves (external content), so every write, a cascade included, keeps them right.
SEARCH_TABLES = {"messages_fts": ("messages", "seq", "content"), "titles_fts": ("conversations", "rowid", "title")}
SEARCH_SCHEMA = "".join(f"""
CREATE VIRTUAL TABLE IF NOT EXISTS {fts} USING fts5({column}, content='{table}', content_rowid='{rowid}',
    tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS {fts}_insert AFTER INSERT ON {table} BEGIN
    INSERT INTO {fts} (rowid, {column}) VALUES (new.{rowid}, new.{column});
END;
CREATE TRIGGER IF NOT EXISTS {fts}_delete AFTER DELETE ON {table} BEGIN
    INSERT INTO {fts} ({fts}, rowid, {column}) VALUES ('delete', old.{rowid}, old.{column});
END;
CREATE TRIGGER IF NOT EXISTS {fts}_update AFTER UPDATE OF {column} ON {table} BEGIN
    INSERT INTO {fts} ({fts}, rowid, {column}) VALUES ('delete', old.{rowid}, old.{column});
    INSERT INTO {fts} (rowid, {column}) VALUES (new.{rowid}, new.{column});
END;""" for fts, (table, rowid, column) in SEARCH_TABLES.items())
# Around the matched terms of a search snippet, then taken out (the API gives their offsets).
MATCH_START, MATCH_END = "\ue000", "\ue001"
SNIPPET_TOKENS = 16
assert DEFAULT_USER == "default"  # the owner column's default above

# Every column but the token ids, which only the prompt builder and the cache check need.
MESSAGE_COLUMNS = ("id, conversation_id, parent_id, role, content, reasoning_content, created, status, "
                   "finish_reason, stats")


def default_db_path() -> Path:
    return data_dir() / "conversations.sqlite3"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _conversation(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["params"] = json.loads(out["params"])
    return out


def _message(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["stats"] = json.loads(out["stats"]) if out["stats"] else None
    return out


def _unmark(marked: str) -> tuple[str, list[list[int]]]:
    """A snippet without its match marks, and the [start, end) offsets they enclosed."""
    text, highlights, start = [], [], None
    length = 0
    for piece in re.split(f"([{MATCH_START}{MATCH_END}])", marked):
        if piece == MATCH_START:
            start = length
        elif piece == MATCH_END:
            if start is not None:
                highlights.append([start, length])
            start = None
        else:
            text.append(piece)
            length += len(piece)
    return "".join(text), highlights


class Store:
    def __init__(self, path: str):
        self.path = path
        # check_same_thread=False: the app is built on one thread and served on another; every
        # call still comes from the event loop, one at a time.
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")
        if path != ":memory:":
            # WAL: a crash mid-write rolls back cleanly, and readers never wait for the writer.
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
        with self.db:
            self.db.executescript(SCHEMA)
            self._migrate()
            self.db.executescript(INDEXES)
            new_indexes = [name for name in SEARCH_TABLES if not self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone()]
            self.db.executescript(SEARCH_SCHEMA)
            for name in new_indexes:  # a store from before search: index what it holds
                self.db.execute(f"INSERT INTO {name} ({name}) VALUES ('rebuild')")
            cut = self.db.execute("UPDATE messages SET status = 'stopped', finish_reason = 'abort' "
                                  "WHERE status = 'generating'").rowcount
        if cut:
            log.info("%d answer(s) cut off by the last shutdown marked stopped", cut)

    def _migrate(self) -> None:
        """Bring a store written by an older chatserve up to SCHEMA."""
        columns = {row["name"] for row in self.db.execute("PRAGMA table_info(conversations)")}
        if "owner" not in columns:  # from before users: every conversation belongs to the default user
            self.db.execute(f"ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT '{DEFAULT_USER}'")
            log.info("conversation store upgraded: existing conversations belong to user %r", DEFAULT_USER)
        # Titles from before the bound: every list carries them, so a huge one would make each list huge.
        cut = self.db.execute("UPDATE conversations SET title = substr(title, 1, ?) WHERE length(title) > ?",
                              (MAX_TITLE_CHARS, MAX_TITLE_CHARS)).rowcount
        if cut:
            log.info("%d conversation title(s) longer than %d characters cut to that", cut, MAX_TITLE_CHARS)

    @classmethod
    def open(cls, path: Optional[str] = None) -> "Store":
        """path None: the default file, its directory created."""
        if path is None:
            path = str(default_db_path())
        try:
            if path != ":memory:":
                path = str(Path(path).expanduser())
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            store = cls(path)
        except (OSError, sqlite3.Error) as exc:
            raise RuntimeError(f"cannot open the conversation store {path}: {exc}") from None
        log.info("conversations stored in %s", path)
        return store

    def close(self) -> None:
        self.db.close()

    # -- conversations ------------------------------------------------------------------------

    def create_conversation(self, title: Optional[str], system_prompt: Optional[str], params: dict,
                            owner: str = DEFAULT_USER) -> dict:
        now = time.time()
        conv_id = new_id("conv")
        with self.db:
            self.db.execute("INSERT INTO conversations (id, title, created, updated, system_prompt, params, owner) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (conv_id, title or DEFAULT_TITLE, now, now, system_prompt, json.dumps(params), owner))
        return self.conversation(conv_id)

    def conversation(self, conv_id: str, owner: Optional[str] = None) -> Optional[dict]:
        """The conversation; with owner, only if it is that user's (another's is None, as a missing one)."""
        row = self.db.execute("SELECT * FROM conversations WHERE id = ? AND (? IS NULL OR owner = ?)",
                              (conv_id, owner, owner)).fetchone()
        return _conversation(row) if row else None

    def conversations(self, owner: Optional[str] = None, limit: Optional[int] = None,
                      after: Optional[str] = None, query: Optional[str] = None) -> list[dict]:
        """Most recently updated first: owner's (None: everyone's), at most limit, those after the
        conversation `after` in that order (a cursor that stays put while others are added); with
        query (FTS5 syntax), only those whose title or any message matches it.
        Raises KeyError when `after` is not one of them, sqlite3.OperationalError for a query FTS5 cannot read."""
        where, args = ["(? IS NULL OR owner = ?)"], [owner, owner]
        if query is not None:
            where.append("id IN (SELECT m.conversation_id FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
                         "WHERE messages_fts MATCH ? UNION SELECT c.id FROM titles_fts JOIN conversations c ON "
                         "c.rowid = titles_fts.rowid WHERE titles_fts MATCH ?)")
            args += [query, query]
        if after is not None:
            cursor = self.db.execute("SELECT updated, rowid FROM conversations WHERE id = ? AND (? IS NULL OR "
                                     "owner = ?)", (after, owner, owner)).fetchone()
            if cursor is None:
                raise KeyError(after)
            where.append("(updated < ? OR (updated = ? AND rowid < ?))")
            args += [cursor[0], cursor[0], cursor[1]]
        rows = self.db.execute(f"SELECT * FROM conversations WHERE {' AND '.join(where)} "
                               "ORDER BY updated DESC, rowid DESC LIMIT ?", (*args, -1 if limit is None else limit))
        return [_conversation(row) for row in rows]

    def matches(self, conv_id: str, query: str, limit: int) -> list[dict]:
        """Where query matches in the conversation: its title ("message_id" None), then its best
        matching messages, at most limit in all, each {"message_id", "role", "snippet", "highlights"}:
        a piece of the text around the match and the [start, end) offsets of the matched terms in it."""
        rows = self.db.execute(
            "SELECT NULL, NULL, snippet(titles_fts, 0, ?, ?, '…', ?) FROM titles_fts JOIN conversations c "
            "ON c.rowid = titles_fts.rowid WHERE titles_fts MATCH ? AND c.id = ?",
            (MATCH_START, MATCH_END, SNIPPET_TOKENS, query, conv_id)).fetchall()
        rows += self.db.execute(
            "SELECT m.id, m.role, snippet(messages_fts, 0, ?, ?, '…', ?) FROM messages_fts JOIN messages m "
            "ON m.seq = messages_fts.rowid WHERE messages_fts MATCH ? AND m.conversation_id = ? "
            "ORDER BY rank, m.seq LIMIT ?",
            (MATCH_START, MATCH_END, SNIPPET_TOKENS, query, conv_id, limit)).fetchall()
        out = []
        for message_id, role, marked in rows[:limit]:
            text, highlights = _unmark(marked)
            out.append({"message_id": message_id, "role": role, "snippet": text, "highlights": highlights})
        return out

    def update_conversation(self, conv_id: str, touch: bool = True, **values) -> None:
        """Set columns (params as a dict); touch: also mark it updated now."""
        if "params" in values:
            values["params"] = json.dumps(values["params"])
        if touch:
            values["updated"] = time.time()
        if not values:
            return
        assignments = ", ".join(f"{name} = ?" for name in values)  # names come from our code only
        with self.db:
            self.db.execute(f"UPDATE conversations SET {assignments} WHERE id = ?", (*values.values(), conv_id))

    def delete_conversation(self, conv_id: str) -> bool:
        with self.db:
            return self.db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,)).rowcount > 0

    # -- messages -----------------------------------------------------------------------------

    def messages(self, conv_id: str) -> list[dict]:
        """Every message of the conversation, in creation order, without token ids."""
        rows = self.db.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY seq",
                               (conv_id,))
        return [_message(row) for row in rows]

    def message(self, conv_id: str, message_id: str) -> Optional[dict]:
        row = self.db.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND id = ?",
                              (conv_id, message_id)).fetchone()
        return _message(row) if row else None

    def delete_messages(self, conv_id: str, message_ids: list[str], current_message_id: Optional[str]) -> None:
        """Delete these messages and show current_message_id's branch: one transaction."""
        with self.db:
            self.db.executemany("DELETE FROM messages WHERE conversation_id = ? AND id = ?",
                                [(conv_id, message_id) for message_id in message_ids])
            self.db.execute("UPDATE conversations SET current_message_id = ?, updated = ? WHERE id = ?",
                            (current_message_id, time.time(), conv_id))

    def import_conversation(self, owner: str, title: str, system_prompt: Optional[str], params: dict,
                            created: float, messages: list[dict], current_message_id: Optional[str]) -> dict:
        """A new conversation holding `messages` (parents first, ids already fresh): one transaction."""
        conv_id, now = new_id("conv"), time.time()
        with self.db:
            self.db.execute("INSERT INTO conversations (id, title, created, updated, system_prompt, params, owner, "
                            "current_message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (conv_id, title, created, now, system_prompt, json.dumps(params), owner,
                             current_message_id))
            self.db.executemany(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, reasoning_content, created, "
                "status, finish_reason, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(m["id"], conv_id, m["parent_id"], m["role"], m["content"], m["reasoning_content"], m["created"],
                  m["status"], m["finish_reason"], json.dumps(m["stats"]) if m["stats"] else None) for m in messages])
        return self.conversation(conv_id)

    def token_ids(self, message_id: str) -> tuple[Optional[list[int]], Optional[list[int]], Optional[str]]:
        """(prompt ids, output ids, prompt key) of an assistant message; Nones when unknown."""
        row = self.db.execute("SELECT prompt_token_ids, output_token_ids, prompt_key FROM messages WHERE id = ?",
                              (message_id,)).fetchone()
        if row is None or row[0] is None or row[1] is None:
            return None, None, None
        return json.loads(row[0]), json.loads(row[1]), row[2]

    def answer_token_ids(self, message_id: Optional[str]) -> Optional[list[int]]:
        """Prompt + output ids of the last answer on the branch ending at message_id."""
        while message_id is not None:
            row = self.db.execute("SELECT role, parent_id, prompt_token_ids, output_token_ids FROM messages "
                                  "WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return None
            if row["role"] == "assistant":
                if row["prompt_token_ids"] is None:
                    return None
                return json.loads(row["prompt_token_ids"]) + json.loads(row["output_token_ids"] or "[]")
            message_id = row["parent_id"]
        return None

    def start_answer(self, conv_id: str, user: Optional[dict], assistant: dict, prompt_token_ids: list[int],
                     prompt_key: str, title: Optional[str]) -> None:
        """Add the new user message (if any) and the generating answer, and show their branch:
        one transaction, so a conversation never holds a question without its answer row."""
        now = time.time()
        with self.db:
            for msg in ([user] if user else []) + [assistant]:
                self.db.execute(
                    "INSERT INTO messages (id, conversation_id, parent_id, role, content, created, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (msg["id"], conv_id, msg["parent_id"], msg["role"], msg["content"], now, msg["status"]))
            self.db.execute("UPDATE messages SET prompt_token_ids = ?, output_token_ids = '[]', prompt_key = ? "
                            "WHERE id = ?", (json.dumps(prompt_token_ids), prompt_key, assistant["id"]))
            values = {"current_message_id": assistant["id"], "updated": now}
            if title:
                values["title"] = title
            assignments = ", ".join(f"{name} = ?" for name in values)
            self.db.execute(f"UPDATE conversations SET {assignments} WHERE id = ?", (*values.values(), conv_id))

    def start_continue(self, conv_id: str, message_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                       prompt_key: str) -> None:
        """Mark an answer generating again, to be extended (the ids it goes on from), and show its branch."""
        now = time.time()
        with self.db:
            self.db.execute("UPDATE messages SET status = 'generating', finish_reason = NULL, stats = NULL, "
                            "prompt_token_ids = ?, output_token_ids = ?, prompt_key = ? WHERE id = ?",
                            (json.dumps(prompt_token_ids), json.dumps(output_token_ids), prompt_key, message_id))
            self.db.execute("UPDATE conversations SET current_message_id = ?, updated = ? WHERE id = ?",
                            (message_id, now, conv_id))

    def save_answer(self, conv_id: str, message_id: str, content: str, reasoning_content: Optional[str],
                    output_token_ids: list[int], status: str = "generating", finish_reason: Optional[str] = None,
                    stats: Optional[dict] = None) -> None:
        """Save an answer so far (while generating) or for good; the text and the ids together."""
        with self.db:
            self.db.execute("UPDATE messages SET content = ?, reasoning_content = ?, output_token_ids = ?, "
                            "status = ?, finish_reason = ?, stats = ? WHERE id = ?",
                            (content, reasoning_content, json.dumps(output_token_ids), status, finish_reason,
                             json.dumps(stats) if stats else None, message_id))
            if status != "generating":
                self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conv_id))
