"""Training FLOPs of a GPT-2, peak bf16 throughput of NVIDIA GPUs by name, and model FLOPs utilization (MFU).

    flops = training_flops_per_token(model.config, seq_len=1024)   # 6N + 12·L·H·Q·T
    peak = peak_bf16_tflops(torch.cuda.get_device_name())          # 989.0 on "NVIDIA H200"; None if unknown
    print(f"MFU {mfu(tokens_per_second, flops, peak):.1%}")

MFU (PaLM, Chowdhery et al. 2022, appendix B) is the throughput a run achieves, in the model's own FLOPs (not
counting recomputation or anything else the implementation adds), over the hardware's peak. Torch-free: the
formula needs only a GPT2Config, the table only a device name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import GPT2Config

__all__ = [
    "PEAK_BF16",
    "DevicePeak",
    "achieved_tflops",
    "find_peak",
    "mfu",
    "num_parameters",
    "peak_bf16_tflops",
    "training_flops_per_token",
]


def num_parameters(config: GPT2Config, non_embedding: bool = False) -> int:
    """The parameters of ``GPT2(config)``, counted from the configuration (equal to ``GPT2.num_parameters()``:
    the token embedding, tied with the output layer, counted once, at its padded size).

    ``non_embedding=True`` leaves out the position embedding (nanoGPT's ``get_num_params()`` default). The token
    embedding stays in: it is also the output layer's weight, a real (n_embd x vocab) matmul per token.
    """
    C, M = config.n_embd, config.mlp_width
    block = (
        2 * C  # ln_1
        + C * 3 * C + 3 * C  # attn.c_attn
        + C * C + C  # attn.c_proj
        + 2 * C  # ln_2
        + C * M + M  # mlp.c_fc
        + M * C + C  # mlp.c_proj
    )
    total = config.padded_vocab_size * C + config.block_size * C + config.n_layer * block + 2 * C  # + ln_f
    return total - config.block_size * C if non_embedding else total


def training_flops_per_token(config: GPT2Config, seq_len: int, non_embedding: bool = True) -> int:
    """Model FLOPs of one training token (forward and backward) at sequence length ``seq_len``: 6N + 12·L·H·Q·T.

    The estimate of the PaLM paper's appendix B (Chowdhery et al. 2022, arXiv:2204.02311), as nanoGPT's
    ``estimate_mfu`` computes it: 6 FLOPs per parameter (a multiply-add forward, two backward) for the weight
    matmuls, plus 12·L·H·Q·T for attention's two matmuls (QKᵀ and AV) over T keys, L layers, H heads of width Q
    (H·Q = n_embd). N is ``num_parameters(config, non_embedding)``: by default without the position embedding (a
    lookup, not a matmul), as nanoGPT counts it. The attention term counts the full T×T scores, as PaLM does,
    although causal (flash) attention computes about half of them; LayerNorm, GELU, softmax and the optimizer
    are not counted.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    L, H, Q = config.n_layer, config.n_head, config.head_dim
    return 6 * num_parameters(config, non_embedding) + 12 * L * H * Q * seq_len


def achieved_tflops(tokens_per_second: float, flops_per_token: float) -> float:
    """Model TFLOP/s of a run that processes ``tokens_per_second`` tokens of ``flops_per_token`` each."""
    return tokens_per_second * flops_per_token / 1e12


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the peak (a fraction; 0.4 is 40%)."""
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops!r}")
    return achieved_tflops(tokens_per_second, flops_per_token) / peak_tflops


# --------------------------------------------------------------------------------------------------
# Peak dense bf16 tensor-core throughput by device name
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeak:
    """One row of the peak table: the device, its dense bf16 peak in TFLOP/s (None: no bf16 tensor cores),
    the pattern its ``torch.cuda.get_device_name()`` matches, and where the number comes from."""

    device: str
    tflops: float | None
    pattern: str  # a regular expression searched in the normalized name (see _normalize)
    source: str


_DS = "NVIDIA datasheet"
_AMPERE_WP = "NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix A"
_ADA_WP = "NVIDIA Ada GPU Architecture whitepaper, appendix A"

#: Dense (no 2:4 sparsity) bf16 tensor-core peaks, FP32 accumulate, at boost clock. Datasheets print the sparse
#: figure with an asterisk next to the dense one; the dense one is used here. First match wins, so a more
#: specific pattern comes before a more general one (H100 NVL and H100 PCIe before H100).
PEAK_BF16: tuple[DevicePeak, ...] = (
    DevicePeak("B200", 2250.0, r"\bb200\b", f"{_DS}: HGX B200 (FP16/BF16 36 PFLOPS with sparsity for 8 GPUs)"),
    DevicePeak("GH200", 989.0, r"\bgh200\b", f"{_DS}: GH200 Grace Hopper Superchip (BF16 1,979 TFLOPS with sparsity)"),
    DevicePeak("H200 NVL", 835.0, r"\bh200\b.*\bnvl\b", f"{_DS}: H200 (H200 NVL BF16 1,671 TFLOPS with sparsity)"),
    DevicePeak("H200 SXM", 989.0, r"\bh200\b", f"{_DS}: H200 (H200 SXM BF16 1,979 TFLOPS with sparsity)"),
    DevicePeak("H100 NVL", 835.0, r"\bh100\b.*\bnvl\b", f"{_DS}: H100 (H100 NVL BF16 1,671 TFLOPS with sparsity)"),
    DevicePeak("H100 PCIe", 756.0, r"\bh100\b.*\bpcie\b", f"{_DS}: H100 (H100 PCIe BF16 1,513 TFLOPS with sparsity)"),
    DevicePeak("H100 SXM", 989.0, r"\bh100\b", f"{_DS}: H100 (H100 SXM BF16 1,979 TFLOPS with sparsity)"),
    DevicePeak("A100", 312.0, r"\ba100\b", f"{_DS}: A100 40GB/80GB, PCIe and SXM (BF16 312 | 624* TFLOPS)"),
    DevicePeak("A30", 165.0, r"\ba30\b", f"{_DS}: A30 (BF16 165 | 330* TFLOPS)"),
    DevicePeak("A40", 149.7, r"\ba40\b", f"{_DS}: A40 (BF16 with FP32 accumulate 149.7 | 299.4* TFLOPS)"),
    DevicePeak("A10G", 70.0, r"\ba10g\b",
               "UNVERIFIED: AWS-only part, no NVIDIA datasheet; the commonly quoted figure (half-rate FP32 "
               "accumulate, as on GeForce GA102); pass --peak-tflops when it matters"),
    DevicePeak("A10", 125.0, r"\ba10\b", f"{_DS}: A10 (BF16 125 | 250* TFLOPS)"),
    DevicePeak("L40S", 362.0, r"\bl40s\b", f"{_DS}: L40S (BF16 362.05 | 733* TFLOPS)"),
    DevicePeak("L40", 181.0, r"\bl40\b", f"{_DS}: L40 (BF16 181.05 | 362.1* TFLOPS)"),
    DevicePeak("L4", 121.0, r"\bl4\b", f"{_DS}: L4 (BF16 242 TFLOPS with sparsity)"),
    DevicePeak("RTX A6000", 154.8, r"\brtx a6000\b", f"{_DS}: RTX A6000 (tensor performance 309.7 TFLOPS with sparsity)"),
    DevicePeak("RTX 4090", 165.2, r"\brtx 4090$", f"{_ADA_WP} (RTX 4090: BF16 with FP32 accumulate 165.2)"),
    DevicePeak("RTX 3090", 71.0, r"\brtx 3090$", f"{_AMPERE_WP} (RTX 3090: BF16 with FP32 accumulate 71)"),
    DevicePeak("V100", None, r"\bv100\b", "Volta: FP16 tensor cores only, no bf16"),
    DevicePeak("T4", None, r"\bt4\b", "Turing: FP16 tensor cores only, no bf16"),
)


def _normalize(device_name: str) -> str:
    """"NVIDIA GeForce RTX 4090" -> "rtx 4090"; "NVIDIA A100-SXM4-80GB" -> "a100 sxm4 80gb"."""
    name = re.sub(r"[-_\s]+", " ", device_name.lower()).strip()
    return re.sub(r"\b(nvidia|geforce|tesla)\b\s*", "", name).strip()


def find_peak(device_name: str) -> DevicePeak | None:
    """The table's row for a ``torch.cuda.get_device_name()`` string, or None when no row matches."""
    name = _normalize(device_name)
    for row in PEAK_BF16:
        if re.search(row.pattern, name):
            return row
    return None


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak TFLOP/s of the device named ``device_name`` (as ``torch.cuda.get_device_name()``
    spells it: "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"); None for a device not in
    ``PEAK_BF16`` or one without bf16 tensor cores (V100, T4)."""
    row = find_peak(device_name)
    return row.tflops if row is not None else None
