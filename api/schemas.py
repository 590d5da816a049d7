"""Request bodies. Each pydantic model both validates a request and describes it in the OpenAPI document."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
Metadata = Annotated[dict[str, str], Field(max_length=16, description="Up to 16 string key-value pairs.")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(Strict):
    """A GPT-2 trained from scratch with this shape (vocabulary: GPT-2's 50,257 tokens)."""

    n_layer: int = Field(ge=1, le=48)
    n_head: int = Field(ge=1, le=64)
    n_embd: int = Field(ge=8, le=2048)
    block_size: int = Field(default=1024, ge=8, le=1024)

    @model_validator(mode="after")
    def heads_divide_width(self) -> "ModelShape":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


def model_kind(value: Any) -> str:
    """A JSON object is a ModelShape, anything else a preset name: one branch, so errors name one field."""
    return "shape" if isinstance(value, (dict, ModelShape)) else "preset"


# The tags appear in validation error locations right after "model"; api.errors leaves them out of `param`.
MODEL_TAGS = ("preset", "shape")
ModelChoice = Annotated[
    Union[Annotated[Literal["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"], Tag("preset")],
          Annotated[ModelShape, Tag("shape")]],
    Discriminator(model_kind),
]


class Hyperparameters(Strict):
    """Training hyperparameters; give max_steps or n_epochs (default: max_steps 1000). warmup_steps defaults to a
    tenth of max_steps, at most 100."""

    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    n_epochs: float | None = Field(default=None, gt=0, le=1000)
    batch_size: int = Field(default=8, ge=1, le=1024)
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)
    learning_rate: float = Field(default=6e-4, gt=0, le=1)
    warmup_steps: int | None = Field(default=None, ge=0, le=1_000_000)
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    eval_every: int = Field(default=100, ge=0, le=1_000_000)
    checkpoint_every: int = Field(default=500, ge=0, le=1_000_000)
    sample_every: int = Field(default=0, ge=0, le=1_000_000)

    @field_validator("n_epochs")
    @classmethod
    def not_both_lengths(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("max_steps") is not None:
            raise ValueError("give max_steps or n_epochs, not both")
        return value

    @model_validator(mode="after")
    def default_length(self) -> "Hyperparameters":
        if self.max_steps is None and self.n_epochs is None:
            self.max_steps = 1000
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.max_steps // 10) if self.max_steps is not None else 100
        return self


class TrainJobRequest(Strict):
    type: Literal["train"]
    training_file: str = Field(description="A file id with purpose 'train'.")
    validation_file: str | None = None
    model: ModelChoice = "gpt2"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Default: drawn at submission.")
    suffix: str | None = Field(default=None, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    metadata: Metadata = Field(default_factory=dict)


class FinetuneJobRequest(TrainJobRequest):
    type: Literal["finetune"]  # type: ignore[assignment]
    model: str = Field(description="The id of a registered model (model-...).")  # type: ignore[assignment]

    @field_validator("model")
    @classmethod
    def model_id(cls, value: str) -> str:
        if not value.startswith("model-"):
            raise ValueError("must be a model id (model-...)")
        return value


class Sampling(Strict):
    max_new_tokens: int = Field(default=64, ge=1, le=1024)
    temperature: float = Field(default=1.0, ge=0, le=5)
    top_k: int = Field(default=0, ge=0, le=50257)
    top_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=4)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Default: drawn at submission.")


class GenerateJobRequest(Strict):
    type: Literal["generate"]
    model: str = Field(description="A registered model id (model-...).")
    prompts: list[str] | None = Field(default=None, min_length=1)
    input_file: str | None = Field(default=None, description="A file id with purpose 'generate'.",
                                   validate_default=True)
    sampling: Sampling = Field(default_factory=Sampling)
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("input_file")
    @classmethod
    def one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator (not a model validator) so the error's param names a field; skipped when prompts
        # itself was invalid (that error is reported instead).
        if "prompts" in info.data and (info.data["prompts"] is None) == (value is None):
            raise ValueError("give exactly one of prompts or input_file")
        return value


JobRequest = Annotated[
    Union[TrainJobRequest, FinetuneJobRequest, GenerateJobRequest], Field(discriminator="type")
]
FILE_PURPOSES = ("train", "generate")
ID_PATTERN = re.compile(r"^[a-z]+-[A-Za-z0-9]+$")
