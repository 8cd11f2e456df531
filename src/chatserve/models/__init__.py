"""What a model is: weights in, logits out."""

from .layers import CausalLM
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM

# HF `architectures` name -> our implementation.
ARCHITECTURES: dict[str, type[CausalLM]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

__all__ = ["ARCHITECTURES", "CausalLM"]
