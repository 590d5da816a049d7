"""Choosing the next token of each row from its logits: sample() (parameters and uniforms from the host) and
_sample_rows (the same on tensors, no host round trip, what a CUDA graph captures), with the per-row top-k / top-p
values (_row_top_k, _row_top_p), the sampling plan shared by a set of rows (_Plan) and the top-k / top-p
threshold (_threshold)."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .params import SamplingParams


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
    top_k, top_p = [_row_top_k(p) for p in params], [_row_top_p(p) for p in params]
    plan = _Plan.of(top_k, top_p, logits.size(-1))
    penalty = None
    if history is not None:
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
    return _sample_rows(
        logits,
        plan,
        torch.tensor([p.temperature or 1.0 for p in params], device=device),
        torch.tensor(top_k, device=device) if plan.threshold else None,
        torch.tensor(top_p, device=device) if plan.top_p else None,
        torch.tensor(uniforms, device=device, dtype=torch.float64),
        penalty,
        history,
    )


def _row_top_k(p: SamplingParams) -> int:
    return 1 if p.temperature == 0 else p.top_k  # greedy rows are top-1 rows


def _row_top_p(p: SamplingParams) -> float:
    return p.top_p if p.temperature > 0 and p.top_p < 1 else math.inf


class _Plan(NamedTuple):
    """Which steps sampling a set of rows takes (the same for all of them; each row's values then decide):
    top_k > 0 cuts every row to its top_k best tokens first (the most any row keeps), threshold masks the tokens
    below each row's top-k / top-p threshold, top_p computes the top-p part of it. A function of the rows'
    parameters only, known on the host, so a CUDA graph can be captured per plan."""

    top_k: int
    threshold: bool
    top_p: bool

    @classmethod
    def of(cls, top_k: list[int], top_p: list[float], vocab_size: int) -> "_Plan":
        """`top_k` and `top_p` per row as _row_top_k and _row_top_p give them (0 and inf: off)."""
        cut = max(top_k) if min(top_k) > 0 and max(top_k) < vocab_size else 0
        return cls(cut, max(top_k) > 0 or min(top_p) < 1, min(top_p) < 1)


def _sample_rows(
    logits: torch.Tensor,
    plan: _Plan,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    uniforms: torch.Tensor,
    penalty: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """sample() on tensors, with no host round trip (what a CUDA graph captures): logits (rows, vocab) of any
    dtype; per row, temperature (float32; 1 for greedy rows), top_k (int64; _row_top_k, 0 = off; read when
    plan.threshold), top_p (float32; _row_top_p, inf = off; read when plan.top_p), uniforms (float64 in [0, 1)),
    penalty (float32, with history (rows, T) int64 ids). Returns the chosen ids (rows,) int64."""
    logits = logits.float()
    if history is not None:
        assert penalty is not None
        seen = logits.gather(1, history)
        penalty = penalty[:, None]
        logits.scatter_(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    token_ids = None
    if plan.top_k:
        # Only the plan.top_k best tokens can be drawn: go on with those, put back in id order.
        logits, token_ids = logits.topk(plan.top_k, dim=-1)
        token_ids, order = token_ids.sort(dim=-1)
        logits = logits.gather(1, order)
    logits.div_(temperature[:, None])
    if plan.threshold:
        assert top_k is not None and (top_p is not None or not plan.top_p)
        logits.masked_fill_(logits < _threshold(logits, top_k, top_p if plan.top_p else None), -math.inf)
    # Unnormalised cumulative probabilities (the uniform is scaled by the total instead), summed in float64: a
    # float32 running sum over 50k tokens drifts by about one token's probability, and then a row's last-bit
    # differences between running alone and in a batch would move its draw to a neighbouring token.
    cdf = logits.sub_(logits.amax(-1, keepdim=True)).exp_().cumsum(-1, dtype=torch.float64)
    target = uniforms[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True)
    # u * total can round up to total; the cdf first reaches its maximum at the last token with mass.
    choice = torch.minimum(choice, cdf.argmax(-1, keepdim=True))
    return (choice if token_ids is None else token_ids.gather(1, choice))[:, 0]


def _threshold(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """The lowest logit (rows, 1) each row keeps under its top-k, then top-p (ties with it stay too, as in HF)."""
    ranked = logits.sort(dim=-1, descending=True).values
    width = ranked.size(-1)
    keep = torch.where(top_k > 0, top_k.clamp(max=width), width)
    if top_p is not None:
        # The most likely tokens stay until their mass reaches top_p; the first always stays.
        ranked = ranked.masked_fill(torch.arange(width, device=logits.device) >= keep[:, None], -math.inf)
        probs = torch.softmax(ranked, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        within_p = (mass_before < top_p[:, None]).sum(-1)
        # At least the most likely token, whatever top_p is (one below float32's smallest value reads as 0).
        keep = torch.minimum(keep, within_p.clamp(min=1))
    return ranked.gather(1, keep[:, None] - 1)
