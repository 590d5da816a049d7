"""gpt2core.flops: the 6N + 12·L·H·Q·T estimate, the peak table's lookups by device name, and MFU."""
from __future__ import annotations

import pytest

from gpt2core import GPT2, GPT2Config
from gpt2core.flops import (
    PEAK_BF16,
    achieved_tflops,
    find_peak,
    mfu,
    num_parameters,
    peak_bf16_tflops,
    training_flops_per_token,
)


def test_gpt2_preset_by_hand():
    # 124M: 12 blocks of 7,087,872 (c_attn 768*2304+2304, c_proj 768*768+768, c_fc 768*3072+3072,
    # c_proj 3072*768+768, two LayerNorms 2*1536), wte 50257*768, ln_f 1536; wpe 1024*768 left out.
    block = 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * 1536
    assert block == 7_087_872
    n = 12 * block + 50257 * 768 + 1536
    assert n == 123_653_376
    attention = 12 * 12 * 12 * 64 * 1024  # 12·L·H·Q·T
    assert attention == 113_246_208
    config = GPT2Config.preset("gpt2")
    assert training_flops_per_token(config, 1024) == 6 * n + attention == 855_166_464
    # With the position embedding: 6 * 1024 * 768 more.
    assert training_flops_per_token(config, 1024, non_embedding=False) == 855_166_464 + 6 * 786_432


def test_nanogpt_numbers_with_its_padded_vocabulary():
    # nanoGPT's GPT-2 (vocab padded to 50304) reports "number of parameters: 123.69M" (without wpe); its
    # estimate_mfu then counts 6 * 123,689,472 + 12*12*12*64*1024 FLOPs per token at T=1024.
    config = GPT2Config.preset("gpt2", pad_vocab_multiple=64)
    assert config.padded_vocab_size == 50304
    assert num_parameters(config, non_embedding=True) == 123_689_472
    assert training_flops_per_token(config, 1024) == 6 * 123_689_472 + 113_246_208


def test_attention_term_grows_linearly_with_seq_len():
    config = GPT2Config.preset("gpt2")
    assert training_flops_per_token(config, 2048) - training_flops_per_token(config, 1024) == 12 * 12 * 768 * 1024


@pytest.mark.parametrize(
    "config",
    [
        GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128),
        GPT2Config(n_layer=3, n_head=6, n_embd=96, block_size=48, n_inner=200, vocab_size=1000, pad_vocab_multiple=64),
    ],
)
def test_parameter_count_matches_the_model(config):
    model = GPT2(config)
    assert num_parameters(config) == model.num_parameters()
    assert num_parameters(config, non_embedding=True) == model.num_parameters() - config.block_size * config.n_embd


@pytest.mark.parametrize("seq_len", [0, -1, 1.5, True])
def test_bad_seq_len_is_refused(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        training_flops_per_token(GPT2Config.preset("gpt2"), seq_len)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A30", 165.0),
        ("NVIDIA A40", 149.7),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA RTX A6000", 154.8),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 3090", 71.0),
        ("NVIDIA B200", 2250.0),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_bf16_tflops(name) == peak


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-16GB", "Tesla V100-PCIE-32GB", "Tesla T4"])
def test_devices_without_bf16_have_a_row_but_no_peak(name):
    row = find_peak(name)
    assert row is not None and row.tflops is None and "no bf16" in row.source
    assert peak_bf16_tflops(name) is None


@pytest.mark.parametrize(
    "name", ["", "cpu", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D", "AMD Instinct MI300X", "NVIDIA H800"]
)
def test_unknown_device_is_none(name):
    assert find_peak(name) is None
    assert peak_bf16_tflops(name) is None


def test_every_row_has_a_source_and_a_sane_peak():
    assert len({row.device for row in PEAK_BF16}) == len(PEAK_BF16)
    for row in PEAK_BF16:
        assert row.source
        assert row.tflops is None or 10 < row.tflops < 5000


def test_mfu():
    # nanoGPT's example: ~0.855 GFLOP/token at 100k tokens/s is 85.5 TFLOP/s, 27.4% of an A100's 312.
    flops = training_flops_per_token(GPT2Config.preset("gpt2"), 1024)
    assert achieved_tflops(100_000, flops) == pytest.approx(85.5166464)
    assert mfu(100_000, flops, 312.0) == pytest.approx(85.5166464 / 312)
    assert mfu(0.0, flops, 989.0) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, flops, 0.0)


def test_flops_module_does_not_need_torch_at_import():
    import subprocess
    import sys

    code = "import sys, gpt2core.flops; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
