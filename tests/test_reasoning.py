"""The <think> splitter: the same split however the text is cut into deltas."""

from __future__ import annotations

import pytest

from chatserve.models.dummy import build_dummy_tokenizer
from chatserve.server.reasoning import ReasoningParser, is_reasoning_model, prompt_opens_reasoning, split_reasoning

CASES = [
    # (output text, template opened <think>, reasoning or None, content)
    ("<think>\nLet me see.\n</think>\n\nHello!", False, "Let me see.\n", "Hello!"),
    ("Let me see.</think>\n\nHello", True, "Let me see.", "Hello"),
    ("\n<think>a<b</think>c", False, "a<b", "c"),
    ("Plain answer with <think> inside, and </think>", False, None, "Plain answer with <think> inside, and </think>"),
    ("<think>still thinking when it stopped", False, "still thinking when it stopped", ""),
    ("", True, "", ""),
    ("<thi", False, None, "<thi"),
    ("  \n", False, None, "  \n"),
    ("<think></think>", False, "", ""),
    ("思考</think>答案 ✓", True, "思考", "答案 ✓"),
]


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_split(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_every_way_of_streaming_gives_the_same_split(text, opened, reasoning, content):
    # Deltas of every size, and a cut at every position (tags split across two deltas).
    cuttings = [[text[i:i + n] for i in range(0, len(text), n)] for n in range(1, 5)]
    cuttings += [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for deltas in cuttings:
        parser = ReasoningParser(opened)
        pieces = [parser.feed(d) for d in deltas] + [parser.flush()]
        streamed = "".join(r for r, _ in pieces), "".join(c for _, c in pieces)
        assert (streamed[0] if parser.thought else None, streamed[1]) == (reasoning, content), deltas
        assert all("<think>" not in r + c and "</think>" not in r + c for r, c in pieces) or content.count("<think>")


def test_reasoning_models_and_opened_prompts():
    tokenizer = build_dummy_tokenizer()
    assert is_reasoning_model(tokenizer)
    plain = tokenizer.encode("<|im_start|>assistant\n")
    opened = tokenizer.encode("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning(tokenizer, plain) and prompt_opens_reasoning(tokenizer, opened)
    # Without the tags (unknown tokens map to [UNK]) a model does not reason.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert not is_reasoning_model(PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="[UNK]"))
