"""Reasoning models (DeepSeek-R1-Distill, Qwen3) think first, between <think> and </think>, then
answer. ReasoningParser splits their streamed text into reasoning_content and content, holding back
any piece that may be the start of a tag, so a tag split over two deltas never leaks into either."""

from __future__ import annotations

from typing import Optional, Sequence

THINK_START = "<think>"
THINK_END = "</think>"


def is_reasoning_model(tokenizer) -> bool:
    """A tokenizer with <think> and </think> tokens belongs to a model that thinks out loud.
    Looked up token by token: get_vocab() builds the whole vocabulary (~85 ms at 152k tokens),
    too slow for every request."""
    ids = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
    return all(i is not None and tokenizer.convert_ids_to_tokens(i) == tag
               for i, tag in zip(ids, (THINK_START, THINK_END)))


def prompt_opens_reasoning(tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether the chat template already opened the thinking (DeepSeek-R1's newer templates end
    the prompt with "<think>\\n"), so the model's output starts inside the reasoning."""
    tail = tokenizer.decode(list(prompt_ids[-8:]), skip_special_tokens=False).rstrip()
    return tail.endswith(THINK_START)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """feed(delta) -> (reasoning_delta, content_delta); flush() at the end for what was held back.

    <think> counts only at the very start of the output (after whitespace); anywhere later it is
    ordinary text. Output that ends while still thinking stays reasoning."""

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.held = ""  # text not yet assigned: a possible tag prefix
        self.strip_next = in_reasoning  # whitespace right after an opening/closing tag is dropped
        self.thought = in_reasoning  # whether the output has a reasoning part at all

    def feed(self, text: str) -> tuple[str, str]:
        text = self.held + text
        self.held = ""
        reasoning, content = "", ""
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if stripped.startswith(THINK_START):
                    self.state, self.strip_next, self.thought = "reasoning", True, True
                    text = stripped[len(THINK_START):]
                elif THINK_START.startswith(stripped):  # whitespace and maybe part of the tag so far
                    self.held = text
                    return reasoning, content
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if self.strip_next:
                    text = text.lstrip()
                    if not text:
                        break
                    self.strip_next = False
                end = text.find(THINK_END)
                if end >= 0:
                    reasoning += text[:end]
                    text = text[end + len(THINK_END):]
                    self.state, self.strip_next = "content", True
                    continue
                keep = _partial_suffix(text, THINK_END)
                reasoning += text[:len(text) - keep]
                self.held = text[len(text) - keep:]
                break
            else:
                if self.strip_next:
                    text = text.lstrip()
                    if not text:
                        break
                    self.strip_next = False
                content += text
                break
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        return "", held.lstrip() if self.strip_next else held


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[Optional[str], str]:
    """(reasoning or None, content) of a whole output."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    return (r1 + r2 if parser.thought else None), c1 + c2
