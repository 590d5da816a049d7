"""What the Trainer reports: per-step metrics, samples, evaluations, the result of a run, and the callback hooks
that receive them (``TrainerCallback``; any object with some of these methods works as a callback)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class StepMetrics:
    step: int  # optimizer steps completed, this one included (1 for the first step)
    loss: float  # mean training loss per counted target over the step's micro-batches (nats; 0.0 if none)
    learning_rate: float
    grad_norm: float  # total gradient norm before clipping
    tokens_per_second: float
    elapsed: float  # seconds since fit() started
    tokens: int  # training tokens seen since step 0 (resumes included)
    step_time: float  # seconds this step took


@dataclass
class Sample:
    prompt: str
    text: str  # the completion, without the prompt


@dataclass(frozen=True)
class EvalResult:
    """One evaluation (``Trainer.evaluate``), over the counted targets of the validation windows (prompt tokens
    are not targets): the mean loss (nats per target), token accuracy (the fraction of targets that are their
    position's argmax prediction, in [0, 1]) and the number of targets counted."""

    loss: float
    accuracy: float
    tokens: int


@dataclass
class TrainResult:
    steps: int  # the trainer's step count when fit() returned
    stopped: bool  # True when a callback's should_stop() ended training before max_steps
    final_loss: float | None  # training loss of the last step
    val_loss: float | None  # last evaluation's loss, if any
    perplexity: float | None
    losses: list[float] = field(default_factory=list)  # per-step training losses of this fit() call
    checkpoint: Path | None = None  # last checkpoint written (or resumed from)
    elapsed: float = 0.0
    tokens: int = 0
    # Why training ended: "max_steps", "early_stopping" (validation loss stopped improving) or "stopped" (a
    # callback asked: a cancel, pause or shutdown).
    stop_reason: str = "max_steps"
    best_step: int | None = None  # the evaluation step with the lowest validation loss, over the whole run
    best_val_loss: float | None = None


class TrainerCallback:
    """Base class with no-op hooks; any object with some of these methods works as a callback."""

    def on_step(self, metrics: StepMetrics) -> None:
        pass

    def on_eval(self, step: int, val_loss: float, perplexity: float, accuracy: float | None) -> None:
        """An evaluation at optimizer step `step`: mean validation loss (nats per target), its perplexity, and
        token accuracy (share of targets predicted exactly by argmax)."""

    def on_sample(self, step: int, samples: list[Sample]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, train_loss: float | None, val_loss: float | None) -> None:
        pass

    def should_stop(self) -> bool:
        return False
