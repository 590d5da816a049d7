"""When training stops early: the divergence guard (LossWatchdog) and early stopping on validation loss
(EarlyStopping). Both are small state machines the Trainer feeds, whose state is saved in every checkpoint so a
resumed run decides exactly as the uninterrupted one would.

The watchdog follows axolotl's loss watchdog (a training loss above a threshold for `patience` consecutive steps
stops the run), with the threshold relative to the run's own recent level instead of a fixed number of nats, so
one default serves a 124M model from scratch (loss ~11 falling to ~3) and a fine-tune starting at ~2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Weight of a new step's loss in the watchdog's recent level (an exponential moving average: about the last
#: 1 / LEVEL_WEIGHT = 10 healthy steps).
LEVEL_WEIGHT = 0.1
#: A loss counts as far above the recent level only when it is also this many nats above it, so a model whose
#: loss is near zero (a memorised file) is not stopped for going from 0.01 to 0.05.
MIN_EXCESS_NATS = 1.0


class TrainingDiverged(FloatingPointError):
    """Training broke down at optimizer step `step` (1-based): the loss was not finite, or stayed far above the
    run's recent level for `patience` consecutive steps. `first_bad_step` is where the streak began (no
    checkpoint was written from there on, except one a pause or shutdown asked for); `level` is the recent level
    in nats (None for a non-finite loss on the first step)."""

    def __init__(self, message: str, *, step: int, loss: float, level: float | None, first_bad_step: int):
        super().__init__(message)
        self.step, self.loss, self.level, self.first_bad_step = step, loss, level, first_bad_step


@dataclass
class LossWatchdog:
    """Flags steps whose training loss is above ``threshold`` times the recent level (and ``MIN_EXCESS_NATS``
    above it). An alarm starts at a flagged step and lasts until ``patience`` healthy steps in a row follow;
    ``patience`` flagged steps within one alarm raise TrainingDiverged, so a blow-up whose loss swings back
    below the threshold now and then is still caught. ``threshold`` 0 turns the relative check off; a
    non-finite loss always raises at once.

    The recent level is an exponential moving average of the unflagged losses (weight LEVEL_WEIGHT), started at
    the first step's loss, so a blow-up never drags its own reference up. A single spike is forgiven once
    ``patience`` healthy steps follow; until then (``alarmed``) the Trainer writes no periodic checkpoint.
    """

    threshold: float = 2.0
    patience: int = 5
    level: float | None = None
    streak: int = 0  # flagged steps in the current alarm
    streak_start: int | None = None  # the alarm's first flagged step
    calm: int = 0  # healthy steps in a row since the alarm's last flagged step

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)) or not (
            self.threshold == 0 or self.threshold > 1
        ):
            raise ValueError(f"LossWatchdog.threshold must be 0 (off) or a number > 1, got {self.threshold!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"LossWatchdog.patience must be a positive integer, got {self.patience!r}")

    @property
    def alarmed(self) -> bool:
        """Whether an alarm is on: a flagged step not yet followed by ``patience`` healthy ones (a checkpoint now
        could hold a broken model)."""
        return self.streak > 0

    def observe(self, step: int, loss: float) -> None:
        """Feed the loss of optimizer step `step`; raises TrainingDiverged when the run has broken down."""
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss is {loss} at step {step}", step=step, loss=loss,
                                   level=self.level, first_bad_step=self.streak_start or step)
        if self.level is None:
            self.level = loss
            return
        if self.threshold and loss > self.threshold * self.level and loss > self.level + MIN_EXCESS_NATS:
            if self.streak == 0:
                self.streak_start = step
            self.streak += 1
            self.calm = 0
            if self.streak >= self.patience:
                raise TrainingDiverged(
                    f"the training loss was {loss:.2f} at step {step}, and above {self.threshold:g} times its "
                    f"recent level ({self.level:.2f}) at {self.streak} of the {step - (self.streak_start or step) + 1} "
                    f"steps since step {self.streak_start}",
                    step=step, loss=loss, level=self.level, first_bad_step=self.streak_start or step)
            return
        if self.streak:
            self.calm += 1
            if self.calm >= self.patience:
                self.streak, self.streak_start, self.calm = 0, None, 0
        self.level += LEVEL_WEIGHT * (loss - self.level)

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "streak": self.streak, "streak_start": self.streak_start, "calm": self.calm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level, self.streak, self.streak_start = state["level"], state["streak"], state["streak_start"]
        self.calm = state.get("calm", 0)


@dataclass
class EarlyStopping:
    """Tracks the best validation loss and stops after ``patience`` evaluations in a row without a lower one
    (``patience`` 0: never stops, but still tracks the best). An improvement is a loss strictly below the best
    by more than ``min_delta`` nats."""

    patience: int = 0
    min_delta: float = 0.0
    best_loss: float | None = None
    best_step: int | None = None
    evaluations_since_best: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"EarlyStopping.patience must be an integer >= 0, got {self.patience!r}")
        if not (isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta)) or self.min_delta < 0:
            raise ValueError(f"EarlyStopping.min_delta must be a number >= 0, got {self.min_delta!r}")

    def observe(self, step: int, val_loss: float) -> bool:
        """Feed an evaluation; True when it is the new best."""
        if math.isfinite(val_loss) and (self.best_loss is None or val_loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_step, self.evaluations_since_best = val_loss, step, 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evaluations_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "evaluations_since_best": self.evaluations_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evaluations_since_best = state["evaluations_since_best"]
