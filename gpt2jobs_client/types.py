"""Typed views of the API's objects. Each keeps the full JSON object it was made from in `raw`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The statuses a job does not leave: it has finished.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: The statuses a job stays in until someone acts: the finished ones, and "paused" (not finished: `jobs.resume`
#: queues it again, and it continues from where it paused). What `jobs.wait()` and `jobs.stream()` stop at.
SETTLED_STATUSES = TERMINAL_STATUSES | {"paused"}


@dataclass(frozen=True)
class File:
    id: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    records: int | None
    tokens: int | None
    created_at: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> File:
        return cls(id=data["id"], purpose=data["purpose"], filename=data["filename"], bytes=data["bytes"],
                   sha256=data["sha256"], records=data.get("records"), tokens=data.get("tokens"),
                   created_at=data.get("created_at"), raw=data)


@dataclass(frozen=True)
class Job:
    id: str
    type: str
    status: str
    created_at: int | None
    started_at: int | None
    finished_at: int | None
    model: Any
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    metadata: dict[str, str]
    training_file: str | None = None
    validation_file: str | None = None
    input_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    seed: int | None = None
    suffix: str | None = None
    devices: int | None = None  # train and finetune jobs: the devices it trains on at once
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Job:
        return cls(id=data["id"], type=data["type"], status=data["status"], created_at=data.get("created_at"),
                   started_at=data.get("started_at"), finished_at=data.get("finished_at"), model=data.get("model"),
                   progress=data.get("progress") or {}, result=data.get("result"), error=data.get("error"),
                   attempts=data.get("attempts", 0), metadata=data.get("metadata") or {},
                   training_file=data.get("training_file"), validation_file=data.get("validation_file"),
                   input_file=data.get("input_file"), hyperparameters=data.get("hyperparameters"),
                   sampling=data.get("sampling"), seed=data.get("seed"), suffix=data.get("suffix"),
                   devices=data.get("devices"), raw=data)

    @property
    def is_terminal(self) -> bool:
        """Whether the job has finished (succeeded, failed or cancelled). A paused job has not: see is_settled."""
        return self.status in TERMINAL_STATUSES

    @property
    def is_paused(self) -> bool:
        """Whether the job is paused: it stays so until it is resumed (`jobs.resume`) or cancelled."""
        return self.status == "paused"

    @property
    def is_settled(self) -> bool:
        """Whether the job will not change by itself: it has finished, or it is paused."""
        return self.status in SETTLED_STATUSES

    @property
    def output_model(self) -> str | None:
        """The id of the model a succeeded train or finetune job produced."""
        return (self.result or {}).get("model")


@dataclass(frozen=True)
class Event:
    id: int
    created_at: int | None
    level: str
    type: str
    message: str
    data: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Event:
        return cls(id=data["id"], created_at=data.get("created_at"), level=data["level"], type=data["type"],
                   message=data["message"], data=data.get("data"), raw=data)


@dataclass(frozen=True)
class Checkpoint:
    """A training job's checkpoint. The val_* metrics are None unless the step was an evaluation step:
    val_perplexity is exp(val_loss) (None where that overflows), val_accuracy the share of validation tokens
    predicted exactly (0 to 1). Register it as a model with `jobs.register_checkpoint`."""

    id: Any
    step: int
    train_loss: float | None
    val_loss: float | None
    created_at: int | None
    bytes: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    val_perplexity: float | None = None
    val_accuracy: float | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(id=data["id"], step=data["step"], train_loss=data.get("train_loss"), val_loss=data.get("val_loss"),
                   created_at=data.get("created_at"), bytes=data.get("bytes"), raw=data,
                   val_perplexity=data.get("val_perplexity"), val_accuracy=data.get("val_accuracy"))


@dataclass(frozen=True)
class Model:
    """A model. `source`: "job" (what a train or finetune job produced), "import", or "checkpoint" (one of job_id's
    checkpoints, registered: `checkpoint_step` is its step; None for the other sources)."""

    id: str
    name: str
    source: str
    job_id: str | None
    config: dict[str, Any]
    parameter_count: int | None
    created_at: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    checkpoint_step: int | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Model:
        return cls(id=data["id"], name=data["name"], source=data["source"], job_id=data.get("job_id"),
                   config=data.get("config") or {}, parameter_count=data.get("parameter_count"),
                   created_at=data.get("created_at"), raw=data, checkpoint_step=data.get("checkpoint_step"))


@dataclass(frozen=True)
class GenerationResult:
    index: int
    custom_id: str | None
    prompt: str
    completions: list[dict[str, Any]]
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> GenerationResult:
        return cls(index=data["index"], custom_id=data.get("custom_id"), prompt=data["prompt"],
                   completions=data.get("completions") or [], usage=data.get("usage"), error=data.get("error"),
                   raw=data)

    @property
    def texts(self) -> list[str]:
        """The completions' texts."""
        return [c.get("text", "") for c in self.completions]


@dataclass(frozen=True)
class Deleted:
    id: str
    object: str
    deleted: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Deleted:
        return cls(id=data["id"], object=data["object"], deleted=data["deleted"], raw=data)
