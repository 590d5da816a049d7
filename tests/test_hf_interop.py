"""gpt2core against transformers' GPT2LMHeadModel on the same (small, random) weights."""
import json

import pytest
import torch
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

from gpt2core import GPT2, CheckpointError, GPT2Config

SHAPES = [
    dict(n_layer=1, n_head=1, n_embd=32, block_size=64),
    dict(n_layer=2, n_head=4, n_embd=64, block_size=128),
    dict(n_layer=3, n_head=6, n_embd=96, block_size=48, n_inner=200),
]


def hf_model(n_layer, n_head, n_embd, block_size, n_inner=None, seed=0):
    torch.manual_seed(seed)
    config = HFConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size, n_inner=n_inner)
    model = GPT2LMHeadModel(config).eval()
    # Random non-trivial LayerNorm and bias values, so a transposed or skipped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") else 0.0, std=0.1)
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(shape, tmp_path):
    reference = hf_model(**shape)
    reference.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, shape["block_size"]))
    with torch.no_grad():
        ours, _ = model(idx)
    torch.testing.assert_close(ours, hf_logits(reference, idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_save_pretrained_loads_in_transformers(shape, tmp_path):
    torch.manual_seed(1)
    model = GPT2(GPT2Config(**shape)).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    reference = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (3, 20))
    with torch.no_grad():
        ours, _ = model(idx)
    torch.testing.assert_close(hf_logits(reference, idx), ours, atol=1e-4, rtol=0)


def test_loss_matches_transformers(tmp_path):
    reference = hf_model(**SHAPES[1])
    reference.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        expected = reference(idx, labels=idx).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_greedy_decoding_matches_transformers(tmp_path):
    reference = hf_model(**SHAPES[1])
    reference.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[15496, 995, 11, 314]])
    expected = reference.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=50256)
    idx = prompt
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert idx.tolist() == expected.tolist()


def test_pytorch_model_bin_without_prefix_and_with_buffers(tmp_path):
    """Older checkpoints: pytorch_model.bin, GPT2Model keys (no `transformer.`), attn.bias buffers."""
    reference = hf_model(**SHAPES[1])
    state = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    for i in range(SHAPES[1]["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(reference.config.to_dict()))
    model = GPT2.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (1, 25))
    with torch.no_grad():
        ours, _ = model(idx)
    torch.testing.assert_close(ours, hf_logits(reference, idx), atol=1e-4, rtol=0)


@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    return tmp_path


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        GPT2.from_pretrained(tmp_path / "nowhere")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        GPT2.from_pretrained(checkpoint)


def test_config_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GPT2.from_pretrained(checkpoint)


def test_wrong_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        GPT2.from_pretrained(checkpoint)


def test_unsupported_activation(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function"):
        GPT2.from_pretrained(checkpoint)


def test_missing_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        GPT2.from_pretrained(checkpoint)


def test_corrupt_weights(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        GPT2.from_pretrained(checkpoint)


def test_tensor_with_wrong_shape_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    with pytest.raises(CheckpointError, match=r"tensor wte.weight has shape \[50257, 64\], expected \[50257, 128\]"):
        GPT2.from_pretrained(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"lacks tensor h\.2\."):
        GPT2.from_pretrained(checkpoint)
