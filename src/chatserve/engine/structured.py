"""Constrained decoding: what a request's output must match (a JSON schema, any JSON object, a
regex, one of a list of strings, an EBNF grammar), compiled by xgrammar into a matcher per request.

The narrow interface the sampler sees is a token bitmask per request per step
(`apply_grammar_masks`); the engine advances each matcher by the token sampled. A tool-call
grammar is one more `StructuredOutput` kind compiled to the same matcher.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

# Compiled grammars kept per engine, by kind and text: a schema sent again is not recompiled.
GRAMMAR_CACHE_SIZE = 256


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of the constraints. `source` names the request field it came from, for errors."""

    json_schema: Optional[str] = None  # a JSON schema, serialized
    json_object: bool = False  # any JSON object
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None  # one of these strings exactly
    grammar: Optional[str] = None  # EBNF, in xgrammar's (GBNF) dialect
    source: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("json_schema", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"{self.source}: give exactly one constraint (json, regex, choice or grammar), "
                             f"got {given or 'none'}")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError(f"{self.source}: choice must be a non-empty list of strings")

    @classmethod
    def from_json_schema(cls, schema, source: str) -> "StructuredOutput":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: the JSON schema is not valid JSON ({exc})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{source}: the JSON schema must be an object, got {type(schema).__name__}")
        # Keys keep their order: the output's properties come in the schema's order.
        return cls(json_schema=json.dumps(schema), source=source)

    @property
    def key(self) -> tuple:
        return (self.json_schema, self.json_object, self.regex, self.choice, self.grammar)


def _choice_grammar(choices: Sequence[str]) -> str:
    # A JSON string literal is a valid EBNF string literal in xgrammar's dialect.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# xgrammar (0.2.9) lets a string with maxLength/minLength hold raw control characters (a tab, a
# NUL), which JSON forbids and strict parsers (pydantic's, json.loads) refuse: such strings take
# the character class its unbounded strings use.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _xgrammar():
    # Imported on first use (it takes seconds): a server that never constrains never pays.
    import xgrammar

    return xgrammar


def _json_schema_grammar(schema: str, strict: bool) -> str:
    # Compact JSON (no free whitespace): a model cannot wander off into blank space.
    grammar = str(_xgrammar().Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
    return grammar.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _compile_error(exc: Exception) -> str:
    """xgrammar's message without its C++ timestamp and source location."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())


class GrammarCompiler:
    """Compiles constraints for one tokenizer, with an LRU cache. Thread-safe: requests compile
    on their own threads (never the engine's)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        # The model's logits may be wider than the tokenizer (padded embeddings): xgrammar masks the rest.
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._compiler: Optional[xgr.GrammarCompiler] = None
        self._cache: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        # Built on first use: a server that never constrains never pays for the vocabulary scan.
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        compiler = self._get_compiler()
        try:
            if spec.json_schema is not None:
                # additionalProperties defaults to false (strict), as in OpenAI's strict mode.
                compiled = compiler.compile_grammar(_json_schema_grammar(spec.json_schema, strict=True))
            elif spec.json_object:
                compiled = compiler.compile_grammar(_json_schema_grammar('{"type": "object"}', strict=False))
            elif spec.regex is not None:
                compiled = compiler.compile_regex(spec.regex)
            elif spec.choice is not None:
                compiled = compiler.compile_grammar(_choice_grammar(spec.choice))
            else:
                compiled = compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError) as exc:
            what = {"json_schema": "the JSON schema", "regex": "the regex", "grammar": "the grammar"}
            kind = next((w for k, w in what.items() if getattr(spec, k)), "the constraint")
            raise ValueError(f"{spec.source}: {kind} cannot be compiled: {_compile_error(exc)}") from None
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> xgr.GrammarMatcher:
        return _xgrammar().GrammarMatcher(self.compile(spec))


def apply_grammar_masks(logits: torch.Tensor, grammars: Sequence[Optional[xgr.GrammarMatcher]]) -> None:
    """Mask, in place, each row's logits to the tokens its grammar allows next: one bitmask for
    the batch, applied in one op. Rows without a grammar are untouched."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])
    for i in rows:
        grammars[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
