"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: Llama's shape with biased q/k/v projections."""

from .layers import CausalLM
from .model_config import ModelConfig


class Qwen2ForCausalLM(CausalLM):
    @staticmethod
    def read_config(raw: dict) -> ModelConfig:
        return ModelConfig.from_hf(raw, attention_bias=True)
