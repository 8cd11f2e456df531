"""Qwen3: per-head RMSNorm on queries and keys before rotary embedding, explicit head_dim."""

from .layers import CausalLM
from .model_config import ModelConfig


class Qwen3ForCausalLM(CausalLM):
    @staticmethod
    def read_config(raw: dict) -> ModelConfig:
        return ModelConfig.from_hf(raw, qk_norm=True)
