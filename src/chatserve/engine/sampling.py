"""SamplingParams and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .structured import StructuredOutput, apply_grammar_masks

# Logprobs alternatives a request may ask for (OpenAI allows up to 20).
MAX_LOGPROBS = 20
# logit_bias values, as OpenAI bounds them; the lowest bans the token outright.
MAX_LOGIT_BIAS = 100


@dataclass(frozen=True)
class Range:
    """A sampling value's allowed range: [low, high], or (low, high] when low_open."""
    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# The one definition of each sampling value's range (OpenAI's where it has one): SamplingParams
# checks them, and the server's request models (server/protocol.py) build their fields from them,
# so every route and the stored conversation params refuse the same values.
SAMPLING_RANGES = {
    "temperature": Range(0, 2),
    "top_p": Range(0, 1, low_open=True),
    "min_p": Range(0, 1),
    "repetition_penalty": Range(0, 2, low_open=True),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
}


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = None  # None: until a stop condition or the context is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # OpenAI's, over the output so far
    frequency_penalty: float = 0.0
    seed: Optional[int] = None  # same seed, same tokens, whatever else is in the batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: off; k: the sampled token's logprob and the top k
    # None: off; k: each prompt token's logprob given the tokens before it, and the top k there
    # (the prompt is then computed whole, not taken from the prefix cache).
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # token id -> added to its logit, in [-100, 100]; -100 bans the token (OpenAI's logit_bias).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # What the output must match (a JSON schema, a regex, ...): enforced by a token mask each step.
    structured_output: Optional[StructuredOutput] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        for name, allowed in SAMPLING_RANGES.items():
            value = getattr(self, name)
            if not math.isfinite(value):
                bad(name, "must be a finite number")
            if value not in allowed:
                bad(name, f"must be in {allowed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 or -1 turns it off)")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:  # what a torch.Generator takes
            bad("seed", "must fit in 64 bits")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                bad(name, f"must be in [0, {MAX_LOGPROBS}]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not (isinstance(bias, (int, float)) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                                 f"got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


# Sampling values a model's generation_config, or the operator's --override-generation-config, may
# set for every request that leaves them unset.
DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def check_sampling_defaults(values) -> dict:
    """`values` as sampling defaults ({"temperature": 0.7, "top_p": 0.8}), or a ValueError that says
    what is wrong: not an object, a key that is not a DEFAULTABLE value, a wrong type, a value out of range."""
    if not isinstance(values, dict):
        raise ValueError(f'must be a JSON object such as {{"temperature": 0.7, "top_p": 0.8}}, got {values!r}')
    unknown = sorted(set(values) - set(DEFAULTABLE))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a sampling default; the keys are {', '.join(DEFAULTABLE)}")
    for name, value in values.items():
        integer = name == "top_k"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    SamplingParams(**values)  # the ranges: the same rules as a request's
    return dict(values)


def effective_sampling_defaults(generation_config: dict) -> dict:
    """What a request that sets none of the DEFAULTABLE values is sampled with: generation_config's
    values, else SamplingParams' own (temperature 1, top_p 1, top_k 0 = off, min_p 0, no penalty)."""
    base = SamplingParams()
    return {name: generation_config[name] if generation_config.get(name) is not None else getattr(base, name)
            for name in DEFAULTABLE}


@dataclass
class TokenLogprob:
    token_id: int
    logprob: Optional[float]  # None only for a prompt's first token, which nothing predicts
    top: list[tuple[int, float]]  # the most likely alternatives, best first
    rank: Optional[int] = None  # 1 + how many tokens are likelier (vLLM's rank)


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Each row's log-probability of its token, and its k most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device).unsqueeze(1))
    ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
    tops = [[]] * len(token_ids)
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [TokenLogprob(t, lp, top, rank) for t, lp, top, rank in zip(token_ids, chosen[:, 0].tolist(), tops, ranks)]


class SamplingRow:
    """What the sampler needs from one request."""

    params: SamplingParams
    generator: Optional[torch.Generator]
    token_ids: list[int]
    num_prompt_tokens: int
    grammar: Optional[object]  # an xgrammar GrammarMatcher, or None


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Every row's logit_bias, in place, in one indexed add; -100 bans (-inf), as OpenAI means it."""
    index_rows, index_tokens, biases = [], [], []
    for i, row in enumerate(rows):
        for token, bias in row.params.logit_bias.items():
            index_rows.append(i)
            index_tokens.append(token)
            biases.append(float("-inf") if bias <= -MAX_LOGIT_BIAS else float(bias))
    dev = logits.device
    logits.index_put_((torch.tensor(index_rows, device=dev), torch.tensor(index_tokens, device=dev)),
                      torch.tensor(biases, dtype=logits.dtype, device=dev), accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(row.token_ids)), dtype=torch.long, device=logits.device)
            seen = seen[seen < vocab]
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        output = row.token_ids[row.num_prompt_tokens:]
        if output and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(output, dtype=torch.long, device=logits.device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device).scatter_add_(
                0, ids, torch.ones_like(ids, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filter(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on the rows that sample (not greedy)."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=dev).unsqueeze(1)
    logits = logits / temps
    top_k = [r.params.top_k for r in rows]
    if any(top_k):
        # top_k past the vocabulary keeps every token, as top_k = 0 does.
        vocab = logits.shape[1]
        k = torch.tensor([t if 0 < t < vocab else vocab for t in top_k], device=dev)
        kmax = int(k.max())
        kth = logits.topk(kmax, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = [r.params.top_p for r in rows]
    if any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        remove = (cum - sorted_logits.softmax(-1)) >= torch.tensor(top_p, device=dev).unsqueeze(1)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    min_p = [r.params.min_p for r in rows]
    if any(min_p):
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * torch.tensor(min_p, device=dev).unsqueeze(1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[list[int], list[Optional[TokenLogprob]]]:
        raw_logits = logits  # logprobs are the model's own, before penalties, biases and masks
        biased = any(r.params.logit_bias for r in rows)
        constrained = any(r.grammar is not None for r in rows)
        if biased or constrained or any(r.params.has_penalties for r in rows):
            logits = logits.clone()
        if any(r.params.has_penalties for r in rows):
            logits = apply_penalties(logits, rows)
        if biased:
            apply_logit_bias(logits, rows)
        if constrained:
            apply_grammar_masks(logits, [r.grammar for r in rows])

        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            sub_rows = [rows[i] for i in sampled]
            probs = _filter(logits[sampled], sub_rows).softmax(-1).cpu()
            # Exponential race (argmax of p / E, E ~ Exp(1)) draws from p; seeded requests draw
            # their noise from their own generator so the batch around them does not matter.
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for j, row in enumerate(sub_rows):
                if row.generator is not None:
                    noise[j].exponential_(generator=row.generator)
            tokens[sampled] = (probs / noise).argmax(dim=-1).to(tokens.device)

        token_list = tokens.tolist()
        logprobs: list[Optional[TokenLogprob]] = [None] * len(rows)
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if asked:  # one log-softmax and top-k for every row that asked, each keeping its own k
            entries = logprobs_of(raw_logits[asked], [token_list[i] for i in asked],
                                  max(rows[i].params.logprobs for i in asked))
            for i, entry in zip(asked, entries):
                entry.top = entry.top[:rows[i].params.logprobs]
                logprobs[i] = entry
        return token_list, logprobs
