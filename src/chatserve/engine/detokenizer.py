"""Incremental, UTF-8-safe detokenization with stop strings for streaming generation.

Each step decodes only a small window of tokens: ``prefix`` (already emitted, decoded
again as left context) plus the tokens not yet emitted.  The delta is the part of the
window's text beyond the prefix's text.  Decoding with context is what keeps tokenizer
rules that depend on neighbours right (e.g. SentencePiece dropping the leading space of
the first token), and a window that ends in U+FFFD means a multi-byte character is still
incomplete, so it is held until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["IncrementalDetokenizer"]

# Prompt tokens decoded as left context for the first generated token.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text deltas for one request.

    ``update()`` returns the text that is now safe to emit; ``flush()`` returns what
    was held back once the request ends for a reason other than a stop string.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int] | None = None,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        if isinstance(stop, str):  # a bare string would otherwise be split into chars
            stop = (stop,)
        self.tokenizer = tokenizer
        self.stop: tuple[str, ...] = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens

        self.stopped: bool = False
        self.stop_reason: str | None = None
        self.output_text: str = ""

        # Window of ids: [0:_prefix_offset) is dropped context, [_prefix_offset:_read_offset)
        # was emitted and serves as context, [_read_offset:] is not yet emitted.
        self._ids: list[int] = list(prompt_token_ids or ())[-_PROMPT_CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Decoded text held back because it could be the start of a stop string.
        self._pending = ""
        # A held tail shorter than the longest stop string is all that can still match.
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Feed newly generated token ids; return the text delta that is now safe to emit (may be "")."""
        if self.stopped:
            return ""
        self._ids.extend(new_token_ids)
        return self._emit(self._decode_window(final=False), final=False)

    def flush(self) -> str:
        """The request finished for another reason (eos, length, abort): return any held-back text."""
        if self.stopped:
            return ""
        return self._emit(self._decode_window(final=True), final=True)

    # -- internals -------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of tokenization spaces: it rewrites text across token boundaries,
        # which a stream cannot take back once emitted.
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_window(self, final: bool) -> str:
        """Return the newly decodable text and advance the window past it."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Hold while nothing visible was added (e.g. a skipped special token, whose
        # neighbours may still change the text) or a character is still incomplete.
        if not final and (
            len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
        ):
            return ""
        delta = new_text[len(prefix_text) :]
        # The just-emitted tokens become the next step's context; older ids are dropped
        # so the window (and the cost per step) stays small.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return delta

    def _emit(self, text: str, final: bool) -> str:
        """Apply stop strings to ``text`` and return what may be emitted now."""
        pending = self._pending + text
        # A stop string can only begin inside the held tail or the new text, so
        # searching ``pending`` covers everything not yet checked.
        match = self._find_stop(pending)
        if match is not None:
            start, stop_str = match
            out = pending[: start + len(stop_str)] if self.include_stop_str_in_output else pending[:start]
            self.stopped = True
            self.stop_reason = stop_str
            self._pending = ""
        else:
            hold = 0 if final else self._stop_prefix_len(pending)
            out = pending[: len(pending) - hold]
            self._pending = pending[len(pending) - hold :]
        self.output_text += out
        return out

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string occurrence that completes first (ties: the one starting first).

        Ordering by end position makes the result independent of how tokens are batched:
        it is the match a character-by-character stream would see first.
        """
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
