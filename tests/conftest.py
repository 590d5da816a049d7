import pytest
import torch

from gpt2core import GPT2, GPT2Config, GPT2Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture
def tiny_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128)


@pytest.fixture
def tiny_model(tiny_config) -> GPT2:
    torch.manual_seed(0)
    return GPT2(tiny_config).eval()
