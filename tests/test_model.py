import math

import pytest
import torch

from gpt2core import GPT2, GPT2Config

# Hugging Face's published parameter counts (tied embedding counted once).
HF_PARAMETER_COUNTS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("preset, count", HF_PARAMETER_COUNTS.items())
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset(preset))
    assert model.num_parameters() == count


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="gpt3"):
        GPT2Config.preset("gpt3")


@pytest.mark.parametrize(
    "field, value",
    [("n_layer", 0), ("n_head", -1), ("n_embd", 65), ("block_size", 1.5), ("dropout", 1.0), ("n_inner", 0)],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPT2Config(**{**dict(n_layer=2, n_head=4, n_embd=64), field: value})


def test_forward_shapes_and_loss(tiny_model):
    idx = torch.randint(0, 50257, (3, 17))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 17, 50257)
    assert loss is None
    logits, loss = tiny_model(idx, targets=idx)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert torch.allclose(loss, expected)


def test_targets_of_minus_100_are_ignored(tiny_model):
    idx = torch.randint(0, 50257, (2, 9))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = tiny_model(idx, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), idx[:, 4:].flatten())
    assert torch.allclose(loss, expected)


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=8, n_head=4, n_embd=256, block_size=64)
    model = GPT2(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].mlp.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.ln_f.weight.eq(1).all() and model.transformer.ln_f.eps == 1e-5


def test_left_padded_row_computes_what_it_would_alone(tiny_model):
    prompts = [torch.randint(0, 50257, (n,)) for n in (5, 12, 9)]
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    batched, _ = tiny_model(idx, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone, _ = tiny_model(p[None])
        torch.testing.assert_close(batched[row, width - len(p) :], alone[0], atol=1e-5, rtol=0)


def test_sequence_longer_than_block_size_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=32, dropout=0.2))
    idx = torch.randint(0, 50257, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_padded_vocabulary_gives_the_same_logits(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    padded = GPT2.from_pretrained(tmp_path, pad_vocab_multiple=64).eval()
    assert padded.transformer.wte.weight.shape[0] == 50304
    idx = torch.randint(0, 50257, (2, 11))
    logits, _ = padded(idx)
    assert logits.shape[-1] == 50257
    torch.testing.assert_close(logits, tiny_model(idx)[0])
