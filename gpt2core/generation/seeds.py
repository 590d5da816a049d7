"""Counter-based randomness: each completion's own seed (_completion_seed) and the splitmix64 uniform that draws
its t-th token, computed with Python ints on the host (uniform_for) or with int64 tensor ops on any device
(uniforms_for), bit for bit the same."""
from __future__ import annotations

import hashlib

import torch


def _completion_seed(seed: int, completion: int) -> int:
    """Completion `completion`'s own seed (0 <= c < 2**64) from its request's seed: the first 8 bytes of a SHA-256,
    so completions of nearby seeds or numbers draw unrelated streams."""
    digest = hashlib.sha256(f"gpt2core:{seed}:{completion}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014; constants as in
# Vigna's splitmix64.c): state += GAMMA; z = state; z = (z ^ z >> 30) * MIX1; z = (z ^ z >> 27) * MIX2; z ^ z >> 31.
# Its t-th output from state c is a function of c + (t + 1) * GAMMA alone, which makes it a counter-based generator.
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TO_UNIT = 2.0**-53  # 53 random bits -> a float64 in [0, 1), exactly


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 with the same bits (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def uniform_for(seed: int, step: int) -> float:
    """The uniform in [0, 1) that draws token `step` (0 for the first) of the completion seeded `seed`: splitmix64's
    output number `step` from state `seed`, its top 53 bits times 2**-53 (package docstring). Computed with Python
    ints; uniforms_for gives the same float64 from tensors."""
    z = (seed + (step + 1) * _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z ^= z >> 31
    return (z >> 11) * _TO_UNIT


def uniforms_for(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """uniform_for elementwise, on the tensors' device: `seeds` (int64, the seeds' 64-bit patterns, as _int64
    gives them) and `steps` (int64) broadcast together; float64 result. Bit-identical to uniform_for: int64 adds and
    multiplies wrap modulo 2**64 as the masked Python arithmetic does, and the shifts are made logical by masking
    the sign bits an arithmetic shift copies in."""
    z = seeds + (steps + 1) * _int64(_GAMMA)
    z = (z ^ _shift_right(z, 30)) * _int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX2)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * _TO_UNIT


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)
