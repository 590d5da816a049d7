"""What a training run needs, written down so that any process can start it without the database: the model it
starts from (ModelSource) and, for a run on several devices, the whole launch (TrainingLaunch) that the worker
writes for its training processes (workers.distributed starts them, workers.rank is their entry point).

A ModelSource builds the same weights in every process: a new model from its config and the job's seed, or a
registered model's files; for LoRA, that model wrapped with adapters drawn from the job's seed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt2core import GPT2, GPT2Config, TrainConfig
from gpt2core.data import PreparedDataset, load_dataset


@dataclass(frozen=True)
class ModelSource:
    """`config` (GPT2Config.to_dict()) for a model trained from scratch, or `pretrained`, a registered model's
    folder; `lora` (gpt2core.lora.LoraSettings.to_dict()) to wrap it with adapters. `seed` draws the new weights
    or the adapters."""

    seed: int
    config: dict[str, Any] | None = None
    pretrained: str | None = None
    lora: dict[str, Any] | None = None

    def build(self) -> GPT2:
        """The model (a peft PeftModel that forwards GPT2's attributes, for LoRA)."""
        if self.pretrained is not None:
            model = GPT2.from_pretrained(self.pretrained)
        else:
            assert self.config is not None
            from .convert import new_model

            model = new_model(GPT2Config.from_dict(self.config), self.seed)
        if self.lora is None:
            return model
        from gpt2core.lora import LoraSettings, apply_lora  # peft (and transformers) only for LoRA jobs

        return apply_lora(model, LoraSettings.from_dict(self.lora), seed=self.seed)  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainingLaunch:
    """One run of job `job_id` on `devices` processes: the model, the Trainer's config (TrainConfig.to_dict()),
    the prepared training data (`train_dir`, its "train" split) and validation data (`val_dir`'s `val_split`, or
    none), and what the server's paths are called for the user (`user_paths`, for error messages)."""

    job_id: str
    devices: int
    model: ModelSource
    config: dict[str, Any]
    train_dir: str
    val_dir: str | None = None
    val_split: str = "val"
    user_paths: dict[str, str] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "TrainingLaunch":
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "model": ModelSource(**data["model"])})

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.config)

    def data(self) -> tuple[PreparedDataset, Any, Any]:
        """(the training dataset, the validation tokens, their loss mask): tokens None when there is none."""
        dataset = load_dataset(self.train_dir)
        if self.val_dir is None:
            return dataset, None, None
        source = dataset if self.val_dir == self.train_dir else load_dataset(self.val_dir)
        if self.val_split == "train":
            return dataset, source.train, source.train_mask
        return dataset, source.val, source.val_mask
