"""Data-parallel training (gpt2core.distributed + the Trainer under DDP): a run on 2 CPU processes (gloo) gives
the losses, evaluations and checkpoints of the same run on 1 process, stops together, and resumes at either size.

The 2-process runs all happen once, in one pair of processes (``torch.multiprocessing.spawn``, which pays for
starting torch twice only once): the `ddp` fixture runs every scenario there and the tests compare what each rank
reported with the same scenario run here, in this single process."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gpt2core import GPT2, GPT2Config
from gpt2core.distributed import (
    DistributedContext,
    any_rank,
    gather_to_main,
    init_distributed,
    shard_batches,
    shutdown_distributed,
    split_global_batch,
)
from gpt2core.train import STATE_FILE, TrainConfig, Trainer, TrainerCallback

WORLD = 2
VOCAB = 128
T = 16
SPAWN_TIMEOUT = 150  # seconds for the whole 2-process run (about 15 s on an idle 2-core CPU)


def small_model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB))


def tokens(n: int = 3000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint16)


def prompt_like_mask(n: int, seed: int = 2) -> np.ndarray:
    """Runs of 0s (prompts) and 1s (completions) of random lengths: each window counts a different number."""
    rng = np.random.default_rng(seed)
    runs = []
    while sum(len(r) for r in runs) < n:
        runs += [np.zeros(rng.integers(3, 25), np.uint8), np.ones(rng.integers(1, 12), np.uint8)]
    return np.concatenate(runs)[:n]


# Each scenario: TrainConfig fields and whether the data carries a loss mask / the model LoRA adapters.
SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": dict(config=dict(batch_size=4, grad_accum_steps=1)),
    "accum": dict(config=dict(batch_size=3, grad_accum_steps=2)),  # a rank's 3 windows: one micro-batch of 3
    "uneven": dict(config=dict(batch_size=4, grad_accum_steps=3)),  # 6 per rank, micro-batches of 3 across batches
    "masked": dict(config=dict(batch_size=4, grad_accum_steps=2, eval_every=2, eval_windows=13), mask=True),
    "lora": dict(config=dict(batch_size=4, grad_accum_steps=2), lora=True),
}
STOP_AT, MAX_STEPS = 3, 6


def config(checkpoint_dir: Path | None = None, **fields: Any) -> TrainConfig:
    base = dict(max_steps=5, block_size=T, learning_rate=1e-2, warmup_steps=2, device="cpu", seed=11)
    if checkpoint_dir is not None:
        base["checkpoint_dir"] = str(checkpoint_dir)
    return TrainConfig(**{**base, **fields})


def build(name: str) -> tuple[torch.nn.Module, TrainConfig, dict[str, Any]]:
    """A scenario's model, config and Trainer data arguments (the same in every process)."""
    spec = SCENARIOS[name]
    model = small_model()
    if spec.get("lora"):
        from gpt2core.lora import LoraSettings, apply_lora

        model = apply_lora(model, LoraSettings(rank=4, alpha=8), seed=0)
    data, val = tokens(3000, seed=1), tokens(700, seed=2)
    kwargs: dict[str, Any] = dict(train_data=data, val_data=val)
    if spec.get("mask"):
        kwargs.update(train_mask=prompt_like_mask(len(data), seed=3), val_mask=prompt_like_mask(len(val), seed=4))
    return model, config(**spec["config"]), kwargs


class Recorder(TrainerCallback):
    """Records the events it is given; asks to stop once `stop_after` steps were seen."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.steps, self.grad_norms, self.evals, self.checkpoints = stop_after, [], [], [], []
        self.polls = 0

    def on_step(self, metrics):
        self.steps.append(metrics.step)
        self.grad_norms.append(metrics.grad_norm)

    def on_eval(self, step, val_loss, perplexity, accuracy):
        self.evals.append([step, val_loss, accuracy])

    def on_checkpoint(self, step, path, train_loss, val_loss):
        self.checkpoints.append(step)

    def should_stop(self):
        self.polls += 1
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def run_scenario(name: str) -> dict[str, Any]:
    model, cfg, kwargs = build(name)
    recorder = Recorder()
    trainer = Trainer(model, cfg, callbacks=[recorder], **kwargs)  # type: ignore[arg-type]
    result = trainer.fit()
    trainer.evaluate()
    assert trainer.last_eval is not None
    return dict(losses=result.losses, evals=recorder.evals, position=trainer.train_loader.state_dict()["position"],
                tokens=result.tokens, eval=[trainer.last_eval.loss, trainer.last_eval.accuracy, trainer.last_eval.tokens],
                callback_steps=recorder.steps, grad_norms=recorder.grad_norms)


def stop_config(checkpoint_dir: Path) -> TrainConfig:
    return config(checkpoint_dir, max_steps=MAX_STEPS, batch_size=4, grad_accum_steps=2)


def run_stopped(checkpoint_dir: Path) -> dict[str, Any]:
    """Stopped by a (rank 0) callback after STOP_AT steps: fit() writes the final checkpoint."""
    recorder = Recorder(stop_after=STOP_AT)
    trainer = Trainer(small_model(), stop_config(checkpoint_dir), tokens(3000, seed=1), callbacks=[recorder])
    result = trainer.fit()
    return dict(step=trainer.step, stopped=result.stopped, reason=result.stop_reason, losses=result.losses,
                checkpoint=str(result.checkpoint), polls=recorder.polls, callback_checkpoints=recorder.checkpoints)


def run_resumed(checkpoint_dir: Path, resume_from: Path | None = None) -> dict[str, Any]:
    trainer = Trainer(small_model(seed=5), stop_config(checkpoint_dir), tokens(3000, seed=1))
    trainer.resume(resume_from)
    result = trainer.fit()
    return dict(step=trainer.step, losses=result.losses)


# ---- the 2-process side ------------------------------------------------------------------------------------------


def worker(rank: int, port: int, out: str) -> None:
    """One rank of the 2-process run: joins the group as under torchrun, runs every scenario, writes its results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        results: dict[str, Any] = {"context": [ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device), ctx.is_main]}
        results["current"] = DistributedContext.current() == ctx
        results["any_rank"] = [any_rank(rank == 1), any_rank(False)]
        results["gathered"] = gather_to_main({"rank": rank})
        for name in SCENARIOS:
            results[name] = run_scenario(name)
        try:
            Trainer(small_model(), config(batch_size=3, grad_accum_steps=1), tokens(3000, seed=1))
        except ValueError as exc:
            results["refused"] = str(exc)
        checkpoints = Path(out) / "ckpt"
        results["stopped"] = run_stopped(checkpoints)
        results["resumed"] = run_resumed(checkpoints)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        shutdown_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, Any]:
    """What ranks 0 and 1 of the 2-process run reported, and its folder (checkpoints under ckpt/)."""
    out = tmp_path_factory.mktemp("ddp")
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children: 2 processes on 2 cores, one thread each
    try:
        context = mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while not context.join(timeout=1):  # raises when a rank failed
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                pytest.fail(f"the 2-process run did not finish in {SPAWN_TIMEOUT} s")
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"ranks": ranks, "dir": out}


def close(a: list[float], b: list[float], rel: float = 1e-4) -> bool:
    return len(a) == len(b) and all(x == pytest.approx(y, rel=rel, abs=1e-7) for x, y in zip(a, b))


# ---- (d) splitting the batch: pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ((8, 1, 2), (4, 1)), ((3, 2, 2), (3, 1)), ((4, 3, 2), (3, 2)), ((8, 1, 1), (8, 1)), ((5, 4, 4), (5, 1)),
    ((6, 2, 4), (3, 1)), ((7, 2, 2), (7, 1)), ((4, 6, 2), (4, 3)), ((5, 2, 5), (2, 1)), ((4, 5, 2), (2, 5)),
])
def test_split_global_batch(args, expected):
    micro, accum = split_global_batch(*args)
    assert (micro, accum) == expected
    batch_size, grad_accum, world = args
    assert micro * accum * world == batch_size * grad_accum and micro <= batch_size


def test_split_global_batch_refuses():
    with pytest.raises(ValueError, match=r"batch_size \* grad_accum_steps \(3 \* 1 = 3 windows per step\) must be "
                                         r"a multiple of the world size \(2\)"):
        split_global_batch(3, 1, 2)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        split_global_batch(4, 1, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        split_global_batch(True, 1, 1)  # type: ignore[arg-type]


def test_shard_batches_cuts_the_global_batch_into_contiguous_shares():
    batches = [(torch.arange(b * 4, b * 4 + 4)[:, None].repeat(1, 3), -torch.ones(4, 3, dtype=torch.long))
               for b in range(3)]  # 3 loader batches of 4 windows; window i holds i
    shares = []
    for rank in range(2):
        ctx = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        micro = shard_batches(batches, 4, ctx)
        assert [len(x) for x, _ in micro] == [3, 3]
        shares += [int(v) for x, _ in micro for v in x[:, 0]]
    assert shares == list(range(12))
    one = DistributedContext.current()
    assert one == DistributedContext(0, 1, 0, one.device) and one.is_main
    assert shard_batches(batches, 4, one) is batches


def test_one_process_context_and_helpers_without_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0)
    assert any_rank(True) and not any_rank(False) and gather_to_main(3) == [3]
    shutdown_distributed()  # nothing to do


# ---- the 2-process run against 1 process -------------------------------------------------------------------------


def test_the_group_and_its_collectives(ddp):
    r0, r1 = ddp["ranks"]
    assert r0["context"] == [0, 2, 0, "cpu", True] and r1["context"] == [1, 2, 1, "cpu", False]
    assert r0["current"] and r1["current"]
    assert r0["any_rank"] == r1["any_rank"] == [True, False]
    assert r0["gathered"] == [{"rank": 0}, {"rank": 1}] and r1["gathered"] is None
    for r in (r0, r1):
        assert "TrainConfig.batch_size * TrainConfig.grad_accum_steps (3 * 1 = 3 windows per step) must be a " \
               "multiple of the world size (2)" in r["refused"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_train_as_one(ddp, name):
    """(a), (e): the same per-step losses, data position and tokens as one process; only rank 0's callbacks."""
    one = run_scenario(name)
    r0, r1 = (r[name] for r in ddp["ranks"])
    assert close(r0["losses"], one["losses"]), (r0["losses"], one["losses"])
    assert r1["losses"] == r0["losses"]  # the all-reduced loss: the same on every rank
    assert r0["position"] == r1["position"] == one["position"]
    assert r0["tokens"] == r1["tokens"] == one["tokens"]
    assert r0["callback_steps"] == one["callback_steps"] and r1["callback_steps"] == []
    assert len(one["losses"]) == 5 and close(r0["grad_norms"], one["grad_norms"])  # the same gradients


def test_evaluation_is_split_across_ranks(ddp):
    """(b): the evaluation's loss and accuracy equal one process's (13 windows: 7 on rank 0, 6 on rank 1)."""
    one = run_scenario("masked")
    r0, r1 = (r["masked"] for r in ddp["ranks"])
    assert r0["eval"] == r1["eval"]
    assert r0["eval"][2] == one["eval"][2]
    assert r0["eval"][:2] == pytest.approx(one["eval"][:2], rel=1e-6)
    assert [e[0] for e in r0["evals"]] == [e[0] for e in one["evals"]] == [2, 4, 5] and r1["evals"] == []
    for (_, loss, acc), (_, ref_loss, ref_acc) in zip(r0["evals"], one["evals"]):
        assert loss == pytest.approx(ref_loss, rel=1e-6) and acc == pytest.approx(ref_acc, rel=1e-6)


def test_a_rank_0_stop_stops_both_ranks_and_resumes_at_either_size(ddp, tmp_path):
    """(c): stopped by rank 0's callback at step 3, on both ranks, with a checkpoint; resumed on 2 processes and
    on 1, the losses continue as the uninterrupted run's."""
    r0, r1 = ddp["ranks"]
    s0, s1 = r0["stopped"], r1["stopped"]
    for s in (s0, s1):
        assert (s["step"], s["stopped"], s["reason"]) == (STOP_AT, True, "stopped")
        assert s["checkpoint"] == str(ddp["dir"] / "ckpt" / "step-000003")
    assert s0["polls"] == STOP_AT + 1 and s1["polls"] == 0 and s1["callback_checkpoints"] == []
    assert s0["callback_checkpoints"] == [STOP_AT]

    full = Trainer(small_model(), stop_config(tmp_path / "full"), tokens(3000, seed=1)).fit().losses
    assert close(s0["losses"], full[:STOP_AT]) and s1["losses"] == s0["losses"]
    assert close(r0["resumed"]["losses"], full[STOP_AT:]) and r1["resumed"]["losses"] == r0["resumed"]["losses"]
    assert r0["resumed"]["step"] == r1["resumed"]["step"] == MAX_STEPS

    checkpoint = ddp["dir"] / "ckpt" / "step-000003"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # seeds 11 and 12
    assert state["train_loader"]["position"] == STOP_AT * 2  # as on one process: 2 loader batches a step

    one = run_resumed(tmp_path / "one", resume_from=checkpoint)
    assert one["step"] == MAX_STEPS and close(one["losses"], full[STOP_AT:])


def test_one_process_checkpoints_keep_their_format(tmp_path):
    Trainer(small_model(), config(tmp_path, max_steps=1, batch_size=2), tokens(3000, seed=1)).fit()
    state = torch.load(tmp_path / "step-000001" / STATE_FILE, weights_only=True)
    assert "rng_ranks" not in state and "world_size" not in state and "rng" in state
