"""Llama 2/3.x, TinyLlama and Mistral-style models: no biases unless the config asks."""

from .layers import CausalLM
from .model_config import ModelConfig


class LlamaForCausalLM(CausalLM):
    @staticmethod
    def read_config(raw: dict) -> ModelConfig:
        if raw.get("sliding_window") and raw.get("model_type") == "mistral":
            # Sliding-window attention is not implemented: full attention is exact up to the window.
            raw = {**raw, "max_position_embeddings": min(raw.get("max_position_embeddings", 4096), raw["sliding_window"])}
        return ModelConfig.from_hf(raw)
