"""Shared fixtures: tiny random Hugging Face model dirs, laid out like hub downloads.

The weights come from transformers' own model classes, so a model loaded from these dirs
by transformers is the reference our own model code is checked against.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chatserve.models.dummy import LLAMA3_ROPE_SCALING, TINY_ARCHS, write_hf_model_dir

# make_tiny_model(path, arch, *, tie_word_embeddings=False, sharded=False, rope_scaling=None,
#                 seed=0, hub_style_config=True) -> Path; arch is one of TINY_ARCHS.
make_tiny_model = write_hf_model_dir


# Between them the three fixtures cover tied/untied embeddings, one file/sharded, and
# plain/scaled RoPE, mirroring Qwen2.5-0.5B, Llama 3.x and a larger (sharded) Qwen3.
@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", rope_scaling=LLAMA3_ROPE_SCALING)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", sharded=True)


@pytest.fixture(params=TINY_ARCHS, ids=TINY_ARCHS)
def tiny_model_dir(request) -> Path:
    """Each of qwen2_dir, llama_dir, qwen3_dir in turn (the arch is request.param)."""
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from more threads, and OpenMP threads fighting other
    # processes for 2 cores make every step many times slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def native_kernels_built():
    # Built (or found in the cache) before any engine starts, so every engine and server the tests
    # start decodes on the native kernels (--native-kernels auto) rather than on whichever path a
    # background build had reached; tests/test_native.py holds them to the PyTorch path.
    import torch

    from chatserve.models import native

    native.start("on", torch.device("cpu"))
