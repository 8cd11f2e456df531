"""Our model code against Hugging Face transformers' own implementation on the same weights."""

from __future__ import annotations

import pytest
import torch

from chatserve import Engine, EngineConfig, SamplingParams
from chatserve.models.dummy import LLAMA3_ROPE_SCALING, write_hf_model_dir

LOGIT_TOL = 1e-4


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens, then the reference logits at every position of prompt + tokens."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    full = model(torch.tensor([ids])).logits[0]
    return ids[len(prompt):], full


def prompt_of(length: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (length,), generator=g).tolist()


class LogitRecorder:
    """Wraps the engine's sampler to keep the logits each request was sampled from."""

    def __init__(self, engine: Engine):
        self.inner = engine.sampler
        self.logits: dict[str, list[torch.Tensor]] = {}
        engine.sampler = self

    def __call__(self, logits, rows):
        for row, lg in zip(rows, logits):
            self.logits.setdefault(row.request_id, []).append(lg.clone())
        return self.inner(logits, rows)


def make_engine(path, **kw) -> Engine:
    return Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", num_kv_blocks=256, block_size=16, **kw))


def check_against_oracle(path, prompt_lens, n_tokens=64, n_logit_steps=33, **engine_kw):
    engine = make_engine(path, **engine_kw)
    ref = hf_model(path)
    vocab = engine.loaded.config.vocab_size
    recorder = LogitRecorder(engine)
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    prompts = [prompt_of(n, seed, vocab) for seed, n in enumerate(prompt_lens)]
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    free_before = engine.block_manager.num_free_blocks
    results = engine.run_to_completion(ids)
    assert engine.block_manager.num_free_blocks == engine.num_blocks >= free_before
    for rid, prompt in zip(ids, prompts):
        want_tokens, want_logits = hf_greedy(ref, prompt, n_tokens)
        got = results[rid]
        assert got.token_ids == want_tokens, f"greedy tokens differ for prompt of {len(prompt)}"
        # Step 0 is the prefill's last position, then one logit row per decode step.
        for step, logits in enumerate(recorder.logits[rid][:n_logit_steps]):
            diff = (logits - want_logits[len(prompt) - 1 + step]).abs().max().item()
            assert diff <= LOGIT_TOL, f"step {step}: max |logit diff| {diff:.2e}"


def test_single_request_matches_oracle(tiny_model_dir):
    check_against_oracle(tiny_model_dir, [37])


def test_batched_requests_of_other_lengths_match_oracle(tiny_model_dir):
    check_against_oracle(tiny_model_dir, [5, 37, 90, 16, 1])


def test_chunked_prefill_and_prefix_cache_match_oracle(tiny_model_dir, tmp_path):
    # A 16-token budget splits prompts into chunks that attend to earlier chunks in the cache.
    check_against_oracle(tiny_model_dir, [70, 33], n_tokens=24, n_logit_steps=24, max_num_batched_tokens=16)


def test_tied_embeddings_match_oracle(tmp_path):
    path = write_hf_model_dir(tmp_path / "tied", "qwen2", tie_word_embeddings=True, seed=3)
    check_against_oracle(path, [20, 45])


def test_llama3_rope_scaling_matches_oracle(tmp_path):
    # Positions well past original_max_position_embeddings (64) exercise the scaled frequencies.
    path = write_hf_model_dir(tmp_path / "llama3", "llama", rope_scaling=LLAMA3_ROPE_SCALING, seed=4)
    check_against_oracle(path, [100, 7])


def test_sharded_checkpoint_loads_same_weights(tmp_path):
    path = write_hf_model_dir(tmp_path / "sharded", "qwen3", sharded=True, seed=5)
    assert (path / "model.safetensors.index.json").exists()
    check_against_oracle(path, [12], n_tokens=16, n_logit_steps=16)


@pytest.mark.parametrize("hub_style", [True, False])
def test_both_config_styles_load(tmp_path, hub_style):
    path = write_hf_model_dir(tmp_path / "m", "llama", rope_scaling=LLAMA3_ROPE_SCALING, hub_style_config=hub_style)
    engine = make_engine(path)
    assert engine.loaded.config.rope_scaling["rope_type"] == "llama3"
    assert engine.loaded.config.rope_theta == 500_000.0
