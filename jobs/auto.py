""""auto" hyperparameters: the rules that turn n_epochs, batch_size and learning_rate "auto" into numbers.

The worker that first runs a job resolves them (it knows the dataset's size, the model and its device), stores
the values in the job's hyperparameters with their names in `auto`, and every later attempt (a resume) reads the
stored numbers, so a job always says what ran and a resumed run repeats itself.

- n_epochs: OpenAI's rule for fine-tuning (the "data preparation and analysis for chat model fine-tuning" cookbook):
  3 epochs, raised so that a small dataset gives at least 100 example passes (at most 25 epochs), lowered so that a
  large one gives at most 25,000 (at least 1 epoch).
- batch_size: the global batch (windows per optimizer step) is OpenAI's default, about 0.2% of the examples,
  rounded to a power of two, between 1 and 256; it is split into the largest micro-batch the worker's device fits
  (on CUDA probed with a real forward and backward pass; on CPU at most CPU_MICRO_BATCH_TOKENS tokens) times
  grad_accum_steps. On several devices each device takes an equal share of the global batch (rounded up to split
  evenly): batch_size is then the micro-batch one device fits, and grad_accum_steps counts the micro-batches of
  all devices (the Trainer's split, gpt2core.distributed.split_global_batch, gives each device that micro-batch).
- learning_rate: the peak rate GPT-3 (Brown et al. 2020, table 2.1) trained each model size with, interpolated
  in log parameters (models under 125M parameters get up to 1e-3, as nanoGPT's small models); a full fine-tune
  uses a tenth of it, a LoRA fine-tune a third (LoRA's adapters start at zero and learn faster at higher rates;
  Hu et al. 2021 used 2e-4 for GPT-2 medium).

An "example" is a line of a JSONL training file, or a block_size window of a plain-text one.
"""
from __future__ import annotations

import math
from typing import Literal

from jobs.specs import Hyperparameters

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
BATCH_FRACTION = 0.002
MAX_AUTO_BATCH = 256
#: The CPU rule for the micro-batch: at most this many tokens (batch windows x block_size) per forward pass.
CPU_MICRO_BATCH_TOKENS = 8192
#: (parameters, peak learning rate) from GPT-3's table 2.1, with a small-model point as nanoGPT uses.
PRETRAINING_RATES = ((10e6, 1e-3), (125e6, 6e-4), (350e6, 3e-4), (760e6, 2.5e-4), (1.3e9, 2e-4), (2.7e9, 1.6e-4))
Method = Literal["train", "full", "lora"]
METHOD_FACTORS: dict[str, float] = {"train": 1.0, "full": 0.1, "lora": 1 / 3}


def auto_epochs(examples: int) -> int:
    """Epochs for a dataset of `examples` examples (OpenAI's rule, above)."""
    examples = max(examples, 1)
    if examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / examples))
    if examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // examples)
    return TARGET_EPOCHS


def auto_global_batch(examples: int) -> int:
    """Windows per optimizer step: 0.2% of the examples as a power of two (nearest in log scale), 1 to 256."""
    wanted = max(examples * BATCH_FRACTION, 1.0)
    return int(min(MAX_AUTO_BATCH, 2 ** round(math.log2(wanted))))


def cpu_micro_batch_limit(block_size: int) -> int:
    """The CPU rule: the most windows of `block_size` tokens in one micro-batch."""
    return max(1, CPU_MICRO_BATCH_TOKENS // block_size)


def split_batch(global_batch: int, max_micro_batch: int) -> tuple[int, int]:
    """(micro-batch, grad_accum_steps) whose product is `global_batch`: the largest micro-batch that divides it
    and is at most `max_micro_batch`."""
    micro = max(d for d in range(1, min(global_batch, max(max_micro_batch, 1)) + 1) if global_batch % d == 0)
    return micro, global_batch // micro


def auto_learning_rate(parameters: int, method: Method) -> float:
    """The peak learning rate for a model of `parameters` parameters trained by `method` (rule above), to 2
    significant digits."""
    points = PRETRAINING_RATES
    x = math.log(max(parameters, 1))
    if x <= math.log(points[0][0]):
        rate = points[0][1]
    elif x >= math.log(points[-1][0]):
        rate = points[-1][1]
    else:
        for (n0, r0), (n1, r1) in zip(points, points[1:]):
            if x <= math.log(n1):
                t = (x - math.log(n0)) / (math.log(n1) - math.log(n0))
                rate = math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
                break
    rate *= METHOD_FACTORS[method]
    return float(f"{rate:.2g}")


def resolve_auto(hyper: Hyperparameters, *, examples: int, parameters: int, method: Method,
                 max_micro_batch: int, devices: int = 1) -> Hyperparameters:
    """`hyper` with its "auto" values resolved and named in `auto` (unchanged when none is "auto"); the batch for
    a job on `devices` devices, `max_micro_batch` being what one of them fits."""
    update: dict[str, object] = {}
    if hyper.n_epochs == "auto":
        update["n_epochs"] = float(auto_epochs(examples))
    if hyper.batch_size == "auto":
        per_device = -(-auto_global_batch(examples) // devices)  # rounded up: every device takes an equal share
        micro, accumulation = split_batch(per_device, max_micro_batch)
        update["batch_size"], update["grad_accum_steps"] = micro, accumulation * devices
    if hyper.learning_rate == "auto":
        update["learning_rate"] = auto_learning_rate(parameters, method)
    if not update:
        return hyper
    names = [name for name in ("n_epochs", "batch_size", "learning_rate") if name in update]
    return hyper.model_copy(update={**update, "auto": names})


def has_auto(hyper: Hyperparameters) -> bool:
    return "auto" in (hyper.n_epochs, hyper.batch_size, hyper.learning_rate)
