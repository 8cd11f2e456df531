"""Tests for chatserve.engine.detokenizer, using tiny tokenizers trained offline here."""

from __future__ import annotations

import json
import random
import string

import pytest

from chatserve.engine.detokenizer import IncrementalDetokenizer
from chatserve.server.openai import BYTE_DECODER

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FFFD = "\ufffd"
IM_END = "<|im_end|>"

_ENGLISH = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text must never show broken characters to the user.",
    "def main():\n    print('hello world')\n    return 0\n",
]
# Seen rarely, so only a few merges touch these bytes: most Chinese characters and all
# emoji stay split over several tokens, some tokens mix a space and a lead byte.
_RARE = [
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "中文字符在字节级分词器中会被拆成多个词元。",
    "Emoji like 🙂 and 👍🏽 are several bytes long.",
]


@pytest.fixture(scope="module")
def byte_tok():
    """GPT-2 style byte-level BPE, vocab 400."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[IM_END],
        show_progress=False,
    )
    tok.train_from_iterator(_ENGLISH * 20 + _RARE * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END)


@pytest.fixture(scope="module")
def sp_tok():
    """Llama-style (SentencePiece-like) BPE: '▁' for spaces, byte fallback, and a decoder
    that strips the leading space of the decoded sequence."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # training only
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        special_tokens=["<unk>", IM_END],
        show_progress=False,
    )
    tok.train_from_iterator(_ENGLISH * 20, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens, so any character (e.g. Chinese) encodes
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=IM_END, unk_token="<unk>"
    )


# -- helpers ---------------------------------------------------------------------------


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def stream(tok, ids, chunk=1, **kwargs):
    """Feed ``ids`` in chunks of ``chunk`` (int) or the given chunk sizes; return
    (update deltas, flush delta, detokenizer)."""
    d = IncrementalDetokenizer(tok, **kwargs)
    sizes = [chunk] * len(ids) if isinstance(chunk, int) else list(chunk)
    deltas, i = [], 0
    for n in sizes:
        if i >= len(ids):
            break
        deltas.append(d.update(ids[i : i + n]))
        i += n
    assert i >= len(ids)
    tail = d.flush()
    assert d.output_text == "".join(deltas) + tail
    return deltas, tail, d


def token_byte_spans(tok, ids):
    """(start, end) byte offsets of each token of a byte-level BPE sequence."""
    table = BYTE_DECODER  # GPT-2's byte -> printable character table, reversed
    spans, pos = [], 0
    for t in tok.convert_ids_to_tokens(ids):
        n = len(bytes(table[c] for c in t))
        spans.append((pos, pos + n))
        pos += n
    return spans


def stop_geometry(tok, text, stop):
    """(starts strictly inside a token, number of tokens the stop string touches)."""
    ids = enc(tok, text)
    start = len(text[: text.index(stop)].encode())
    end = start + len(stop.encode())
    spans = token_byte_spans(tok, ids)
    inside = any(a < start < b for a, b in spans)
    touched = sum(1 for a, b in spans if a < end and start < b)
    return inside, touched


def first_stop(text, stops):
    """Reference: the stop occurrence that completes first (ties: starts first)."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else None


# -- tests -----------------------------------------------------------------------------

MIXED = "Hello world, 你好，世界！ 🙂👍🏽 The quick brown fox. 中文字符 done"


def test_tokenizer_splits_characters(byte_tok):
    # Precondition for the UTF-8 tests: characters really are split across tokens.
    ids = enc(byte_tok, "你好，世界 🙂👍🏽")
    assert sum(FFFD in byte_tok.decode([i]) for i in ids) >= 6


@pytest.mark.parametrize("tok_name", ["byte_tok", "sp_tok"])
def test_one_token_at_a_time_no_replacement_char(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    ids = enc(tok, MIXED)
    deltas, tail, d = stream(tok, ids)
    assert all(FFFD not in x for x in deltas)
    assert tail == ""
    assert d.output_text == tok.decode(ids, skip_special_tokens=True) == MIXED
    assert not d.stopped and d.stop_reason is None


def test_prompt_context_byte_level(byte_tok):
    prompt = enc(byte_tok, "User: say hi 你好\nAssistant:")
    ids = enc(byte_tok, " Hi there 世界🙂")
    _, _, d = stream(byte_tok, ids, prompt_token_ids=prompt)
    assert d.output_text == byte_tok.decode(ids) == " Hi there 世界🙂"


def test_prompt_context_keeps_leading_space_sentencepiece(sp_tok):
    prompt = enc(sp_tok, "Hello world, the")
    ids = enc(sp_tok, "Hello world, the quick fox")[len(prompt) :]
    assert sp_tok.decode(ids) == "quick fox"  # decoded alone, the leading space is lost
    _, _, d = stream(sp_tok, ids, prompt_token_ids=prompt)
    assert d.output_text == " quick fox"  # in context it is kept
    # Without a prompt the first token decodes like a full decode of the output.
    _, _, d = stream(sp_tok, ids)
    assert d.output_text == "quick fox"


def test_stop_string_across_tokens(byte_tok):
    text = "The quick brown fox jumps over the lazy dog."
    stop = "fox jumps"
    assert stop_geometry(byte_tok, text, stop)[1] >= 2
    deltas, tail, d = stream(byte_tok, enc(byte_tok, text), stop=[stop])
    assert d.stopped and d.stop_reason == stop
    assert d.output_text == "The quick brown "
    assert tail == ""


def test_chinese_stop_string(byte_tok):
    text = "Hello 你好，世界！ more text"
    stop = "世界"
    assert stop_geometry(byte_tok, text, stop)[1] >= 3
    deltas, _, d = stream(byte_tok, enc(byte_tok, text), stop=[stop])
    assert d.output_text == "Hello 你好，"
    assert d.stop_reason == stop
    assert all(FFFD not in x and "世" not in x for x in deltas)


def test_stop_string_starting_mid_token(byte_tok):
    text = "Hello world, this is fine"
    stop = "llo wor"
    inside, touched = stop_geometry(byte_tok, text, stop)
    assert inside and touched >= 2
    _, _, d = stream(byte_tok, enc(byte_tok, text), stop=[stop])
    assert d.output_text == "He"
    assert d.stopped


def test_stop_string_inside_one_token(byte_tok):
    # The whole stop string lies inside the token "Hello": cut inside the token.
    _, _, d = stream(byte_tok, enc(byte_tok, "Hello world"), stop=["ell"])
    assert d.output_text == "H" and d.stop_reason == "ell"


def test_include_stop_str_in_output(byte_tok):
    text = "Hello 你好，世界！ more text"
    _, _, d = stream(byte_tok, enc(byte_tok, text), stop=["世界"], include_stop_str_in_output=True)
    assert d.output_text == "Hello 你好，世界"
    _, _, d = stream(byte_tok, enc(byte_tok, text), stop=["llo 你"], include_stop_str_in_output=True)
    assert d.output_text == "Hello 你"


def test_near_miss_is_released(byte_tok):
    text = "Hello world, again and again"
    ids = enc(byte_tok, text)
    d = IncrementalDetokenizer(byte_tok, stop=["world peace"])
    seen_hold = False
    for i, t in enumerate(ids):
        d.update([t])
        so_far = byte_tok.decode(ids[: i + 1])
        seen_hold |= so_far.endswith(" world") and d.output_text == "Hello "
    assert seen_hold  # "world" was held while it could still become "world peace"
    assert d.output_text == text  # released without needing flush()
    assert d.flush() == "" and not d.stopped


def test_multiple_stop_strings_earliest_wins(byte_tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = enc(byte_tok, text)
    _, _, d = stream(byte_tok, ids, stop=["lazy", "fox", "quick brown"])
    assert d.stop_reason == "quick brown" and d.output_text == "The "
    # Overlapping stops: the one that completes first wins (what a stream sees first),
    # whatever the chunking.
    for chunk in (1, 3, len(ids)):
        _, _, d = stream(byte_tok, ids, chunk, stop=["brown fox", "own"])
        assert d.stop_reason == "own" and d.output_text == "The quick br"


def test_after_stop_input_is_ignored(byte_tok):
    d = IncrementalDetokenizer(byte_tok, stop=["world"])
    out = d.update(enc(byte_tok, "Hello world and more"))
    assert out == "Hello " and d.stopped
    assert d.update(enc(byte_tok, " even more")) == ""
    assert d.flush() == ""
    assert d.output_text == "Hello "


@pytest.mark.parametrize("tok_name", ["byte_tok", "sp_tok"])
def test_special_tokens(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    end = tok.convert_tokens_to_ids(IM_END)
    ids = enc(tok, "Hi there 你好") + [end] + enc(tok, " again") + [end]
    _, _, d = stream(tok, ids)
    assert IM_END not in d.output_text
    assert d.output_text == tok.decode(ids, skip_special_tokens=True)
    _, _, d = stream(tok, ids, skip_special_tokens=False)
    assert d.output_text == tok.decode(ids, skip_special_tokens=False)
    assert d.output_text.count(IM_END) == 2
    _, _, d = stream(tok, ids, stop=[IM_END], skip_special_tokens=False)
    assert d.stop_reason == IM_END and d.output_text == tok.decode(ids[: ids.index(end)])


def test_flush_releases_held_text(byte_tok):
    d = IncrementalDetokenizer(byte_tok, stop=["world peace"])
    assert d.update(enc(byte_tok, "Hello")) == "Hello"
    assert d.update(enc(byte_tok, " world")) == " "  # "world" may start "world peace"
    assert d.flush() == "world"
    assert d.output_text == "Hello world" and not d.stopped
    assert d.flush() == ""


def test_flush_releases_incomplete_character(byte_tok):
    ids = enc(byte_tok, "ok 世")
    assert FFFD in byte_tok.decode(ids[:-1])
    d = IncrementalDetokenizer(byte_tok)
    out = "".join(d.update([t]) for t in ids[:-1])
    assert out == byte_tok.decode(ids[:-1]).rstrip(FFFD) and FFFD not in out
    tail = d.flush()  # the request ended mid-character: the invalid bytes come out now
    assert tail.endswith(FFFD) and d.output_text == byte_tok.decode(ids[:-1])


@pytest.mark.parametrize("tok_name", ["byte_tok", "sp_tok"])
def test_chunked_feed_matches_one_at_a_time(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    ids = enc(tok, MIXED)
    rng = random.Random(7)
    for stops in ([], ["世界"], ["brown f", "🙂👍"], ["not there"]):
        ref_deltas, ref_tail, ref = stream(tok, ids, stop=stops)
        for _ in range(20):
            sizes = [rng.randint(1, 6) for _ in ids]
            _, _, d = stream(tok, ids, sizes, stop=stops)
            assert (d.output_text, d.stopped, d.stop_reason) == (ref.output_text, ref.stopped, ref.stop_reason)


def test_decode_window_stays_small(byte_tok):
    """Cost per token must not grow with the output: every decode call sees few ids."""
    sizes = []

    class Counting:
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return byte_tok.decode(ids, **kw)

    ids = enc(byte_tok, MIXED * 40)
    prompt = enc(byte_tok, MIXED * 5)
    _, _, d = stream(Counting(), ids, prompt_token_ids=prompt, stop=["never matches", "世界！X"])
    assert d.output_text == byte_tok.decode(ids)
    assert len(ids) > 1000 and max(sizes) <= 12


_PIECES = [
    "hello", " world", ",", " ", "  ", "\n", "the", " quick", " fox", "lo", "wor", "ld",
    "你", "好", "世界", "，", "！", "中文", "🙂", "👍🏽", "é", "ß", "∑", "x", "?", "42",
]


def _random_text(rng, n):
    return "".join(rng.choice(_PIECES) for _ in range(n))


def _random_stops(rng, text):
    stops = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        if kind < 0.5 and text:  # a substring that will hit
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randint(1, 6)])
        elif kind < 0.8 and text:  # a real prefix that then diverges: a near miss
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randint(1, 4)] + "\x00")
        else:
            stops.append(_random_text(rng, rng.randint(1, 3)))
    return stops


@pytest.mark.parametrize("tok_name", ["byte_tok", "sp_tok"])
def test_property_random_sequences(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    end = tok.convert_tokens_to_ids(IM_END)
    rng = random.Random(1234)
    for case in range(300):
        # Generated ids: encoded pieces, sometimes with a special token in between.
        ids = []
        for _ in range(rng.randint(0, 5)):
            ids += enc(tok, _random_text(rng, rng.randint(1, 6)))
            if rng.random() < 0.3:
                ids.append(end)
        prompt = enc(tok, _random_text(rng, rng.randint(1, 8))) if rng.random() < 0.5 else None
        skip = rng.random() < 0.8
        include = rng.random() < 0.3

        def ref_decode(gen):
            if prompt is None:
                return tok.decode(gen, skip_special_tokens=skip)
            full = tok.decode(prompt + gen, skip_special_tokens=skip)
            base = tok.decode(prompt, skip_special_tokens=skip)
            assert full.startswith(base)
            return full[len(base) :]

        text = ref_decode(ids)
        if prompt is not None and tok_name == "byte_tok":
            assert text == tok.decode(ids, skip_special_tokens=skip)
        stops = _random_stops(rng, text)
        hit = first_stop(text, stops)
        expected = text if hit is None else text[: hit[0] if include else hit[1]]

        d = IncrementalDetokenizer(
            tok, prompt_token_ids=prompt, stop=stops,
            include_stop_str_in_output=include, skip_special_tokens=skip,
        )
        deltas, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 4)
            deltas.append(d.update(ids[i : i + n]))
            i += n
            assert FFFD not in deltas[-1], (case, deltas)
            assert expected.startswith(d.output_text), case
            if not d.stopped:
                # Everything decodable is out, except a tail that may still start a stop string.
                so_far = ref_decode(ids[:i])
                held = so_far[len(d.output_text) :]
                if FFFD not in held:
                    assert held == "" or any(s.startswith(held) for s in stops), (case, held, stops)
        deltas.append(d.flush())
        assert "".join(deltas) == d.output_text == expected, case
        assert d.stopped == (hit is not None)
        assert d.stop_reason == (None if hit is None else hit[2])


def test_random_raw_ids_match_full_decode(byte_tok):
    # Arbitrary ids may form invalid UTF-8; the stream must still add up to decode().
    # (Byte-level only: a byte-fallback decoder turns a whole invalid run of byte tokens,
    # valid bytes included, into U+FFFD, which a stream cannot take back once emitted.)
    tok = byte_tok
    rng = random.Random(99)
    vocab = len(tok)
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        _, _, d = stream(tok, ids, rng.choice([1, 2, 5]))
        assert d.output_text == tok.decode(ids, skip_special_tokens=True)
