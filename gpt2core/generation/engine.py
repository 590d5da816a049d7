"""The KV cache engines' shared part and the step-by-step engine (the CPU default).

_EngineBase holds what both engines share: the waiting queue, finishing requests from their tokens, and prefill
(prompts grouped into right-padded forwards by _prefill_chunks). _Engine decodes the active rows one step at a
time and reads each step's tokens back at once. _PrefillView and _DecodeView are the cache views the model's
attention writes keys/values through (model.hidden_states(cache=...)). _onednn_linears routes a float32 CPU
model's matmuls through oneDNN with prepacked weights while it generates. _cache_dtype is the KV cache's dtype.
"""
from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT2
from ..tokenizer import GPT2Tokenizer
from .params import Completion, _Request
from .sampling import sample
from .seeds import uniform_for

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


class _EngineBase:
    """What both engines share: the waiting queue, finishing requests from their tokens, and prefill."""

    k: torch.Tensor  # (n_layer, slots, n_head, cache length, head_dim)
    v: torch.Tensor
    history: torch.Tensor | None  # (slots, cache length) token ids, for the repetition penalty

    def __init__(self, model: GPT2, tok: GPT2Tokenizer, requests: list[_Request]):
        self.model, self.tok = model, tok
        self.waiting = deque(requests)

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

    def usable_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.size(-1) > self.tok.vocab_size:
            # A model with more rows than the tokenizer has tokens (a resized embedding, e.g. an added pad token)
            # must never pick an id the tokenizer cannot decode, sampling or greedy.
            logits[:, self.tok.vocab_size :] = -math.inf
        return logits

    def prefill_chunks(self, admitted: list[_Request]) -> list[list[list[_Request]]]:
        """The admitted requests as prefill forwards: a prompt's completions share one (a group), and prompts of
        similar lengths share a forward of at most PREFILL_TOKENS(_CPU) padded tokens."""
        groups: dict[int, list[_Request]] = {}
        for r in admitted:
            groups.setdefault(r.prompt, []).append(r)
        budget = PREFILL_TOKENS_CPU if self.k.device.type == "cpu" else PREFILL_TOKENS
        return _prefill_chunks(sorted(groups.values(), key=lambda g: len(g[0].ids), reverse=True), budget)

    def prefill(self, chunk: list[list[_Request]], rows: slice | torch.Tensor) -> torch.Tensor:
        """Fill cache rows `rows` (one per request, in the chunk's order) with the chunk's prompts (each prompt once
        per completion); returns the hidden state (prompts, n_embd) of each prompt's last token."""
        device = self.k.device
        lengths = [len(group[0].ids) for group in chunk]
        # Right padding (with the prompt's first token, which keeps it harmless in the repetition history):
        # causal attention never lets a real token see the padding after it.
        width = max(lengths)
        idx = torch.tensor([g[0].ids + g[0].ids[:1] * (width - len(g[0].ids)) for g in chunk], device=device)
        source_row = None
        if sum(map(len, chunk)) > len(chunk):
            source_row = torch.tensor([row for row, group in enumerate(chunk) for _ in group], device=device)
        hidden = self.model.hidden_states(idx, cache=_PrefillView(self, rows, source_row))
        if self.history is not None:
            self.history[rows] = idx[source_row, :1] if source_row is not None else idx[:, :1]
            self.history[rows, :width] = idx[source_row] if source_row is not None else idx
        return hidden[torch.arange(len(chunk), device=device), torch.tensor(lengths, device=device) - 1]


class _Engine(_EngineBase):
    """Step-by-step decoding (the CPU default): runs the requests through `slots` cache rows, active requests always
    in rows [0, len(active)); each step decodes those rows only and reads their tokens back at once."""

    def __init__(self, model: GPT2, tok: GPT2Tokenizer, requests: list[_Request], slots: int):
        super().__init__(model, tok, requests)
        self.active: list[_Request] = []
        self.slots = slots
        cfg = model.config
        max_len = min(cfg.block_size, max(len(r.ids) + r.params.max_new_tokens for r in requests))
        weight = model.transformer.wte.weight
        shape = (cfg.n_layer, self.slots, cfg.n_head, max_len, cfg.head_dim)
        # Zeroed, because masked-out attention still multiplies the values by 0, and garbage may be NaN.
        self.k = torch.zeros(shape, dtype=_cache_dtype(model), device=weight.device)
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
        chunks = self.prefill_chunks(admitted)
        first = len(self.active)
        hidden = []
        for chunk in chunks:
            requests = [r for group in chunk for r in group]
            hidden.append(self.prefill(chunk, slice(len(self.active), len(self.active) + len(requests))))
            self.active.extend(requests)
        last_hidden = torch.cat(hidden)
        # One output projection for all the prompts; each completion samples from its prompt's logits.
        completions = torch.tensor([len(group) for chunk in chunks for group in chunk], device=self.k.device)
        logits = self.model.logits(last_hidden).repeat_interleave(completions, dim=0)
        requests = self.active[first:]
        history = None
        if self.history is not None:
            history = self.history[first : len(self.active), : max(len(r.ids) for r in requests)]
        self.record(requests, self.next_tokens(logits, requests, history))
        self.retire_finished()

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
        logits = self.usable_logits(logits)
        uniforms = [0.0 if r.params.temperature == 0 else uniform_for(r.seed, len(r.out)) for r in requests]
        return sample(logits, [r.params for r in requests], uniforms, history).tolist()

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

    def __init__(self, engine: _EngineBase, rows: slice | torch.Tensor, source_row: torch.Tensor | None):
        self.engine, self.rows, self.source_row = engine, rows, source_row

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        self.engine.k[layer, self.rows, :, :T] = k if self.source_row is None else k[self.source_row]
        self.engine.v[layer, self.rows, :, :T] = v if self.source_row is None else v[self.source_row]
        return k, v


class _DecodeView:
    """Stores one new key/value per row at that row's position and attends over each row's own prefix."""

    def __init__(self, engine: _EngineBase, n: int, pos: torch.Tensor, width: int):
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


def _cache_dtype(model: GPT2) -> torch.dtype:
    """The KV cache's dtype: the model's, or on CUDA under autocast the autocast dtype (what k and v come in)."""
    device = model.device
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return model.transformer.wte.weight.dtype


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
