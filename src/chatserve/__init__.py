"""chatserve: a streaming chat service for local large language models.

The engine names are imported on first use, so light commands (the HTTP client) start fast
without loading torch."""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "chatserve.engine.engine",
    "Engine": "chatserve.engine.engine",
    "AsyncEngine": "chatserve.engine.engine",
    "EngineConfig": "chatserve.config",
    "SamplingParams": "chatserve.engine.sampling",
    "StructuredOutput": "chatserve.engine.structured",
    "CompletionOutput": "chatserve.engine.request",
    "RequestOutput": "chatserve.engine.request",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chatserve' has no attribute {name!r}")
