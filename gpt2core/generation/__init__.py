"""Batched text generation: a per-slot KV cache, continuous batching and per-request seeded sampling.

    results = generate(model, tok, ["Hello", "Once upon a time"], SamplingParams(max_new_tokens=64, top_p=0.95, seed=1))
    results[0].completions[0].text

Every completion (a prompt's n samples are n completions) occupies one slot of the cache while it is generated.
Waiting prompts are prefilled as soon as slots are free, and a finished completion frees its slot, so short and
long requests share the batch without waiting for each other (continuous batching). Each slot holds its sequence
from position 0, so a prompt goes through the same computation as alone.

Randomness is counter-based: the t-th token (t = 0, 1, ...) of a completion is drawn by inverse CDF with the
uniform u(c, t) = splitmix64(c + (t + 1) * 0x9E3779B97F4A7C15) >> 11, times 2**-53 (uniform_for, uniforms_for),
where c is the completion's own seed (from the request's seed and the completion's number). u depends on (c, t)
only, never on the batch, on the device or on what was drawn before, so it can be computed on the host
(uniform_for) or on the device with int64 tensor ops (uniforms_for) and give the same float64, bit for bit.

Two engines run the slots:
  - on CPU (by default), one decode step at a time over the active rows, each step's tokens read back at once
    (the host's finish checks cost nothing next to a CPU forward);
  - on CUDA (or with `sync_every=k` anywhere), all slots step together, sampling on the device, and the host reads
    the tokens back every `sync_every` steps only; it then finishes requests exactly where step-by-step decoding
    would (later tokens are dropped) and prefills waiting prompts into the freed slots. Decode steps have static
    shapes (every slot; attention over a width rounded up to WIDTH_BUCKET, masked per row), so on CUDA each
    (width, sampling plan) is captured once as a CUDA graph and replayed; if a capture fails, steps run eagerly.
Both give the same tokens for a seed, up to floating-point differences between their kernels.

The modules, each importing only those above it:
  - params.py: SamplingParams, Completion, GenerationResult, PromptTooLongError, and _Request (one completion's
    state while it is generated);
  - seeds.py: each completion's seed and the splitmix64 uniforms (uniform_for, uniforms_for);
  - sampling.py: sample() and its tensor form _sample_rows (top-k / top-p thresholds, sampling plans);
  - engine.py: the engines' shared base, the step-by-step engine, the prefill / decode cache views, prefill
    chunking, and the oneDNN matmuls on CPU;
  - slot_engine.py: the slot engine, with its CUDA graphs and their side stream;
  - api.py: generate(), auto_batch_size(), slots_for_memory() and prompt preparation.
This package re-exports their public names. The constants are read where they are defined: to change one (a test's
monkeypatch), set it on that module (e.g. gpt2core.generation.engine.ONEDNN_ROWS), not on this package.
"""
from __future__ import annotations

from .api import (
    CPU_BATCH_SIZE,
    LOGIT_BYTES_PER_ENTRY,
    MAX_AUTO_BATCH,
    MEMORY_HEADROOM,
    SYNC_EVERY,
    auto_batch_size,
    generate,
    slots_for_memory,
)
from .engine import ONEDNN_ROWS, PREFILL_PADDING, PREFILL_SLACK, PREFILL_TOKENS, PREFILL_TOKENS_CPU
from .params import Completion, FinishReason, GenerationResult, PromptTooLongError, SamplingParams
from .sampling import sample
from .seeds import uniform_for, uniforms_for
from .slot_engine import MAX_CUDA_GRAPHS, WIDTH_BUCKET

__all__ = [
    "CPU_BATCH_SIZE",
    "LOGIT_BYTES_PER_ENTRY",
    "MAX_AUTO_BATCH",
    "MAX_CUDA_GRAPHS",
    "MEMORY_HEADROOM",
    "ONEDNN_ROWS",
    "PREFILL_PADDING",
    "PREFILL_SLACK",
    "PREFILL_TOKENS",
    "PREFILL_TOKENS_CPU",
    "SYNC_EVERY",
    "WIDTH_BUCKET",
    "Completion",
    "FinishReason",
    "GenerationResult",
    "PromptTooLongError",
    "SamplingParams",
    "auto_batch_size",
    "generate",
    "sample",
    "slots_for_memory",
    "uniform_for",
    "uniforms_for",
]
