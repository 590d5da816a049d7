"""The slot engine (the CUDA default; on any device with generate(sync_every=k)): all slots step together with
static shapes and sampling on the device, the host reads tokens back every `sync_every` steps, and on CUDA each
decode step of a (width, sampling plan) is captured once as a CUDA graph and replayed (_SlotEngine), the graphs'
warm-ups and captures running on one side stream per device (_side_stream)."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch

from ..model import GPT2
from ..tokenizer import GPT2Tokenizer
from .engine import _cache_dtype, _DecodeView, _EngineBase
from .params import Completion, _Request
from .sampling import _Plan, _row_top_k, _row_top_p, _sample_rows
from .seeds import _int64, uniforms_for

# The package's logger name (what callers listen on, e.g. bench/model_vs_hf.py), not this module's.
log = logging.getLogger("gpt2core.generation")

# Decode attention runs over the cache's first `width` positions, width a multiple of this (masked per row): every
# width is one shape, hence one CUDA graph; a multiple of 8 keeps the fused attention kernels' alignment.
WIDTH_BUCKET = 128
# CUDA graphs one generate() call captures at most (one per width and sampling plan; later ones run eagerly).
MAX_CUDA_GRAPHS = 32


class _SlotEngine(_EngineBase):
    """Decoding with static shapes, sampling on the device and the host reading tokens back every `sync_every`
    steps (the CUDA default; on any device with generate(sync_every=k)).

    Every step runs all `slots` slots: a slot's state lives on the device (its last token, the cache position that
    token goes to, how many tokens it has drawn, its seed and sampling parameters), so a step needs nothing from
    the host and a CUDA graph can replay it. Slots are not compacted: a finished completion's slot keeps stepping
    on garbage (finite, masked from nobody but itself, its tokens never read) until a waiting prompt is prefilled
    into it, which rewrites all of its state. Per round: admit waiting prompts into free slots (eager prefill, first
    tokens sampled on the device), run k = min(sync_every, most tokens any active completion still needs) steps,
    copy the (slots, k + 1) tokens to the host once, and record them one by one per completion up to where it
    finishes, exactly as step-by-step decoding would; what a completion drew after that is dropped.
    """

    def __init__(self, model: GPT2, tok: GPT2Tokenizer, requests: list[_Request], slots: int, sync_every: int,
                 cuda_graphs: bool | None):
        super().__init__(model, tok, requests)
        cfg = model.config
        device = model.device
        self.slots, self.sync_every = slots, sync_every
        self.max_len = min(cfg.block_size, max(len(r.ids) + r.params.max_new_tokens for r in requests))
        # Columns up to the next multiple of WIDTH_BUCKET, so every attention width is a whole bucket; positions
        # stay below max_len (<= block_size), the columns past it are never written by a live completion.
        cols = _round_up(self.max_len, WIDTH_BUCKET)
        shape = (cfg.n_layer, slots, cfg.n_head, cols, cfg.head_dim)
        # Zeroed, because masked-out attention still multiplies the values by 0, and garbage may be NaN.
        self.k = torch.zeros(shape, dtype=_cache_dtype(model), device=device)
        self.v = torch.zeros_like(self.k)
        long: dict[str, Any] = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(slots, **long)  # each slot's last token, the next step's input
        self.pos = torch.zeros(slots, **long)  # the cache column that token goes to (= tokens cached before it)
        self.drawn = torch.zeros(slots, **long)  # tokens the slot's completion has drawn: its next uniform's step
        self.seeds = torch.zeros(slots, **long)  # the completion's seed as int64 bits (uniforms_for)
        # Sampling parameters, as sample() derives them per row (a freed slot keeps its last ones: any valid row).
        self.temperature = torch.ones(slots, dtype=torch.float32, device=device)
        self.top_k = torch.ones(slots, **long)
        self.top_p = torch.full((slots,), math.inf, dtype=torch.float32, device=device)
        self.penalty = torch.ones(slots, dtype=torch.float32, device=device)
        self.sampled = torch.zeros(slots, dtype=torch.float64, device=device)  # 0 for greedy rows: uniform 0
        self.history = None
        if any(r.params.repetition_penalty != 1 for r in requests):
            self.history = torch.zeros((slots, cols), **long)
        self.chunk = torch.zeros((slots, sync_every + 1), **long)  # column 0: tokens before the round's steps
        self.rows: list[_Request | None] = [None] * slots
        self.free = list(range(slots))
        self.fresh: set[int] = set()  # slots whose first token (sampled at prefill) is not recorded yet
        self.graphs: dict[tuple[int, _Plan], Any] = {}
        self.pool: Any = None
        self.graph_failure: str | None = None
        self.required = cuda_graphs is True
        self.use_graphs = device.type == "cuda" and cuda_graphs is not False
        if self.use_graphs and torch.is_autocast_enabled("cuda"):
            self.use_graphs = False
            self.graph_failure = "autocast is on"
            if self.required:
                raise ValueError("cuda_graphs=True cannot capture under autocast; pass a bfloat16 model instead")
        self.steps = self.rounds = self.eager_steps = 0

    def run(self) -> None:
        device = self.k.device
        # Graph replays and side streams act on the current CUDA device: make it the model's.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.run_rounds()
        log.info("generated on %s: %d slots, %d steps in %d rounds (tokens read back every %d steps); %s",
                 device, self.slots, self.steps, self.rounds, self.sync_every, self.describe_graphs())

    def run_rounds(self) -> None:
        while self.waiting or len(self.free) < self.slots:
            if self.waiting and self.free:
                self.admit()
            active = [s for s, r in enumerate(self.rows) if r is not None]
            steps = min(self.sync_every, max(self.remaining(s) for s in active))
            self.chunk[:, 0].copy_(self.tokens)
            if steps:
                # Step j reads the cache up to column pos + j - 1, so the width must exceed pos + steps - 1.
                width = min(_round_up(max(self.position(s) for s in active) + steps, WIDTH_BUCKET), self.k.size(3))
                params = [self.request(s).params for s in active]
                plan = _Plan.of([_row_top_k(p) for p in params], [_row_top_p(p) for p in params],
                                self.model.config.vocab_size)
                for j in range(1, steps + 1):
                    self.step(width, plan)
                    self.chunk[:, j].copy_(self.tokens)
            self.rounds += 1
            self.steps += steps
            self.record_round(active, self.chunk[:, : steps + 1].tolist())  # the host waits for the device here

    def describe_graphs(self) -> str:
        if self.graphs:
            return (f"{len(self.graphs)} CUDA graphs replayed, {self.eager_steps} steps eager"
                    + (f" (capture failed: {self.graph_failure})" if self.graph_failure else ""))
        return "eager steps" + (f" (no CUDA graphs: {self.graph_failure})" if self.graph_failure else "")

    def request(self, slot: int) -> _Request:
        r = self.rows[slot]
        assert r is not None, f"slot {slot} is free"
        return r

    def drawn_count(self, slot: int) -> int:
        """Tokens the slot's completion has drawn so far, as the host knows at a round's start."""
        return len(self.request(slot).out) + (slot in self.fresh)

    def remaining(self, slot: int) -> int:
        return self.request(slot).params.max_new_tokens - self.drawn_count(slot)

    def position(self, slot: int) -> int:
        """The cache column the slot's last token goes to at the next step."""
        return len(self.request(slot).ids) + self.drawn_count(slot) - 1

    def admit(self) -> None:
        """Prefill waiting requests into free slots (lowest first), set their slots' state and sample their first
        tokens on the device (left in self.tokens; recorded with the round)."""
        count = min(len(self.free), len(self.waiting))
        self.free.sort()
        slots, self.free = self.free[:count], self.free[count:]
        chunks = self.prefill_chunks([self.waiting.popleft() for _ in range(count)])
        requests = [r for chunk in chunks for group in chunk for r in group]
        device = self.k.device
        index = torch.tensor(slots, device=device)
        hidden, start = [], 0
        for chunk in chunks:
            n = sum(map(len, chunk))
            hidden.append(self.prefill(chunk, index[start : start + n]))
            start += n
        completions = torch.tensor([len(group) for chunk in chunks for group in chunk], device=device)
        logits = self.usable_logits(self.model.logits(torch.cat(hidden)).repeat_interleave(completions, dim=0))
        params = [r.params for r in requests]
        self.temperature[index] = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        self.top_k[index] = torch.tensor([_row_top_k(p) for p in params], device=device)
        self.top_p[index] = torch.tensor([_row_top_p(p) for p in params], device=device)
        self.penalty[index] = torch.tensor([p.repetition_penalty for p in params], device=device)
        self.sampled[index] = torch.tensor([float(p.temperature > 0) for p in params], device=device,
                                           dtype=torch.float64)
        self.seeds[index] = torch.tensor([_int64(r.seed) for r in requests], device=device)
        self.drawn[index] = 0
        history = None
        if self.history is not None:
            history = self.history[index, : max(len(r.ids) for r in requests)]
        plan = _Plan.of([_row_top_k(p) for p in params], [_row_top_p(p) for p in params],
                        self.model.config.vocab_size)
        uniforms = uniforms_for(self.seeds[index], self.drawn[index]) * self.sampled[index]
        self.tokens[index] = _sample_rows(logits, plan, self.temperature[index], self.top_k[index],
                                          self.top_p[index], uniforms, self.penalty[index], history)
        self.pos[index] = torch.tensor([len(r.ids) for r in requests], device=device)
        self.drawn[index] = 1
        for slot, r in zip(slots, requests):
            self.rows[slot] = r
        self.fresh.update(slots)

    def step(self, width: int, plan: _Plan) -> None:
        """One decode step of every slot: by a CUDA graph of (width, plan) when there is one (captured on first
        use, after that use ran eagerly), else eagerly."""
        key = (width, plan)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if not self.use_graphs or len(self.graphs) >= MAX_CUDA_GRAPHS:
            self.eager_steps += 1
            self.decode(width, plan)
            return
        # The eager run is a real step and the warm-up a capture needs (lazy initialisations, cuBLAS workspaces),
        # on a side stream as PyTorch's graph recipe has it; capturing records kernels without running them, so
        # the state it leaves is this step's.
        device = self.k.device
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.decode(width, plan)
            self.eager_steps += 1
            graph = self.capture(width, plan)
        torch.cuda.current_stream(device).wait_stream(stream)
        if graph is not None:
            self.graphs[key] = graph

    def capture(self, width: int, plan: _Plan) -> Any:
        """A CUDA graph of one decode step at (width, plan), or None (and eager steps from now on) if capture fails.

        All graphs of this engine share one memory pool: each keeps nothing alive after its step (every result
        lands in the engine's static tensors), and they replay one at a time on one stream, so one graph's
        temporaries may reuse another's memory. (CUDAGraph.capture_begin directly rather than torch.cuda.graph,
        which empties the allocator's cache before every capture.)"""
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                self.decode(width, plan)
            finally:
                graph.capture_end()
        except Exception as exc:
            if self.required:
                raise
            self.use_graphs = False
            self.graph_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("CUDA graph capture failed (%s); decoding eagerly", self.graph_failure)
            return None
        return graph

    def decode(self, width: int, plan: _Plan) -> None:
        """One step of every slot, device tensors in and out (what a CUDA graph captures): write each slot's last
        token's key/value at its position, attend over columns [0, width) up to that position, sample the next token
        with the slot's uniform for its step, and advance. Positions stop at max_len - 1: only finished slots get
        there, and their tokens are never read."""
        view = _DecodeView(self, self.slots, self.pos, width)
        hidden = self.model.hidden_states(self.tokens[:, None], self.pos[:, None], cache=view)
        logits = self.usable_logits(self.model.logits(hidden[:, 0]))
        history = None
        if self.history is not None:
            self.history.scatter_(1, self.pos[:, None], self.tokens[:, None])
            history = self.history[:, :width]
        uniforms = uniforms_for(self.seeds, self.drawn) * self.sampled
        self.tokens.copy_(_sample_rows(logits, plan, self.temperature, self.top_k, self.top_p, uniforms,
                                       self.penalty, history))
        self.pos.add_(1).clamp_(max=self.max_len - 1)
        self.drawn.add_(1)

    def record_round(self, active: list[int], tokens: list[list[int]]) -> None:
        """Record each active slot's new tokens (column 0 only for a slot prefilled this round) up to where its
        completion finishes, and free the slots of finished completions."""
        eot = self.tok.eot_id
        for slot in active:
            r = self.request(slot)
            new = tokens[slot][0 if slot in self.fresh else 1 :]
            p = r.params
            if p.stop:  # stop strings need the text after every token
                for token in new:
                    self.record([r], [token])
                    if r.completion is not None:
                        break
            else:
                new = new[: p.max_new_tokens - len(r.out)]
                if not p.ignore_eos and eot in new:
                    new = new[: new.index(eot) + 1]
                r.out.extend(new)
                if r.out[-1] == eot and not p.ignore_eos:
                    r.completion = Completion(self.tok.decode(r.out[:-1]), r.out, "stop")
                elif len(r.out) == p.max_new_tokens:
                    r.completion = Completion(self.tok.decode(r.out), r.out, "length")
            if r.completion is not None:
                self.rows[slot] = None
                self.free.append(slot)
        self.fresh.clear()


_SIDE_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    """One stream per CUDA device for graph warm-ups and captures: the memory its steps' temporaries leave in the
    allocator's cache (which only that stream reuses) and its cuBLAS workspace serve every capture after."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
