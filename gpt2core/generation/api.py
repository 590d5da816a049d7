"""The entry point: generate() (checks its arguments, prepares the prompts into completion requests and runs
them through an engine), auto_batch_size() and slots_for_memory() (how many completions to decode together), and
prompt preparation (_params_per_prompt, _prepare, _token_ids)."""
from __future__ import annotations

import secrets
from typing import Any, Sequence

import torch

from ..config import GPT2Config
from ..model import GPT2
from ..tokenizer import GPT2Tokenizer
from .engine import PREFILL_TOKENS, _cache_dtype, _Engine, _onednn_linears
from .params import GenerationResult, PromptTooLongError, SamplingParams, _Request
from .seeds import _completion_seed
from .slot_engine import WIDTH_BUCKET, _round_up, _SlotEngine

# Completions decoded together when generate() is not told (max_batch_size=None) on a device other than CUDA.
CPU_BATCH_SIZE = 32
# The slot engine (CUDA; sync_every=k elsewhere) reads the sampled tokens back every SYNC_EVERY steps: often enough
# that a finished completion's slot idles for few steps, rarely enough that the host's reading and finish checks
# (one device-to-host copy and a Python pass over the slots) weigh little against that many steps.
SYNC_EVERY = 16
# Batch size from free CUDA memory (auto_batch_size): at most this many slots, and per slot, besides its KV cache,
# this many bytes per vocabulary entry for a decode step's logits and sampling temporaries: the logits in the
# model's dtype (2 or 4), their float32 copy (4), the float64 CDF (8), a full-vocabulary sort's values and indices
# when top-p runs without top-k (4 + 8), its softmax and cumulative sum (4 + 4), masks (1), 36 in all; counted three
# times, since three caches of the allocator hold a step's worth: the CUDA graphs' private pool, the side stream
# their eager warm-ups run on, and the default stream where first tokens are sampled after prefill.
MAX_AUTO_BATCH = 4096
LOGIT_BYTES_PER_ENTRY = 3 * 36
# ... and this share of the device's memory (plus PREFILL_TOKENS tokens' activations) left for everything else.
MEMORY_HEADROOM = 0.08


def generate(
    model: GPT2,
    tok: GPT2Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    max_batch_size: int | None = None,
    device: torch.device | str | None = None,
    sync_every: int | None = None,
    cuda_graphs: bool | None = None,
) -> list[GenerationResult]:
    """Complete every prompt (text, or a list of token ids); one GenerationResult per prompt, in order.

    `params` is one SamplingParams for all prompts or one per prompt. At most `max_batch_size` completions are
    decoded together; their KV cache takes 2 * n_layer * max_batch_size * n_embd * (longest prompt +
    max_new_tokens) numbers of the model's dtype (on CUDA under autocast, of the autocast dtype). None: on CUDA as
    many as free device memory holds (auto_batch_size), elsewhere CPU_BATCH_SIZE. Text prompts are user text:
    "<|endoftext|>" in them is ordinary text (pass token ids to use the separator token); an empty prompt starts
    from that token, as GPT-2's unconditional samples do. All prompts are checked (PromptTooLongError,
    ValueError) before any compute. `device` defaults to, and must equal, the model's; the model runs in whatever
    dtype it has (logits and sampling are float32/float64 whatever it is).

    `sync_every` picks the engine (package docstring): None is step by step on CPU and SYNC_EVERY elsewhere; k
    runs all slots with sampling on the device and reads tokens back every k steps, on any device (the same tokens
    as step by step, up to floating-point differences). `cuda_graphs` (slot engine on CUDA only): None captures
    decode steps as CUDA graphs where it can and runs them eagerly where a capture fails, True raises instead,
    False never captures. Under autocast the steps always run eagerly (autocast's weight cache cannot be captured).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts, not a single string")
    if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive integer or None, got {max_batch_size!r}")
    if sync_every is not None and (not _is_int(sync_every) or sync_every < 1):
        raise ValueError(f"sync_every must be a positive integer or None, got {sync_every!r}")
    if cuda_graphs not in (None, True, False):
        raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
    if device is not None and not _same_device(torch.device(device), model.device):
        raise ValueError(f"model is on {model.device}, not {device}; move it with model.to(device)")
    params = _params_per_prompt(params, len(prompts))
    results, requests = _prepare(model, tok, prompts, params)
    if requests:
        stepwise = sync_every is None and model.device.type == "cpu"
        if max_batch_size is None:
            max_len = max(len(r.ids) + r.params.max_new_tokens for r in requests)
            max_batch_size = auto_batch_size(model, max_len)
        slots = min(max_batch_size, len(requests))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), _onednn_linears(model, slots):
                if stepwise:
                    _Engine(model, tok, requests, slots).run()
                else:
                    _SlotEngine(model, tok, requests, slots, sync_every or SYNC_EVERY, cuda_graphs).run()
        finally:
            model.train(was_training)
    for request in requests:
        results[request.prompt].completions.append(request.completion)
    return results


def auto_batch_size(model: GPT2, max_len: int | None = None) -> int:
    """How many completions generate(max_batch_size=None) decodes together: CPU_BATCH_SIZE unless the model is on
    CUDA, where it is as many slots as fit in the device's free memory (slots_for_memory), each slot's sequences up
    to `max_len` tokens (default block_size) long. Free memory is what torch.cuda.mem_get_info reports plus what
    PyTorch's caching allocator holds unused (it hands that out again before asking the device)."""
    device = model.device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return slots_for_memory(model.config, max_len or model.config.block_size, _cache_dtype(model).itemsize,
                            free, total)


def slots_for_memory(config: GPT2Config, max_len: int, itemsize: int, free_bytes: int, total_bytes: int) -> int:
    """Slots (completions decoded together) whose memory fits in `free_bytes`, between 1 and MAX_AUTO_BATCH.

    Per slot (bytes): its KV cache, 2 (keys and values) * n_layer * n_embd * cols * itemsize, where cols is
    `max_len` (capped at block_size) rounded up to WIDTH_BUCKET, as _SlotEngine allocates it (n_head * head_dim =
    n_embd numbers per token and layer); its repetition history, cols int64 ids; and padded_vocab_size *
    LOGIT_BYTES_PER_ENTRY for the decode step's logits and sampling temporaries. Left aside first:
    MEMORY_HEADROOM of `total_bytes` (the CUDA context, allocator fragmentation, cuBLAS workspaces) and one
    prefill forward of PREFILL_TOKENS tokens, counted as (6 * n_embd + 2 * mlp_width) float32 numbers per token
    (residual, LayerNorm, q/k/v, attention output, MLP hidden and GELU alive at once).
    """
    cols = _round_up(min(max_len, config.block_size), WIDTH_BUCKET)
    per_slot = (2 * config.n_layer * config.n_embd * cols * itemsize + 8 * cols
                + config.padded_vocab_size * LOGIT_BYTES_PER_ENTRY)
    prefill = PREFILL_TOKENS * (6 * config.n_embd + 2 * config.mlp_width) * 4
    budget = free_bytes - MEMORY_HEADROOM * total_bytes - prefill
    return int(max(1, min(MAX_AUTO_BATCH, budget // per_slot)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_device(requested: torch.device, actual: torch.device) -> bool:
    return requested.type == actual.type and requested.index in (None, actual.index)


def _params_per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not SamplingParams")
    return params


def _prepare(
    model: GPT2, tok: GPT2Tokenizer, prompts: Sequence[Any], params: list[SamplingParams]
) -> tuple[list[GenerationResult], list[_Request]]:
    """Tokenize and check every prompt, and expand each into its n completion requests."""
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    encoded = dict(zip(texts, tok.encode_batch([prompts[i] for i in texts])))
    # Prompt ids must be ones both the model and the tokenizer know (a resized model may have extra rows).
    block_size, vocab_size = model.config.block_size, min(model.config.vocab_size, tok.vocab_size)
    results, requests = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids = _token_ids(encoded.get(i, prompt), i, vocab_size)
        text = prompt if isinstance(prompt, str) else tok.decode(ids)
        ids = ids or [tok.eot_id]
        limit = block_size - p.max_new_tokens
        if limit < 1:
            raise PromptTooLongError(
                f"prompt {i}: max_new_tokens={p.max_new_tokens} leaves no room for a prompt "
                f"in the model's block_size of {block_size}"
            )
        truncated = len(ids) > limit
        if truncated and not p.truncate_prompt:
            raise PromptTooLongError(
                f"prompt {i} has {len(ids)} tokens, more than the limit of {limit} "
                f"(block_size {block_size} - max_new_tokens {p.max_new_tokens}); shorten it or set truncate_prompt"
            )
        ids = ids[-limit:]
        seed = secrets.randbits(63) if p.seed is None else p.seed
        results.append(GenerationResult(i, text, ids, [], seed, truncated))
        tail_tokens = max((len(s.encode()) for s in p.stop), default=0) + 1
        for j in range(p.n):
            requests.append(_Request(i, ids, p, _completion_seed(seed, j), tail_tokens))
    return results, requests


def _token_ids(prompt: Any, index: int, vocab_size: int) -> list[int]:
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise ValueError(f"prompt {index} is neither a string nor a list of token ids") from None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt {index} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return ids
