"""A tiny model whose greedy answer is known, for end-to-end tests of reasoning models: every
layer's weights are zero, so the logits depend on the last token alone, and the output head maps
each token of a script to the next. The script: (end of the generation prompt) <think> REASONING
</think> ANSWER <|im_end|>. Its chat template opens <think> itself when given open_think=True."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chatserve.models.dummy import CHATML_TEMPLATE, IM_END, THINK_END, THINK_START, write_hf_model_dir

HI = [{"role": "user", "content": "Hi there. How are you?"}]

# The template opens the thinking itself when asked (as DeepSeek-R1's newer templates always do).
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}",
    "{{- '<|im_start|>assistant\\n' }}{%- if open_think %}{{- '<think>' }}{%- endif %}")
REASONING, ANSWER = "Let me think", "The capital of France is Paris."


def write_scripted_model(path: Path, answer: str = ANSWER) -> tuple[Path, list[int]]:
    """Write the scripted llama into path; returns (path, the script's token ids). Any chat
    whose generation prompt ends like HI's (the ChatML "assistant\\n") gets the script, with
    `answer` (whose tokens must differ from each other and the rest's) after the reasoning."""
    write_hf_model_dir(path, "llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(path)
    prompt_end = tokenizer.apply_chat_template(HI, add_generation_prompt=True)
    prompt_end = (prompt_end["input_ids"] if hasattr(prompt_end, "keys") else prompt_end)[-1]
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)
    script = [prompt_end, *ids(THINK_START), *ids(REASONING), *ids(THINK_END), *ids(answer), *ids(IM_END)]
    assert len(set(script)) == len(script), "each scripted token must be unique"

    weights = load_file(path / "model.safetensors")
    for name, w in weights.items():
        if name.startswith("model.layers."):
            w.zero_()
    weights["model.norm.weight"].fill_(1.0)
    shape = weights["model.embed_tokens.weight"].shape
    embed = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    weights["model.embed_tokens.weight"] = embed
    normed = embed / embed.pow(2).mean(-1, keepdim=True).sqrt()
    head = torch.zeros_like(weights["lm_head.weight"])
    for a, b in zip(script, script[1:]):
        head[b] += normed[a]  # logit of b after a: |normed[a]|^2 = hidden size; others ~ its square root
    weights["lm_head.weight"] = head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path, script
