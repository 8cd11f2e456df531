"""chatserve: a streaming chat service for local large language models."""

from .config import EngineConfig
from .engine.engine import LLM, AsyncEngine, Engine
from .engine.request import CompletionOutput, RequestOutput
from .engine.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncEngine", "Engine", "EngineConfig", "SamplingParams", "CompletionOutput", "RequestOutput"]
