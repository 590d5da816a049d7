"""Typed job specifications: the one contract between the API and the workers.

The API validates every submission with these models and generates its OpenAPI document from them; the job's
resolved specification (every default filled in, seeds drawn) is what is stored, and workers read each job back
through :func:`job_spec` into the same types. Each default, limit and cross-field rule is written once, here.

Validation is strict: a JSON string is not an integer ("5" is refused for max_steps), unknown fields are refused.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from gpt2core.config import GPT2_VOCAB_SIZE  # torch-free: the tokenizer's vocabulary
from gpt2core.config import GPT2_LINEAR_MODULES, LORA_DEFAULT_TARGET_MODULES  # torch-free: LoRA's target names
from jobs.errors import InvalidInput
from jobs.models import ID_LENGTH, Job
from jobs.settings import KEEP_CHECKPOINTS_MAX, MAX_DEVICES

#: GPT-2's released shapes: the names of gpt2core.config.PRESETS (a test keeps them equal).
PresetName = Literal["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
#: The periodic hyperparameters, and what one larger than the run still does (the Trainer always evaluates and
#: checkpoints at the end of a run).
PERIODIC = {"eval_every": "only the final evaluation will run", "checkpoint_every": "only the final "
            "checkpoint will be written", "sample_every": "no samples will be drawn"}
MAX_SEED = 2**63 - 1
SUFFIX_MAX = 64  # as OpenAI's fine-tuning suffix
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16, description="Up to 16 key-value pairs: keys up to 64 characters, values up to 512."),
]
ResourceId = Annotated[str, Field(min_length=1, max_length=ID_LENGTH, pattern=r"^[A-Za-z0-9_-]+$")]
#: A registered model's id: a ResourceId with the model prefix.
ModelId = Annotated[str, Field(min_length=1, max_length=ID_LENGTH, pattern=r"^model-[A-Za-z0-9_-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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

    @property
    def name(self) -> str:
        """The base of the trained model's name, e.g. "gpt2-6x384"."""
        return f"gpt2-{self.n_layer}x{self.n_embd}"


def model_kind(value: Any) -> str:
    """A JSON object is a ModelShape, anything else a preset name: one branch, so errors name one field."""
    return "shape" if isinstance(value, (dict, ModelShape)) else "preset"


# The tags appear in validation error locations right after "model"; api.errors leaves them out of `param`.
MODEL_TAGS = ("preset", "shape")
ModelChoice = Annotated[
    Union[Annotated[PresetName, Tag("preset")],
          Annotated[ModelShape, Tag("shape")]],
    Discriminator(model_kind),
]


#: The hyperparameters that accept "auto" (resolved by the worker that first runs the job: jobs.auto).
AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate")
Auto = Literal["auto"]


class Hyperparameters(Strict):
    """Training hyperparameters; give max_steps or n_epochs (default: max_steps 1000). warmup_steps defaults to a
    tenth of the run's steps, at most 100. n_epochs, batch_size and learning_rate accept "auto": the worker that first
    runs the job resolves them (jobs.auto) and stores the values it used here, naming them in `auto`."""

    # not_both_lengths and accumulation_with_auto_batch, as JSON Schema says them (the OpenAPI document shows
    # them; the validators enforce them).
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"not": {"required": ["max_steps", "n_epochs"],
                 "properties": {"max_steps": {"type": "integer"}, "n_epochs": {"anyOf": [{"type": "number"},
                                                                                       {"const": "auto"}]}}}},
        {"not": {"required": ["batch_size", "grad_accum_steps"], "properties": {
            "batch_size": {"const": "auto"}, "grad_accum_steps": {"not": {"const": 1}}}}},
    ]})

    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    n_epochs: Annotated[float, Field(gt=0, le=1000)] | Auto | None = Field(
        default=None, description='Passes over the training data; "auto": from the dataset\'s size.')
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        default=8, description='Windows per micro-batch; "auto": a global batch from the dataset\'s size, split '
                               'into the largest micro-batch the device fits and grad_accum_steps.')
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)
    learning_rate: Annotated[float, Field(gt=0, le=1)] | Auto = Field(
        default=6e-4, description='Peak learning rate; "auto": by method and model size.')
    warmup_steps: int | None = Field(default=None, ge=0, le=1_000_000)
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    eval_every: int = Field(default=100, ge=0, le=1_000_000, description="Steps between evaluations; 0: never.")
    checkpoint_every: int = Field(default=500, ge=0, le=1_000_000, description="Steps between checkpoints; 0: "
                                  "only the final model.")
    sample_every: int = Field(default=0, ge=0, le=1_000_000, description="Steps between sample events; 0: never.")
    keep_checkpoints: int | None = Field(default=None, ge=1, le=KEEP_CHECKPOINTS_MAX, description="Checkpoints kept on disk: "
                                         "the last this many (the newest is the one the job resumes from) plus the "
                                         "one with the lowest validation loss. Default: the server's "
                                         "KEEP_CHECKPOINTS (3 unless configured), filled in at submission.")
    early_stopping_patience: int = Field(default=0, ge=0, le=10_000, description="Evaluations in a row without a "
                                         "lower validation loss before training stops; 0: never stops early.")
    select_model: Literal["last", "best"] = Field(default="last", description='The model the job registers: the '
                                                  'last step\'s, or "best": the checkpoint with the lowest '
                                                  'validation loss (one is written at every new best).')
    divergence_threshold: float = Field(default=2.0, ge=0, le=1000, json_schema_extra={
                                        "not": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                                        description="The divergence guard: the job "
                                        "fails (training_diverged) when the training loss stays above this many "
                                        "times its recent level for divergence_patience steps; 0: only a "
                                        "non-finite loss stops it.")
    divergence_patience: int = Field(default=5, ge=1, le=10_000)
    auto: SkipJsonSchema[list[Literal["n_epochs", "batch_size", "learning_rate"]]] = Field(
        default_factory=list, description='Set by the server: which of the values above were "auto" and were '
                                          "resolved by the worker.")

    @field_validator("auto")
    @classmethod
    def auto_is_the_servers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and (info.context or {}).get("submission"):
            raise ValueError('is set by the server; give "auto" as the value of n_epochs, batch_size or learning_rate')
        return value

    @field_validator("early_stopping_patience", "select_model")
    @classmethod
    def needs_evaluations(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (0, "last") and info.data.get("eval_every") == 0:
            raise ValueError("needs evaluations: set eval_every above 0 (and give a validation split)")
        return value

    @field_validator("grad_accum_steps")
    @classmethod
    def accumulation_with_auto_batch(cls, value: int, info: ValidationInfo) -> int:
        # At submission only: a stored job holds every field (the worker reads it back before resolving).
        if info.data.get("batch_size") == "auto" and value != 1 and (info.context or {}).get("submission"):
            raise ValueError('is chosen with batch_size "auto"; leave it out, or give batch_size a number')
        return value

    @field_validator("divergence_threshold")
    @classmethod
    def threshold_above_one(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("must be 0 (off) or greater than 1 (a multiple of the recent loss level)")
        return value

    @field_validator("n_epochs")
    @classmethod
    def not_both_lengths(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("max_steps") is not None:
            raise ValueError("give max_steps or n_epochs, not both")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def warmup_within_run(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_steps = info.data.get("max_steps")
        if value is not None and max_steps is not None and value > max_steps:
            raise ValueError(f"warmup_steps ({value}) must not exceed max_steps ({max_steps})")
        return value

    def beyond_run(self, steps: int, run: str, fields: Iterable[str]) -> list[str]:
        """Messages for the periodic `fields` whose period exceeds a run of `steps` steps (described as `run`)."""
        return [f"hyperparameters.{field} {getattr(self, field)} is more than {run}: {PERIODIC[field]}"
                for field in fields if getattr(self, field) > steps]

    @model_validator(mode="after")
    def default_length(self) -> "Hyperparameters":
        if self.max_steps is None and self.n_epochs is None:
            self.max_steps = 1000
        if self.warmup_steps is None and self.max_steps is not None:
            self.warmup_steps = min(100, self.max_steps // 10)  # a run in epochs: the worker's rule, once its
                                                                # length is known (workers.convert.train_config)
        return self


class Sampling(Strict):
    """How completions are drawn. temperature 0 is greedy decoding (top_k, top_p have no effect then)."""

    max_new_tokens: int = Field(default=64, ge=1, le=1024)
    temperature: float = Field(default=1.0, ge=0, le=5)
    top_k: int = Field(default=0, ge=0, le=GPT2_VOCAB_SIZE, description="0: no top-k cut.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=4)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Default: drawn at submission.")

    def merged(self, overrides: "Sampling") -> "Sampling":
        """These settings with the fields `overrides` sets explicitly (a generation file line's "sampling")."""
        return self.model_copy(update=overrides.model_dump(exclude_unset=True))

    def ignored(self) -> list[str]:
        """Explicit settings that cannot take effect, as messages (reported as warning events). temperature 0 and
        top_k 1 are both greedy decoding: the other sampling settings change nothing, and n > 1 repeats itself."""
        if self.temperature == 0:
            why, others = "temperature 0 is greedy decoding", ("top_k", "top_p")
        elif self.top_k == 1:
            why, others = "top_k 1 is greedy decoding", ("temperature", "top_p")
        else:
            return []
        found = [f"{why}: {field} {getattr(self, field)} has no effect" for field in others
                 if field in self.model_fields_set and getattr(self, field) != Sampling.model_fields[field].default]
        if self.n > 1:
            found.append(f"{why}: the n {self.n} completions of a prompt are identical")
        return found


def check_batch_split(hyper: Hyperparameters, devices: int) -> None:
    """ValueError unless a step's global batch (batch_size x grad_accum_steps windows) splits evenly across
    `devices` (a batch_size "auto" is chosen to split: jobs.auto)."""
    if isinstance(hyper.batch_size, int) and (hyper.batch_size * hyper.grad_accum_steps) % devices:
        windows = hyper.batch_size * hyper.grad_accum_steps
        raise ValueError(f"a step's global batch, hyperparameters.batch_size {hyper.batch_size} x grad_accum_steps "
                         f"{hyper.grad_accum_steps} = {windows} windows, does not split evenly across {devices} "
                         f"devices; give batch_size x grad_accum_steps a multiple of {devices}")


def trained_model_name(base_name: str, suffix: str | None, job_id: str) -> str:
    """"<base>:<suffix>", the suffix defaulting to the job id's first 8 hex digits."""
    return f"{base_name}:{suffix or job_id.removeprefix('job-')[:8]}"


class TrainSpec(Strict):
    type: Literal["train"]
    training_file: ResourceId = Field(description="A file id with purpose 'train'.")
    validation_file: ResourceId | None = None
    model: ModelChoice = "gpt2"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    devices: int = Field(default=1, ge=1, le=MAX_DEVICES, description="Devices the job trains on at once, "
                         "data-parallel (torch.distributed DDP): GPUs, or processes on a worker without a GPU. The "
                         "hyperparameters stay global: one step is batch_size x grad_accum_steps windows, split evenly "
                         "across the devices, so the loss curve is the same on any count. Only workers with at least "
                         "this many devices take the job.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Fixes the initial weights, the data "
                             "order and dropout. Default: drawn at submission.")
    suffix: str | None = Field(default=None, max_length=SUFFIX_MAX, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="The trained model is named '<base>:<suffix>'.")
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("devices")
    @classmethod
    def batch_splits_across_devices(cls, value: int, info: ValidationInfo) -> int:
        hyper = info.data.get("hyperparameters")
        if isinstance(hyper, Hyperparameters):
            check_batch_split(hyper, value)
        return value

    def model_name(self, base_name: str, job_id: str) -> str:
        """The name of the model this job registers: "<base>:<suffix>" (suffix default: the job id's first 8)."""
        return trained_model_name(base_name, self.suffix, job_id)


class FullMethod(Strict):
    """Full fine-tuning: every weight of the model is trained."""

    type: Literal["full"]  # required, as the discriminator of FinetuneMethod (the JSON Schema says so too)


class LoraMethod(Strict):
    """LoRA fine-tuning (low-rank adaptation, with Hugging Face peft): the model's weights stay frozen and small
    adapters on the target_modules Linear layers are trained, their update scaled by alpha / rank. The registered
    model has the adapters merged in: a plain GPT-2 checkpoint, like any other."""

    type: Literal["lora"]
    rank: int = Field(default=8, ge=1, le=256, description="The adapters' rank.")
    alpha: float = Field(default=16, gt=0, le=1024, description="The adapters' update is scaled by alpha / rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGET_MODULES), min_length=1, max_length=8,
        json_schema_extra={"items": {"type": "string", "enum": list(GPT2_LINEAR_MODULES)}, "uniqueItems": True,
                           "default": list(LORA_DEFAULT_TARGET_MODULES)},
        description="GPT-2's Linear layers to adapt: a bare name adapts that layer in every block ('c_proj': the "
                    "attention and MLP output projections), 'attn.c_proj' or 'mlp.c_proj' one of them. Default: "
                    "every Linear layer of every block.")

    @field_validator("target_modules")
    @classmethod
    def known_modules(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in GPT2_LINEAR_MODULES:
                raise ValueError(f"{name!r} is not a Linear layer of GPT-2; choose from {', '.join(GPT2_LINEAR_MODULES)}")
        covered: dict[str, str] = {}
        for name in value:  # a bare name covers that layer in the attention and the MLP
            for layer in [f"{part}.{name}" for part in ("attn", "mlp")] if "." not in name else [name]:
                if layer in covered:
                    raise ValueError(f"{name!r} and {covered[layer]!r} both name {layer}; give it once")
                covered[layer] = name
        return value


# The tags appear in validation error locations right after "method"; api.errors leaves them out of `param`.
METHOD_TAGS = ("full", "lora")
FinetuneMethod = Annotated[Union[FullMethod, LoraMethod], Field(discriminator="type")]


class FinetuneSpec(TrainSpec):
    type: Literal["finetune"]  # type: ignore[assignment]
    model: ModelId = Field(description="The id of a registered model (model-...).")  # type: ignore[assignment]
    method: FinetuneMethod = Field(default_factory=lambda: FullMethod(type="full"), description='How the model is fine-tuned: '
                                   '{"type": "full"} (every weight, the default) or {"type": "lora", ...}.')


class GenerateSpec(Strict):
    # one_source, as JSON Schema says it (the OpenAPI document shows it; the validator enforces it).
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompts"], "properties": {"prompts": {"type": "array"}}},
        {"required": ["input_file"], "properties": {"input_file": {"type": "string"}}}]})

    type: Literal["generate"]
    model: ModelId = Field(description="A registered model id (model-...).")
    prompts: list[str] | None = Field(default=None, min_length=1)
    input_file: ResourceId | None = Field(default=None, description="A file id with purpose 'generate' (or 'batch': "
                                          "OpenAI batch requests naming this model).",
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


class ResumeRequest(Strict):
    """What POST /v1/jobs/{id}/resume may change: the devices a paused training job continues on (the same global
    batch, split across the new count; it must split evenly)."""

    devices: int | None = Field(default=None, ge=1, le=MAX_DEVICES, description="Continue on this many devices "
                                "(default: as before). Training and fine-tuning jobs only.")


AnySpec = Union[TrainSpec, FinetuneSpec, GenerateSpec]
JobSpec = Annotated[AnySpec, Field(discriminator="type")]
JOB_SPEC: TypeAdapter[AnySpec] = TypeAdapter(JobSpec)
#: Stored outside `params`: the job row's reference columns and metadata.
REFERENCE_FIELDS = {"training_file": "training_file_id", "validation_file": "validation_file_id",
                    "input_file": "input_file_id"}


def draw_seed() -> int:
    return secrets.randbits(63)


def resolve(spec: AnySpec, *, keep_checkpoints: int | None = None) -> AnySpec:
    """The specification as it will run: seeds drawn now when not given, so a retried job repeats itself, and a
    training job's hyperparameters.keep_checkpoints set to `keep_checkpoints` (the server's KEEP_CHECKPOINTS)
    when not given."""
    if isinstance(spec, GenerateSpec):
        if spec.sampling.seed is not None:
            return spec
        return spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"seed": draw_seed()})})
    hyper = spec.hyperparameters
    if hyper.keep_checkpoints is None and keep_checkpoints is not None:
        spec = spec.model_copy(update={"hyperparameters": hyper.model_copy(update={"keep_checkpoints": keep_checkpoints})})
    return spec if spec.seed is not None else spec.model_copy(update={"seed": draw_seed()})


def stored_params(spec: AnySpec) -> dict[str, Any]:
    """What the job row keeps in `params` (references and metadata have columns of their own)."""
    return spec.model_dump(mode="json", exclude={"type", "metadata", *REFERENCE_FIELDS})


def job_spec(job: Job) -> AnySpec:
    """A stored job read back as its typed specification (the workers' only way to read parameters).

    Raises InvalidInput (param: the field) when a file the job needs is gone; deletes are refused while a job is
    unfinished, so only a job finished long ago can meet that."""
    data: dict[str, Any] = {"type": job.type, **job.params, "metadata": job.metadata_}
    for field, column in REFERENCE_FIELDS.items():
        if (value := getattr(job, column)) is not None:
            data[field] = value
        elif field == "training_file" and job.type in ("train", "finetune"):
            raise InvalidInput("The training file was deleted before the job ran.", param=field)
        elif field == "input_file" and job.type == "generate" and data.get("prompts") is None:
            raise InvalidInput("The input file was deleted before the job ran.", param=field)
    return JOB_SPEC.validate_python(data)
