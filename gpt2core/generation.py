"""Batched text generation: a per-slot KV cache, continuous batching and per-request seeded sampling.

    results = generate(model, tok, ["Hello", "Once upon a time"], SamplingParams(max_new_tokens=64, top_p=0.95, seed=1))
    results[0].completions[0].text

Every completion (a prompt's n samples are n completions) occupies one slot of the cache while it is generated.
Waiting prompts are prefilled as soon as slots are free, and a finished completion frees its slot at once, so
short and long requests share the batch without waiting for each other (continuous batching). Each slot holds its
sequence from position 0, so a prompt goes through the same computation as alone, and each completion draws its
random numbers from its own generator (one uniform per step, seeded from the request's seed and the completion's
number), so its output does not depend on what else is in the batch.
"""
from __future__ import annotations

import hashlib
import math
import random
import secrets
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT2
from .tokenizer import GPT2Tokenizer

FinishReason = Literal["stop", "length"]
# Most padded tokens one prefill forward may hold (a single longer prompt still goes in one forward). On CPU a
# bigger forward overflows the caches and costs more per token; accelerators want big forwards.
PREFILL_TOKENS_CPU = 256
PREFILL_TOKENS = 8192
# Prompts of different lengths share a prefill forward while its padding stays under this fraction of its real
# tokens plus PREFILL_SLACK tokens (about what a separate forward would cost on CPU, where reading the weights
# takes as long as computing that many tokens).
PREFILL_PADDING = 0.1
PREFILL_SLACK = 64
# On CPU, oneDNN with prepacked weights multiplies this many rows (decode steps, small prefills) 1.1x to 1.5x faster
# than the default sgemm; with fewer rows, or many more, the default is as fast or faster.
ONEDNN_ROWS = range(4, 257)


class PromptTooLongError(ValueError):
    """A prompt that leaves less than max_new_tokens of the model's block_size (and truncate_prompt is off)."""


@dataclass
class SamplingParams:
    """How to sample one prompt's completions.

    temperature 0 is greedy decoding. top_k=0 and top_p=1 switch those filters off. repetition_penalty follows
    CTRL / Hugging Face: the logit of every token already in the prompt or the completion is divided by it when
    positive and multiplied by it when negative. Generation stops at the first of: max_new_tokens tokens, the
    end-of-text token (unless ignore_eos), or any of the `stop` strings. `seed=None` draws a fresh seed (reported
    in GenerationResult.seed). truncate_prompt keeps only the last block_size - max_new_tokens prompt tokens
    instead of raising PromptTooLongError.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] | str | None = ()
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    truncate_prompt: bool = False

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        require(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        require(is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        require(is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)")
        require(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        require(
            is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "a number > 0 (1 = off)",
        )
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        require(
            isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "a non-empty string or a list of non-empty strings",
        )
        self.stop = tuple(self.stop)
        require(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool")
        require(is_int(self.n) and self.n >= 1, "n", "an integer >= 1")
        require(self.seed is None or is_int(self.seed), "seed", "an integer or None")
        require(isinstance(self.truncate_prompt, bool), "truncate_prompt", "a bool")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        """Parameters from a mapping (a line of a bulk generation file); unknown keys raise ValueError."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class Completion:
    text: str  # without the end-of-text token and without the stop string (cut at its first occurrence)
    token_ids: list[int]  # every generated token, including an end-of-text or stop-string-completing last token
    finish_reason: FinishReason  # "stop": end-of-text or a stop string; "length": max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationResult:
    index: int  # position of the prompt in the `prompts` argument
    prompt: str
    prompt_token_ids: list[int]  # what the model saw (after truncation; [50256] for an empty prompt)
    completions: list[Completion]
    seed: int  # the seed used; pass it back in SamplingParams to reproduce these completions
    truncated: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class _Request:
    """One completion being generated: its prompt, sampling state and tokens so far."""

    prompt: int
    ids: list[int]
    params: SamplingParams
    rng: random.Random
    tail_tokens: int  # how many final tokens can hold the longest stop string
    out: list[int] = field(default_factory=list)
    completion: Completion | None = None

    @property
    def cached(self) -> int:
        """Tokens in this request's cache slot: the prompt and all generated tokens but the newest."""
        return len(self.ids) + len(self.out) - 1


def generate(
    model: GPT2,
    tok: GPT2Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    max_batch_size: int = 32,
    device: torch.device | str | None = None,
) -> list[GenerationResult]:
    """Complete every prompt (text, or a list of token ids); one GenerationResult per prompt, in order.

    `params` is one SamplingParams for all prompts or one per prompt. At most `max_batch_size` completions are
    decoded together; their KV cache takes 2 * n_layer * max_batch_size * n_embd * (longest prompt +
    max_new_tokens) numbers. Text prompts are user text: "<|endoftext|>" in them is ordinary text (pass token ids to
    use the separator token); an empty prompt starts from that token, as GPT-2's unconditional samples do. All prompts are checked
    (PromptTooLongError, ValueError) before any compute. `device` defaults to, and must equal, the model's.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts, not a single string")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if device is not None and not _same_device(torch.device(device), model.device):
        raise ValueError(f"model is on {model.device}, not {device}; move it with model.to(device)")
    params = _params_per_prompt(params, len(prompts))
    results, requests = _prepare(model, tok, prompts, params)
    if requests:
        slots = min(max_batch_size, len(requests))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), _onednn_linears(model, slots):
                _Engine(model, tok, requests, slots).run()
        finally:
            model.train(was_training)
    for request in requests:
        results[request.prompt].completions.append(request.completion)
    return results


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
            requests.append(_Request(i, ids, p, random.Random(_completion_seed(seed, j)), tail_tokens))
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


def _completion_seed(seed: int, completion: int) -> int:
    digest = hashlib.sha256(f"gpt2core:{seed}:{completion}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@contextmanager
def _onednn_linears(model: GPT2, batch_size: int) -> Iterator[None]:
    """While generating in float32 on CPU, route the model's matmuls of ONEDNN_ROWS rows through oneDNN with the
    weights prepacked for `batch_size` rows (this keeps a second copy of the weights until generation ends)."""
    usable = (
        batch_size >= ONEDNN_ROWS.start
        and model.device.type == "cpu"
        and model.transformer.wte.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)] if usable else []
    for linear in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight, batch_size)
        linear.forward = partial(_onednn_linear, linear, packed)
    try:
        yield
    finally:
        for linear in linears:
            vars(linear).pop("forward", None)


def _onednn_linear(linear: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.size(-1) in ONEDNN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")
    return F.linear(x, linear.weight, linear.bias)


class _Engine:
    """Runs the requests through `slots` cache rows; active requests always fill rows [0, len(active))."""

    def __init__(self, model: GPT2, tok: GPT2Tokenizer, requests: list[_Request], slots: int):
        self.model, self.tok = model, tok
        self.waiting = deque(requests)
        self.active: list[_Request] = []
        self.slots = slots
        cfg = model.config
        max_len = min(cfg.block_size, max(len(r.ids) + r.params.max_new_tokens for r in requests))
        weight = model.transformer.wte.weight
        shape = (cfg.n_layer, self.slots, cfg.n_head, max_len, cfg.head_dim)
        # Zeroed, because masked-out attention still multiplies the values by 0, and garbage may be NaN.
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v = torch.zeros_like(self.k)
        # Prompt + generated tokens of each row, for the repetition penalty; columns past a row's length hold its
        # first token, so penalising the whole row changes nothing extra.
        needs_history = any(r.params.repetition_penalty != 1 for r in requests)
        self.history = None
        if needs_history:
            self.history = torch.empty((self.slots, max_len), dtype=torch.long, device=weight.device)

    def run(self) -> None:
        while self.waiting or self.active:
            while self.waiting and len(self.active) < self.slots:
                self.admit()
            if self.active:
                self.decode_step()

    def admit(self) -> None:
        """Prefill waiting requests into the free slots and sample their first tokens."""
        admitted = [self.waiting.popleft() for _ in range(min(self.slots - len(self.active), len(self.waiting)))]
        groups: dict[int, list[_Request]] = {}  # a prompt's completions share one prefill
        for r in admitted:
            groups.setdefault(r.prompt, []).append(r)
        budget = PREFILL_TOKENS_CPU if self.k.device.type == "cpu" else PREFILL_TOKENS
        chunks = _prefill_chunks(sorted(groups.values(), key=lambda g: len(g[0].ids), reverse=True), budget)
        first = len(self.active)
        last_hidden = torch.cat([self.prefill(chunk) for chunk in chunks])
        # One output projection for all the prompts; each completion samples from its prompt's logits.
        completions = torch.tensor([len(group) for chunk in chunks for group in chunk], device=self.k.device)
        logits = self.model.logits(last_hidden).repeat_interleave(completions, dim=0)
        requests = self.active[first:]
        history = None
        if self.history is not None:
            history = self.history[first : len(self.active), : max(len(r.ids) for r in requests)]
        self.record(requests, self.next_tokens(logits, requests, history))
        self.retire_finished()

    def prefill(self, chunk: list[list[_Request]]) -> torch.Tensor:
        """Fill the next free rows with the chunk's prompts (each prompt once per completion) and activate them;
        returns the hidden state of each prompt's last token."""
        device = self.k.device
        lengths = [len(group[0].ids) for group in chunk]
        # Right padding (with the prompt's first token, which keeps it harmless in the repetition history):
        # causal attention never lets a real token see the padding after it.
        width = max(lengths)
        idx = torch.tensor([g[0].ids + g[0].ids[:1] * (width - len(g[0].ids)) for g in chunk], device=device)
        requests = [r for group in chunk for r in group]
        source_row = None
        if len(requests) > len(chunk):
            source_row = torch.tensor([row for row, group in enumerate(chunk) for _ in group], device=device)
        rows = slice(len(self.active), len(self.active) + len(requests))
        hidden = self.model.hidden_states(idx, cache=_PrefillView(self, rows, source_row))
        if self.history is not None:
            self.history[rows] = idx[source_row, :1] if source_row is not None else idx[:, :1]
            self.history[rows, :width] = idx[source_row] if source_row is not None else idx
        self.active.extend(requests)
        return hidden[torch.arange(len(chunk), device=device), torch.tensor(lengths, device=device) - 1]

    def decode_step(self) -> None:
        n = len(self.active)
        device = self.k.device
        tokens = torch.tensor([r.out[-1] for r in self.active], device=device)
        positions = [r.cached for r in self.active]
        pos = torch.tensor(positions, device=device)
        width = max(positions) + 1
        view = _DecodeView(self, n, pos, width)
        hidden = self.model.hidden_states(tokens[:, None], pos[:, None], cache=view)
        history = None
        if self.history is not None:
            self.history[torch.arange(n, device=device), pos] = tokens
            history = self.history[:n, :width]
        self.record(self.active, self.next_tokens(self.model.logits(hidden[:, 0]), self.active, history))
        self.retire_finished()

    def next_tokens(self, logits: torch.Tensor, requests: list[_Request], history: torch.Tensor | None) -> list[int]:
        if logits.size(-1) > self.tok.vocab_size:
            # A model with more rows than the tokenizer has tokens (a resized embedding, e.g. an added pad token)
            # must never pick an id the tokenizer cannot decode, sampling or greedy.
            logits[:, self.tok.vocab_size :] = -math.inf
        uniforms = [0.0 if r.params.temperature == 0 else r.rng.random() for r in requests]
        return sample(logits, [r.params for r in requests], uniforms, history).tolist()

    def record(self, requests: list[_Request], tokens: list[int]) -> None:
        """Append each request's new token and finish the requests that are done."""
        for r, token in zip(requests, tokens):
            r.out.append(token)
            p = r.params
            if token == self.tok.eot_id and not p.ignore_eos:
                r.completion = Completion(self.tok.decode(r.out[:-1]), r.out, "stop")
            elif p.stop and (cut := self.stop_position(r)) is not None:
                r.completion = Completion(self.tok.decode(r.out)[:cut], r.out, "stop")
            elif len(r.out) == p.max_new_tokens:
                r.completion = Completion(self.tok.decode(r.out), r.out, "length")

    def stop_position(self, r: _Request) -> int | None:
        """Where the first stop string starts in the completion's text, once one has appeared."""
        tail = self.tok.decode(r.out[-r.tail_tokens :])
        if not any(s in tail for s in r.params.stop):
            return None
        text = self.tok.decode(r.out)
        return min((i for s in r.params.stop if (i := text.find(s)) >= 0), default=None)

    def retire_finished(self) -> None:
        """Free the finished requests' rows, moving the last active row into each hole to keep rows dense."""
        for row in reversed(range(len(self.active))):
            if self.active[row].completion is None:
                continue
            last = len(self.active) - 1
            if row != last:
                moved = self.active[last]
                length = moved.cached
                self.k[:, row, :, :length] = self.k[:, last, :, :length]
                self.v[:, row, :, :length] = self.v[:, last, :, :length]
                if self.history is not None:
                    self.history[row] = self.history[last]
                self.active[row] = moved
            self.active.pop()


class _PrefillView:
    """Stores a right-padded prefill's keys/values into cache rows [rows] (batch row source_row[i] into the i-th,
    when prompts fill several rows); attention is plain causal."""

    attn_mask = None

    def __init__(self, engine: _Engine, rows: slice, source_row: torch.Tensor | None):
        self.engine, self.rows, self.source_row = engine, rows, source_row

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        self.engine.k[layer, self.rows, :, :T] = k if self.source_row is None else k[self.source_row]
        self.engine.v[layer, self.rows, :, :T] = v if self.source_row is None else v[self.source_row]
        return k, v


class _DecodeView:
    """Stores one new key/value per row at that row's position and attends over each row's own prefix."""

    def __init__(self, engine: _Engine, n: int, pos: torch.Tensor, width: int):
        self.engine, self.n, self.width = engine, n, width
        _, _, heads, max_len, _ = engine.k.shape
        # Row of each (slot, head, position) in a layer's cache seen as a (slots * heads * max_len, head_dim) matrix.
        heads_of_rows = torch.arange(n, device=pos.device)[:, None] * heads + torch.arange(heads, device=pos.device)
        self.index = (heads_of_rows * max_len + pos[:, None]).flatten()
        beyond = torch.arange(width, device=pos.device) > pos[:, None]
        mask = torch.zeros(beyond.shape, dtype=engine.k.dtype, device=pos.device).masked_fill_(beyond, -math.inf)
        self.attn_mask = mask[:, None, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache_k, cache_v = self.engine.k[layer], self.engine.v[layer]
        head_dim = k.size(-1)
        # (under autocast k and v may come in a lower precision than the cache)
        cache_k.view(-1, head_dim).index_copy_(0, self.index, k.reshape(-1, head_dim).to(cache_k.dtype))
        cache_v.view(-1, head_dim).index_copy_(0, self.index, v.reshape(-1, head_dim).to(cache_v.dtype))
        return cache_k[: self.n, :, : self.width], cache_v[: self.n, :, : self.width]


def _prefill_chunks(groups: list[list[_Request]], budget: int) -> list[list[list[_Request]]]:
    """Split prompt groups (sorted longest first) into right-padded prefill batches of at most `budget` tokens
    (or one prompt) with little padding."""
    chunks: list[list[list[_Request]]] = []
    real = 0
    for group in groups:
        length = len(group[0].ids)
        if chunks:
            padded = (len(chunks[-1]) + 1) * len(chunks[-1][0][0].ids)
            waste = padded - real - length
            if padded <= budget and waste <= PREFILL_PADDING * (real + length) + PREFILL_SLACK:
                chunks[-1].append(group)
                real += length
                continue
        chunks.append([group])
        real = length
    return chunks


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    uniforms: Sequence[float],
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row of `logits` (rows, vocab), row i sampled with params[i] and uniforms[i] in [0, 1).

    `history` (rows, T) holds the token ids the repetition penalty applies to. Sampling is by inverse CDF over
    the vocabulary in id order: the token where the cumulative probability first exceeds uniforms[i] wins, and
    top-k and top-p only drop the tokens below a threshold. So a row's choice depends on nothing but its own logits
    and uniform, and the last-bit differences between computing a row alone or in a batch hardly ever change it.
    Float32 `logits` may be overwritten (each full-vocabulary temporary costs as much as the arithmetic on it).
    """
    device = logits.device
    logits = logits.float()
    if history is not None:
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        seen = logits.gather(1, history)
        logits.scatter_(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    top_k = [1 if p.temperature == 0 else p.top_k for p in params]  # greedy rows are top-1 rows
    top_p = [p.top_p if p.temperature > 0 and p.top_p < 1 else math.inf for p in params]
    token_ids = None
    if min(top_k) > 0 and max(top_k) < logits.size(-1):
        # Only the max(top_k) best tokens can be drawn: go on with those, put back in id order.
        logits, token_ids = logits.topk(max(top_k), dim=-1)
        token_ids, order = token_ids.sort(dim=-1)
        logits = logits.gather(1, order)
    logits.div_(torch.tensor([p.temperature or 1.0 for p in params], device=device)[:, None])
    if max(top_k) > 0 or min(top_p) < 1:
        logits.masked_fill_(logits < _threshold(logits, top_k, top_p), -math.inf)
    # Unnormalised cumulative probabilities (the uniform is scaled by the total instead), summed in float64: a
    # float32 running sum over 50k tokens drifts by about one token's probability, and then a row's last-bit
    # differences between running alone and in a batch would move its draw to a neighbouring token.
    cdf = logits.sub_(logits.amax(-1, keepdim=True)).exp_().cumsum(-1, dtype=torch.float64)
    target = torch.tensor(uniforms, device=device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True)
    # u * total can round up to total; the cdf first reaches its maximum at the last token with mass.
    choice = torch.minimum(choice, cdf.argmax(-1, keepdim=True))
    return (choice if token_ids is None else token_ids.gather(1, choice))[:, 0]


def _threshold(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The lowest logit (rows, 1) each row keeps under its top-k, then top-p (ties with it stay too, as in HF)."""
    device = logits.device
    if min(top_k) > 0:
        ranked = logits.topk(min(max(top_k), logits.size(-1)), dim=-1).values
    else:
        ranked = logits.sort(dim=-1, descending=True).values
    width = ranked.size(-1)
    keep = torch.tensor([min(k, width) or width for k in top_k], device=device)
    if min(top_p) < 1:
        # The most likely tokens stay until their mass reaches top_p; the first always stays.
        ranked = ranked.masked_fill(torch.arange(width, device=device) >= keep[:, None], -math.inf)
        probs = torch.softmax(ranked, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        within_p = (mass_before < torch.tensor(top_p, device=device)[:, None]).sum(-1)
        # At least the most likely token, whatever top_p is (one below float32's smallest value reads as 0).
        keep = torch.minimum(keep, within_p.clamp(min=1))
    return ranked.gather(1, keep[:, None] - 1)
