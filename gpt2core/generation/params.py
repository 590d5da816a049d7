"""What generate() takes and returns: SamplingParams, Completion, GenerationResult, PromptTooLongError, and
_Request, the state of one completion while it is generated."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Sequence

FinishReason = Literal["stop", "length"]


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
    seed: int  # the completion's own seed, 0 <= seed < 2**64: its t-th token is drawn with uniform_for(seed, t)
    tail_tokens: int  # how many final tokens can hold the longest stop string
    out: list[int] = field(default_factory=list)
    completion: Completion | None = None

    @property
    def cached(self) -> int:
        """Tokens in this request's cache slot: the prompt and all generated tokens but the newest."""
        return len(self.ids) + len(self.out) - 1
