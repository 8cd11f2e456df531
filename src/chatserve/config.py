"""Every engine knob, with its default, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "dummy_model"
# The user of a server without keys, of --api-key, and the owner of conversations stored before
# there were users.
DEFAULT_USER = "default"


def data_dir() -> Path:
    """Where chatserve keeps its files: the conversation store, the terminal chat's history."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatserve"


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    # "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32), "bfloat16", "float16", "float32".
    dtype: str = "auto"
    # "auto" (cuda when available), "cpu", "cuda", "cuda:N".
    device: str = "auto"
    # "auto" reads the weights from the model's files; "dummy" gives random weights on the real config.
    load_format: str = "auto"
    revision: Optional[str] = None
    # Weight-only quantization: None keeps the checkpoint's form (a safetensors model runs at dtype;
    # a GGUF's Q4 blocks run as int4, Q8_0 and Q6_K as int8), "int8" (per output channel) or
    # "int4" (groups of 32) quantize every Linear layer and the embedding at load (CPU only),
    # "none" dequantizes a GGUF to dtype.
    quantization: Optional[str] = None
    # Tokens per KV block.
    block_size: int = 16
    # Memory for the KV cache pool, in GiB. Ignored when num_kv_blocks is set.
    kv_cache_memory_gib: float = 1.0
    num_kv_blocks: Optional[int] = None
    # Context length; None takes the model's max_position_embeddings.
    max_model_len: Optional[int] = None
    # At most this many requests run in one step.
    max_num_seqs: int = 64
    # Per-step token budget: decodes take one each, prefill chunks share the rest.
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    # CPU threads for torch; None leaves torch's default.
    num_threads: Optional[int] = None
    seed: int = 0
    # The native CPU decode kernels (models/native.py): "auto" (use them once built: a background
    # build on first use), "on" (build before serving; fail if impossible) or "off".
    native_kernels: str = "auto"
    # Sampling defaults over the model's generation_config, for every request that leaves them unset
    # (vLLM's --override-generation-config), e.g. {"temperature": 0.7, "top_p": 0.8}; the keys are
    # engine.sampling.DEFAULTABLE.
    override_generation_config: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.num_kv_blocks is None and self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be > 0")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.quantization not in (None, "int8", "int4", "none"):
            raise ValueError(f"quantization must be int8, int4 or none, got {self.quantization!r}")
        if self.native_kernels not in ("auto", "on", "off"):
            raise ValueError(f"native_kernels must be auto, on or off, got {self.native_kernels!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        from .engine.sampling import check_sampling_defaults  # torch: not for the light commands

        try:
            check_sampling_defaults(self.override_generation_config)
        except ValueError as exc:
            raise ValueError(f"override_generation_config: {exc}") from None


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # When set, generating routes need "Authorization: Bearer <api_key>"; /health and /metrics stay
    # open for probes and scrapers. It is the key of DEFAULT_USER.
    api_key: Optional[str] = None
    # A file of users' keys, one "USER KEY" pair a line ("#" comments and blank lines allowed): each
    # user sees only the conversations their keys created. A user may have several keys.
    api_key_file: Optional[str] = None
    # Browser origins allowed to call the API (CORS); empty: same-origin only.
    cors_origins: list[str] = field(default_factory=list)
    # Host header names accepted besides loopback names (localhost, 127.0.0.1, [::1]), `host` and the
    # address a request arrived at; "*" accepts any. Others get 400: a defence against DNS rebinding.
    allowed_hosts: list[str] = field(default_factory=list)
    # Engine requests in flight (running or waiting; a chat's n choices count n, a completion's
    # prompts x n) beyond this get 429 with Retry-After at once, rather than queueing without bound.
    max_queue: int = 256
    # A request body larger than this gets 413 (chat histories are text: 4 MiB is a long book).
    max_body_bytes: int = 4 * 2**20
    # Seconds a client may take to send a request's headers (from connecting, or from the previous
    # response), then its body (from the headers): past them the connection closes, or the request
    # gets 408. They bound reading a request, never a response, however long it streams. The header
    # bound lives in uvicorn's protocol: `chatserve serve` sets it; under `uvicorn main:app` give
    # --http chatserve.server.connection:HeaderTimeoutProtocol (CHATSERVE_HEADER_TIMEOUT).
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # After SIGTERM or Ctrl-C, wait at most this long (seconds) for open connections before exiting;
    # streams end at once, so this bounds only slow uploads and stuck clients. `chatserve serve`
    # passes it to uvicorn; under `uvicorn main:app` give --timeout-graceful-shutdown instead.
    shutdown_timeout: int = 3
    # The name /v1/models lists and responses carry: None for the hub id, or a local folder's or
    # GGUF file's own name (never a full path). The --model value itself is accepted too.
    served_model_name: Optional[str] = None
    # Names accepted in a request's "model" besides the served model's own (its --model value).
    model_aliases: list[str] = field(default_factory=list)
    # The conversation store (SQLite): None for $XDG_DATA_HOME/chatserve/conversations.sqlite3
    # (~/.local/share/...), ":memory:" to keep nothing.
    db_path: Optional[str] = None
    # Accept a chat template sent in a request (chat_template_kwargs.chat_template). Off: a client's
    # Jinja would run on this machine (in a template worker, bounded in time and memory, but still).
    trust_request_chat_template: bool = False
    # Where clients reach this server (e.g. http://127.0.0.1:8000), for the ready line of the log;
    # `chatserve serve` sets it from --host and --port. None under `uvicorn main:app`, whose own
    # line says where it listens.
    url: Optional[str] = None
    # Most characters of text a request may bring (its messages or prompts, all together), checked
    # before anything is tokenized; None: CHARS_PER_TOKEN per token of the model's context length.
    max_prompt_chars: Optional[int] = None
    # A chat template renders in a worker process: past this many seconds it is killed and the
    # request gets 400. At most template_workers render at once; the others wait their turn.
    template_timeout: float = 10.0
    template_workers: int = 2

    def validate(self) -> None:
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")
        if self.template_timeout <= 0 or self.template_workers < 1:
            raise ValueError("template_timeout must be > 0 and template_workers >= 1")
        if not (self.header_timeout > 0 and self.body_timeout > 0):
            raise ValueError("the header and body timeouts must be > 0 seconds")


# A token is rarely longer than this many characters: text longer than this many per token of the
# context cannot fit it, whatever the tokenizer, and is refused before tokenizing.
CHARS_PER_TOKEN = 8
