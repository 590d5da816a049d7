"""Training and fine-tuning GPT-2 with periodic evaluation, samples, checkpoints and exact resume.

    trainer = Trainer(model, TrainConfig(max_steps=1000, batch_size=16, checkpoint_every=100,
                                         checkpoint_dir="runs/a", eval_every=100), train_tokens, val_tokens)
    result = trainer.fit()

``train_data``/``val_data`` are token arrays (``np.memmap`` from :func:`gpt2core.data.load_dataset`, numpy
arrays, 1-D tensors, paths of ``.bin`` token files) or :class:`gpt2core.data.BatchLoader` objects. Fine-tuning
is the same Trainer on a model loaded with ``GPT2.from_pretrained``.

Loss masks (prompt/completion data): ``Trainer(..., train_mask=ds.train_mask, val_mask=ds.val_mask)`` with the
masks of :func:`gpt2core.data.load_dataset` (uint8 per token, aligned with the tokens, 1 = a target; None: every
token is one). Targets whose token has mask 0 (a prompt's) are not scored: a step's loss is the sum of its
per-target cross-entropies over the number of counted targets across all its micro-batches (token-weighted; for
unmasked data exactly the mean over the step's tokens, as before masks). A BatchLoader given as data carries its
own ``mask``.

Optimisation: AdamW (``fused`` on CUDA) with weight decay on parameters of dim >= 2 only (embeddings and matmul
weights; not biases or LayerNorm), linear warmup to ``learning_rate`` then cosine decay to ``min_lr`` at
``max_steps`` (see :func:`learning_rate_at`), gradient accumulation over ``grad_accum_steps`` micro-batches
(each micro-batch's summed loss divided by the step's number of counted targets), gradient-norm clipping (the
reported norm is the pre-clip one). dtype "auto" means bf16 autocast on CUDA (where supported, TF32 matmuls
allowed) and fp32 on CPU; parameters and optimizer state stay fp32.

Each optimizer step, in order: the step, ``on_step``; then when due an evaluation (``on_eval``), samples
(``on_sample``) and a checkpoint (``on_checkpoint``); then every callback's ``should_stop()`` is polled, and if
any says stop, no further step is taken. When ``fit()`` ends (max_steps reached or stopped) and
``checkpoint_dir`` is set, a final checkpoint is written unless one exists for that step.

Checkpoints: ``checkpoint_dir/step-000100/`` holds ``config.json`` + ``model.safetensors`` (a Hugging Face
checkpoint; ``GPT2.from_pretrained`` and transformers load it) and ``trainer_state.pt`` (optimizer state, step,
RNG states of torch/CUDA/python/numpy, data loader position, last losses). Each is written to a temporary
directory (``.tmp-step-000100-<hex>/``) and renamed into place, so a ``step-*`` directory is always complete; a
write that fails (a full disk raises an ``OSError`` with errno ``ENOSPC``) removes its temporary directory and
leaves the earlier checkpoints as they were. ``Trainer.resume()`` continues a
run exactly: on CPU the resumed per-step losses equal the uninterrupted run's (dropout included, since the RNG
states are restored). The trainer seeds torch, python ``random`` and numpy's global RNG with ``config.seed``
when it is built.

Data-parallel training: launch ``torchrun --nproc_per_node N your_script.py``, where the script calls
``gpt2core.distributed.init_distributed()`` before building the Trainer (one process per GPU with nccl, or CPU
processes with gloo). A Trainer built while a process group of N > 1 ranks is initialized trains the same run a
single process would, N times wider: every rank draws the same loader batches, takes its contiguous share of the
step's ``batch_size * grad_accum_steps`` windows (which must be a multiple of N; see
:func:`gpt2core.distributed.split_global_batch`) and runs its forward/backward through
``DistributedDataParallel``, which averages the gradients; the loss is counted over the whole step, so the
losses, gradients, weights and checkpoints are those of one process (up to float rounding), and the loader's
position does not depend on N. ``self.model`` stays the unwrapped model. Evaluations split the windows across
the ranks and sum their results. Rank r seeds its RNGs with ``config.seed + r`` (rank 0 as one process would).
Only rank 0 calls the callbacks and generates samples; its callbacks' ``should_stop`` decides for every rank
(shared each step), and the divergence guard and early stopping see the same values on every rank, so all ranks
stop at the same step. ``save_checkpoint`` is a collective (``fit`` calls it at the same points on every rank):
rank 0 writes the usual checkpoint plus every rank's RNG state (``"rng_ranks"``) and ``"world_size"`` in
trainer_state.pt; ``checkpoint_dir`` must be a folder every rank reads, as each loads it in ``resume``. A resume at
the same world size is exact; at another one (one process included) the data and the loss curve continue the
same (dropout defaults to 0), only dropout masks differ: rank 0 restores rank 0's RNG state and the other ranks
are seeded from ``(config.seed + r, step)``.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, BatchLoader, eval_window_starts, masked_targets
from .device import default_device
from .distributed import (
    DistributedContext,
    all_reduce_sum,
    any_rank,
    data_parallel,
    gather_to_main,
    rank_seed,
    shard_batches,
)
from .model import GPT2
from .stopping import EarlyStopping, LossWatchdog, TrainingDiverged
# The Trainer's configuration, events and checkpoint files, each in a module of its own (names kept here too).
from .callbacks import EvalResult, Sample, StepMetrics, TrainerCallback, TrainResult
from .train_config import DTYPES, TrainConfig, learning_rate_at
from .trainer_state import (
    CHECKPOINT_PATTERN,
    STATE_FILE,
    STATE_VERSION,
    _rng_state,
    _set_rng_state,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    seed_everything,
)

__all__ = [
    "CHECKPOINT_PATTERN", "DTYPES", "STATE_FILE", "STATE_VERSION", "EvalResult", "Sample", "StepMetrics",
    "TrainConfig", "TrainResult", "Trainer", "TrainerCallback", "build_optimizer", "checkpoint_name",
    "decay_parameter_names", "latest_checkpoint", "learning_rate_at", "list_checkpoints", "perplexity",
    "seed_everything",
]


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def decay_parameter_names(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without): decay exactly the trainable parameters with dim >= 2."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = decay_parameter_names(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": config.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=config.lr_at(0), betas=config.betas, eps=config.eps, **extra)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on ``train_data`` per ``config``; ``fit()`` runs the loop, ``resume()`` continues a run.

    ``train_data``/``val_data``: token arrays, memmaps, 1-D tensors, ``.bin`` paths, or BatchLoaders (a val
    loader must offer ``batch(i)``). ``tokenizer`` (default GPT2Tokenizer) is only used for samples.
    ``train_mask``/``val_mask``: loss masks aligned with ``train_data``/``val_data`` (``PreparedDataset.train_mask``
    and ``val_mask``; arrays, memmaps, tensors or mask-file paths; 1 = the token is a target, 0 = a prompt's
    token, not scored), or None: every token is a target. A BatchLoader given as data brings its own ``mask``
    instead (giving both is an error).
    """

    def __init__(
        self,
        model: GPT2,
        config: TrainConfig | None = None,
        train_data: Any = None,
        val_data: Any = None,
        callbacks: Iterable[Any] = (),
        tokenizer: Any = None,
        *,
        train_mask: Any = None,
        val_mask: Any = None,
    ):
        self.config = config = config or TrainConfig()
        if train_data is None:
            raise ValueError("train_data is required")
        self.device = torch.device(config.device) if config.device is not None else default_device()
        self.dist = DistributedContext.current()  # rank 0 of 1 unless a process group is initialized
        model_block = model.config.block_size
        self.block_size = config.block_size or model_block
        if self.block_size > model_block:
            raise ValueError(
                f"TrainConfig.block_size ({self.block_size}) exceeds the model's block_size ({model_block})"
            )
        self.model = model.to(self.device)
        self.callbacks = list(callbacks)
        self.tokenizer = tokenizer
        seed_everything(config.seed + self.dist.rank)  # rank 0 (a single process) seeds with config.seed

        if val_data is None and val_mask is not None:
            raise ValueError("val_mask was given without val_data")
        self.train_loader = self._loader(train_data, config.seed, "train_data", train_mask)
        self.val_loader = None if val_data is None else self._loader(val_data, config.seed + 1, "val_data", val_mask)
        self.last_eval: EvalResult | None = None  # the last evaluate()'s loss, accuracy and target count
        if config.eval_every and self.val_loader is None:
            raise ValueError("TrainConfig.eval_every is set but no val_data was given")
        self.batch_windows = getattr(self.train_loader, "batch_size", config.batch_size)  # per loader batch
        step_windows = self.batch_windows * config.grad_accum_steps
        if step_windows % self.dist.world_size:
            raise ValueError(
                f"TrainConfig.batch_size * TrainConfig.grad_accum_steps ({self.batch_windows} * "
                f"{config.grad_accum_steps} = {step_windows} windows per step) must be a multiple of the world "
                f"size ({self.dist.world_size}): every rank trains on an equal share of a step's windows")

        self.autocast_dtype: torch.dtype | None = None
        if config.dtype == "bfloat16" or (
            config.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        ):
            self.autocast_dtype = torch.bfloat16
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.optimizer = build_optimizer(self.model, config, self.device)
        if config.compile:  # a graph the compiler cannot handle runs eagerly instead of failing the run
            import torch._dynamo.config as dynamo_config

            dynamo_config.suppress_errors = True
        self.forward_model = torch.compile(self.model) if config.compile else self.model  # evaluation
        # Training's forward/backward: through DDP (gradients averaged over the ranks) on more than one process.
        self.ddp_model = data_parallel(self.model, self.device) if self.dist.world_size > 1 else None
        self.train_model = self.forward_model
        if self.ddp_model is not None:
            self.train_model = torch.compile(self.ddp_model) if config.compile else self.ddp_model
        self.step = 0
        self.tokens_seen = 0
        self.last_train_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self._last_eval_step: int | None = None
        self.watchdog = LossWatchdog(config.divergence_threshold, config.divergence_patience)
        self.early_stopping = EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)

    # ---- data ----------------------------------------------------------------------------------

    def _loader(self, data: Any, seed: int, what: str, mask: Any = None):
        if hasattr(data, "next_batch") and hasattr(data, "state_dict"):
            if mask is not None:
                kind = what.removesuffix("_data")
                raise ValueError(f"{what} is a loader: give it the mask (BatchLoader(..., mask=...)), not {kind}_mask")
            block = getattr(data, "block_size", None)
            if block is not None and block > self.model.config.block_size:
                raise ValueError(f"{what}: loader block_size {block} exceeds the model's {self.model.config.block_size}")
            return data
        return BatchLoader(data, self.block_size, self.config.batch_size, seed=seed, mask=mask)

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            return [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        return [t.to(self.device) for t in tensors]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ---- one step ------------------------------------------------------------------------------

    def train_step(self) -> StepMetrics:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns its metrics (elapsed left 0).

        The loss is token-weighted over the step's counted targets (those not masked out as a prompt's): the
        sum of their cross-entropies over their number, across all micro-batches; each micro-batch backpropagates
        its sum over that number, which is known before any forward pass (the batches do not depend on the
        model). A step without any counted target (all its windows inside prompts) changes no weight: it
        reports loss 0.0, and the optimizer is not stepped.

        On N > 1 ranks, each trains on its share of the step's windows (``distributed.shard_batches``); its
        micro-batches backpropagate their sum times N over the step's targets (DDP averages over the ranks), and
        the loss and tokens reported are the whole step's, as on one process."""
        cfg = self.config
        t0 = time.perf_counter()
        self.model.train()
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self.train_loader.next_batch() for _ in range(cfg.grad_accum_steps)]
        targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)  # counted across the whole step
        tokens = sum(x.numel() for x, _ in batches)  # every rank's, the whole step's
        micro_batches = shard_batches(batches, self.batch_windows, self.dist)  # this rank's (all on one process)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            # DDP averages the gradients over the ranks once per step: in the last micro-batch's backward
            ddp, last = self.ddp_model, i == len(micro_batches) - 1
            with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                x, y = self._to_device(*batch)
                with self._autocast():
                    logits, _ = self.train_model(x)
                    loss = target_loss_sum(logits, y)
                (loss * self.dist.world_size / max(targets, 1)).backward()
            loss_sum += loss.detach()
        all_reduce_sum(loss_sum)  # the whole step's (a no-op on one process)
        max_norm = cfg.grad_clip if cfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if targets:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = (loss_sum / max(targets, 1)).item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss is {loss_value} at step {self.step + 1}")
        self.step += 1
        self.tokens_seen += tokens
        self.last_train_loss = loss_value
        dt = time.perf_counter() - t0
        return StepMetrics(
            step=self.step,
            loss=loss_value,
            learning_rate=lr,
            grad_norm=float(grad_norm),
            tokens_per_second=tokens / dt if dt > 0 else math.inf,
            elapsed=0.0,
            tokens=self.tokens_seen,
            step_time=dt,
        )

    # ---- evaluation and samples ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss (nats per counted target) over the validation split's evaluation windows
        (``data.eval_window_starts``: every non-overlapping ``block_size`` window, or ``eval_windows`` of them
        evenly spread): the same tokens at every evaluation and for every run with the same split and block size,
        whatever its seed, in batches of ``batch_size`` windows. Token-weighted; with a loss mask, targets that
        are a prompt's tokens are not counted (a window of prompt only counts nothing).

        Also stores ``self.last_eval``: :class:`EvalResult` with that loss, the token accuracy (the fraction of
        counted targets equal to the argmax of their prediction) and the number of counted targets. ValueError
        when the windows hold no counted target at all.

        On N > 1 ranks (a collective: every rank calls it), rank r scores windows ``r, r + N, ...`` and the sums
        are added up over the ranks: every rank returns the same result."""
        if self.val_loader is None:
            raise ValueError("no val_data was given")
        data, T = self.val_loader.data, self.val_loader.block_size
        mask = getattr(self.val_loader, "mask", None)
        starts = eval_window_starts(len(data), T, self.config.eval_windows)
        was_training = self.model.training
        self.model.eval()
        try:
            total, correct, tokens = torch.zeros((), dtype=torch.float64), 0, 0
            mine = starts[self.dist.rank :: self.dist.world_size]  # all of them on one process
            for first in range(0, len(mine), self.config.batch_size):
                batch = mine[first : first + self.config.batch_size]
                w = torch.from_numpy(np.stack([np.asarray(data[s : s + T + 1], dtype=np.int64) for s in batch]))
                x, y = w[:, :-1], w[:, 1:]
                if mask is not None:
                    y = masked_targets(y, np.stack([np.asarray(mask[s : s + T + 1]) for s in batch]))
                count = int((y != IGNORE_INDEX).sum())
                if not count:
                    continue
                x, y = self._to_device(x, y)
                with self._autocast():
                    logits, _ = self.forward_model(x)
                    total += target_loss_sum(logits, y, torch.float64).cpu()
                correct += int((logits.argmax(dim=-1) == y).sum())  # an ignored target (-100) never matches
                tokens += count
            sums = all_reduce_sum(torch.tensor([total.item(), correct, tokens], dtype=torch.float64))
            total, correct, tokens = sums[0], int(sums[1]), int(sums[2])
            if not tokens:
                raise ValueError(
                    f"evaluation has no target to score: every target of the validation split's {len(starts)} "
                    "evaluation windows is masked out (a prompt's token); the validation data needs completions "
                    "(or text) inside its windows")
            self.last_eval = EvalResult(loss=(total / tokens).item(), accuracy=correct / tokens, tokens=tokens)
            return self.last_eval.loss
        finally:
            self.model.train(was_training)

    def sample(self, prompts: Sequence[str] | None = None) -> list[Sample]:
        """Generate from ``prompts`` (default ``config.sample_prompts``) without touching the training RNG."""
        from .generation import SamplingParams, generate

        if self.tokenizer is None:
            from .tokenizer import GPT2Tokenizer

            self.tokenizer = GPT2Tokenizer()
        cfg = self.config
        prompts = list(cfg.sample_prompts if prompts is None else prompts)
        params = SamplingParams(
            max_new_tokens=min(cfg.sample_max_new_tokens, self.model.config.block_size - 1),
            temperature=cfg.sample_temperature,
            top_k=cfg.sample_top_k,
            seed=cfg.seed,
            truncate_prompt=True,
        )
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices):
            try:
                results = generate(self.model, self.tokenizer, prompts, params)
            finally:
                self.model.train(was_training)
        return [Sample(prompt=p, text=r.completions[0].text) for p, r in zip(prompts, results)]

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default ``checkpoint_dir/step-NNNNNN``) atomically; returns its path.

        For a model wrapped by ``gpt2core.lora.apply_lora``, config.json + model.safetensors hold the merged weights
        (a plain GPT-2 checkpoint, the training model left as it is), ``adapter/`` the adapter in peft's format, and
        trainer_state.pt also the LoRA settings (``"lora"``); the optimizer state covers the adapters only.

        On N > 1 ranks a collective that every rank calls: rank 0 gathers every rank's RNG state, writes the
        checkpoint (trainer_state.pt also holds ``"rng_ranks"``, the states by rank, and ``"world_size"``) and
        prunes old ones; no rank returns before it is complete, and every rank returns its path. When rank 0's
        write fails, it raises that error and the other ranks a RuntimeError."""
        if path is None:
            if self.config.checkpoint_dir is None:
                raise ValueError("TrainConfig.checkpoint_dir is not set and no path was given")
            path = Path(self.config.checkpoint_dir) / checkpoint_name(self.step)
        final = Path(path)
        rng_ranks = gather_to_main(_rng_state(self.device))  # [rank 0's, rank 1's, ...] on rank 0, else None
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                self._write_checkpoint(final, rng_ranks)
            except BaseException as exc:  # re-raised below, once the other ranks know
                failure = exc
        # Also the barrier: no rank goes on before rank 0 has written (or failed to write) the checkpoint.
        if any_rank(failure is not None):
            if failure is not None:
                raise failure
            raise RuntimeError(f"rank 0 failed to write checkpoint {final}")
        self.last_checkpoint = final
        # The validation loss of this step's own evaluation: a checkpoint between evaluations has none.
        val_loss = self.last_val_loss if self._last_eval_step == self.step else None
        self._emit("on_checkpoint", self.step, final, self.last_train_loss, val_loss)
        return final

    def _write_checkpoint(self, final: Path, rng_ranks: list[dict[str, Any]] | None) -> None:
        """Write checkpoint folder `final` (atomically: a temporary folder renamed into place), then prune old
        checkpoints. `rng_ranks`: every rank's RNG state, rank 0's first."""
        assert rng_ranks is not None
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            lora = self._save_weights(tmp)
            state = {
                "version": STATE_VERSION,
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step, "lr": self.config.lr_at(max(self.step - 1, 0))},
                "rng": rng_ranks[0],
                "train_loader": self.train_loader.state_dict(),
                "train_loss": self.last_train_loss,
                "val_loss": self.last_val_loss,
                "watchdog": self.watchdog.state_dict(),
                "early_stopping": self.early_stopping.state_dict(),
                "config": self.config.to_dict(),
                "model_config": self.model.config.to_dict(),
            }
            if lora is not None:
                state["lora"] = lora
            if self.dist.world_size > 1:
                state["rng_ranks"] = rng_ranks
                state["world_size"] = self.dist.world_size
            with open(tmp / STATE_FILE, "wb") as out:  # through Python's file: a failed write raises an OSError
                torch.save(state, out)  # (as the RuntimeError's context) that names its errno, e.g. ENOSPC
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):  # adapter/ is a folder
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():
                trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.last_checkpoint = final
        self._prune_checkpoints(final.parent)

    def _prune_checkpoints(self, root: Path) -> None:
        keep = self.config.keep_last_checkpoints
        if keep is None or self.config.checkpoint_dir is None or root != Path(self.config.checkpoint_dir):
            return
        for _, old in list_checkpoints(root)[:-keep]:
            if old != self.last_checkpoint:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self, path: str | Path | None = None) -> Path:
        """Restore weights, optimizer, step, data position and RNG states from a checkpoint.

        ``path`` is a checkpoint directory or a run directory (its latest checkpoint is used); default
        ``config.checkpoint_dir``. Returns the checkpoint directory used.

        On N > 1 ranks every rank loads it. Rank r restores its own RNG state when the checkpoint was written at
        the same world size (an exact resume); otherwise rank 0 restores rank 0's and the others are seeded from
        ``(config.seed + r, step)``: the data and losses continue the same, only dropout masks differ.
        """
        if path is None:
            path = self.config.checkpoint_dir
            if path is None:
                raise ValueError("no checkpoint path given and TrainConfig.checkpoint_dir is not set")
        directory = Path(path)
        if not (directory / STATE_FILE).is_file():
            latest = latest_checkpoint(directory)
            if latest is None:
                raise FileNotFoundError(f"{directory}: no checkpoint ({STATE_FILE}) here or in a step-* directory")
            directory = latest
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{directory / STATE_FILE}: unsupported trainer state version {state.get('version')!r}")

        mc = self.model.config
        if not self._load_lora_weights(directory, state):
            loaded = GPT2.from_pretrained(directory, tokenizer_vocab_size=None,
                                          pad_vocab_multiple=mc.pad_vocab_multiple, dropout=mc.dropout)
            try:
                self.model.load_state_dict(loaded.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"{directory}: checkpoint does not fit this model: {exc}") from exc
            del loaded
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["train_loader"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.last_train_loss = state.get("train_loss")
        self.last_val_loss = state.get("val_loss")
        if "watchdog" in state:
            self.watchdog.load_state_dict(state["watchdog"])
        if "early_stopping" in state:
            self.early_stopping.load_state_dict(state["early_stopping"])
        self._restore_rng(state)
        self.last_checkpoint = directory
        return directory

    load_checkpoint = resume

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """This rank's RNG states from a checkpoint's trainer state (see ``resume``)."""
        by_rank = state.get("rng_ranks")
        if by_rank is not None and int(state.get("world_size", 1)) == self.dist.world_size:
            _set_rng_state(by_rank[self.dist.rank], self.device)
        elif self.dist.is_main:
            _set_rng_state(state["rng"], self.device)
        else:
            seed_everything(rank_seed(self.config.seed, self.dist.rank, self.step))

    def describe_parameters(self) -> str:
        """What trains, for a log line: "124,439,808 parameters", or for a LoRA model (gpt2core.lora)
        "1,179,648 of 125,619,456 parameters (LoRA adapters, rank 8)"."""
        from .lora import is_lora, settings_of, trainable_parameters

        trainable, total = trainable_parameters(self.model)
        if is_lora(self.model):
            return f"{trainable:,} of {total:,} parameters (LoRA adapters, rank {settings_of(self.model).rank})"
        return f"{trainable:,} parameters" if trainable == total else f"{trainable:,} of {total:,} parameters"

    def _save_weights(self, directory: Path) -> dict[str, Any] | None:
        """The model's weights into checkpoint folder `directory`; for a LoRA model (gpt2core.lora) the merged
        weights and the adapter, returning its LoRA settings (for trainer_state); None for a plain model."""
        from .lora import is_lora, save_lora_checkpoint, settings_of  # peft itself only if the model is wrapped

        if not is_lora(self.model):
            self.model.save_pretrained(directory)
            return None
        save_lora_checkpoint(self.model, directory)
        return settings_of(self.model).to_dict()

    def _load_lora_weights(self, directory: Path, state: dict[str, Any]) -> bool:
        """For a LoRA checkpoint resumed on a LoRA model wrapped with the same settings, load its adapter (the base
        weights are the model's own: the same base model, wrapped afresh) and return True; False for a full
        fine-tuning checkpoint resumed on a plain model. Refuses (ValueError) a mix of the two."""
        from .lora import ADAPTER_DIR, LoraSettings, is_lora, load_adapter, settings_of

        saved = state.get("lora")
        if saved is None and not is_lora(self.model):
            return False
        if saved is None:
            raise ValueError(f"{directory}: a full fine-tuning checkpoint (no LoRA adapter), but this model has "
                             "LoRA adapters; resume it on the plain model")
        settings = LoraSettings.from_dict(saved)
        if not is_lora(self.model):
            raise ValueError(f"{directory}: a LoRA checkpoint ({settings}); wrap the base model with "
                             "gpt2core.lora.apply_lora and these settings before resuming")
        if settings_of(self.model) != settings:
            raise ValueError(f"{directory}: the checkpoint's LoRA settings ({settings}) differ from this model's "
                             f"({settings_of(self.model)})")
        load_adapter(self.model, directory / ADAPTER_DIR)
        return True

    # ---- the loop ------------------------------------------------------------------------------

    def _emit(self, hook: str, *args: Any) -> None:
        if not self.dist.is_main:  # on N > 1 ranks only rank 0 calls its callbacks
            return
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def _should_stop(self) -> bool:
        # Every callback is asked, so each sees the poll; on N > 1 ranks rank 0's decide for all (a collective).
        callbacks = self.callbacks if self.dist.is_main else []
        answers = [bool(cb.should_stop()) for cb in callbacks if hasattr(cb, "should_stop")]
        return any_rank(any(answers))

    def _run_eval(self) -> bool:
        """Evaluate, tell the callbacks; True when this is the run's best validation loss so far."""
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        self._last_eval_step = self.step
        improved = self.early_stopping.observe(self.step, val_loss)
        accuracy = self.last_eval.accuracy if self.last_eval is not None else None
        self._emit("on_eval", self.step, val_loss, perplexity(val_loss), accuracy)
        return improved

    def fit(self) -> TrainResult:
        """Train until ``max_steps`` or until a callback asks to stop; see the module doc for the order of events."""
        cfg = self.config
        start = time.perf_counter()
        start_step = self.step
        losses: list[float] = []
        stopped = False
        stop_reason = "max_steps"
        while True:
            if self._should_stop():
                stopped = self.step < cfg.max_steps
                stop_reason = "stopped" if stopped else stop_reason
                break
            if self.step >= cfg.max_steps:
                break
            try:
                metrics = self.train_step()
            except FloatingPointError as exc:  # a non-finite loss: the step was not counted
                if isinstance(exc, TrainingDiverged):
                    raise
                raise TrainingDiverged(str(exc), step=self.step + 1, loss=math.nan, level=self.watchdog.level,
                                       first_bad_step=self.watchdog.streak_start or self.step + 1) from None
            metrics.elapsed = time.perf_counter() - start
            losses.append(metrics.loss)
            self._emit("on_step", metrics)
            self.watchdog.observe(metrics.step, metrics.loss)
            improved = False
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                improved = self._run_eval()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.dist.is_main:
                self._emit("on_sample", self.step, self.sample())
            due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if (due or (improved and cfg.checkpoint_best)) and not self.watchdog.alarmed:
                self.save_checkpoint()
            if self.early_stopping.should_stop:
                stop_reason = "early_stopping"
                break
        if stop_reason == "max_steps" and self.val_loader is not None and cfg.eval_every and self.step > start_step:
            if self._last_eval_step != self.step:
                self._run_eval()
        if cfg.checkpoint_dir is not None:
            current = Path(cfg.checkpoint_dir) / checkpoint_name(self.step)
            if any_rank(self.dist.is_main and not (current / STATE_FILE).is_file()):  # rank 0 decides for all
                self.save_checkpoint()
            else:
                self.last_checkpoint = current
        return TrainResult(
            steps=self.step,
            stopped=stopped,
            final_loss=self.last_train_loss,
            val_loss=self.last_val_loss,
            perplexity=None if self.last_val_loss is None else perplexity(self.last_val_loss),
            losses=losses,
            checkpoint=self.last_checkpoint,
            elapsed=time.perf_counter() - start,
            tokens=self.tokens_seen,
            stop_reason=stop_reason,
            best_step=self.early_stopping.best_step,
            best_val_loss=self.early_stopping.best_loss,
        )


def target_loss_sum(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sum of the next-token cross-entropies (nats) of `logits` (B, T, V) against `targets` (B, T) over the
    targets that count (not -100, the ignore_index): a 0-dim tensor of `dtype` (float32, or float64 for an exact
    sum), 0 when none counts (never NaN). Divide by the number of counted targets for the mean."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum" if dtype == torch.float32 else "none")
    return per_token if dtype == torch.float32 else per_token.to(dtype).sum()


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
