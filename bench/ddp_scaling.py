"""Data-parallel scaling: training tokens/s of gpt2core's Trainer on 1 process and on 2 (DistributedDataParallel).

Both runs train the same model (random weights, seed 0) on the same random tokens with the same TrainConfig, so the
same global batch: --batch-size x --grad-accum windows of --block-size tokens a step. On 2 processes each rank
trains on half of those windows (gpt2core.distributed.split_global_batch) and DDP averages the gradients; the
per-step losses are the single process's (the table shows the last one of each run).

Each run is a fresh `torchrun --standalone --nproc_per_node N` of this file (`--child`), which calls
gpt2core.distributed.init_distributed() and then Trainer.fit(): on 1 process no group is initialized (a plain
Trainer), on 2 the ranks use gloo on CPU, or nccl and one GPU each when CUDA has at least 2 GPUs (--device). On CPU
the cores are shared out: each process gets cpu_count / N torch threads, so both runs use the whole machine.

Measured: rank 0's step times (Trainer's StepMetrics.step_time, from the batch draw to the loss's all-reduce and
.item(), so the device is synchronised), --warmup-steps steps left out, then --steps timed. Reported: the best
(shortest) step and the median step, as the step's global training tokens over its time, and their ratio 2 / 1.

    python bench/ddp_scaling.py                                   # small shape, CPU (gloo): about 1 minute
    python bench/ddp_scaling.py --model-layers 12 --n-embd 768 --block-size 1024 --batch-size 16 --steps 30
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import torch

from gpt2core import GPT2, GPT2Config
from gpt2core.distributed import init_distributed, shutdown_distributed, split_global_batch
from gpt2core.train import TrainConfig, Trainer


# ---- one run (torchrun's processes) ------------------------------------------------------------------------------


class StepTimes:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_step(self, metrics) -> None:
        self.times.append(metrics.step_time)
        self.losses.append(metrics.loss)


def run_child(args: argparse.Namespace) -> None:
    """One rank of a run: train, and on rank 0 print the step times and losses as a JSON line."""
    torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    try:
        torch.manual_seed(0)
        model = GPT2(GPT2Config(n_layer=args.model_layers, n_head=args.n_head, n_embd=args.n_embd,
                                block_size=args.block_size, vocab_size=args.vocab_size))
        tokens = np.random.default_rng(0).integers(0, args.vocab_size, args.tokens).astype(np.uint16)
        config = TrainConfig(max_steps=args.warmup_steps + args.steps, batch_size=args.batch_size,
                             grad_accum_steps=args.grad_accum, block_size=args.block_size, learning_rate=1e-3,
                             warmup_steps=1, device=str(ctx.device), seed=0)
        times = StepTimes()
        trainer = Trainer(model, config, tokens, callbacks=[times])
        trainer.fit()
        if ctx.is_main:
            print(json.dumps({"world_size": ctx.world_size, "times": times.times[args.warmup_steps:],
                              "losses": times.losses, "parameters": model.num_parameters()}))
    finally:
        shutdown_distributed()


# ---- the comparison (parent) -------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, nproc: int) -> dict:
    """A torchrun of `nproc` processes of this file; rank 0's JSON result."""
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--child", "--threads", str(threads), "--device", args.device]
    for name in ("model_layers", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "grad_accum",
                 "steps", "warmup_steps", "tokens"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"the {nproc}-process run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-layers", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=50257, help="GPT-2's by default")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch on 1 process")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches a step on 1 process")
    parser.add_argument("--steps", type=int, default=15, help="steps timed")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out before timing")
    parser.add_argument("--tokens", type=int, default=200_000, help="random training tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda (nccl) when at least 2 GPUs are visible, else cpu (gloo)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"

    if args.child:
        run_child(args)
        return

    micro, accum = split_global_batch(args.batch_size, args.grad_accum, 2)  # refuses an odd global batch
    if args.device == "cuda":
        where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, nccl"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, gloo"
    global_windows = args.batch_size * args.grad_accum
    tokens = global_windows * args.block_size
    print(f"device: {args.device} ({where}), torch {torch.__version__}")
    print(f"model: {args.model_layers} layers, n_embd {args.n_embd}, {args.n_head} heads, block {args.block_size}, "
          f"vocab {args.vocab_size}; global batch {global_windows} windows x {args.block_size} = {tokens:,} tokens "
          f"a step (2 processes: {accum} x {micro} windows each); {args.warmup_steps} + {args.steps} steps each")
    results = {n: launch(args, n) for n in (1, 2)}
    print(f"parameters: {results[1]['parameters']:,}")

    rate = {(n, "best"): tokens / min(r["times"]) for n, r in results.items()}
    rate.update({(n, "median"): tokens / statistics.median(r["times"]) for n, r in results.items()})
    rows = []
    for kind in ("best", "median"):
        a, b = rate[1, kind], rate[2, kind]
        rows.append((f"training tokens/s ({kind} step)", f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}x"))
    a, b = (statistics.median(results[n]["times"]) * 1000 for n in (1, 2))
    rows.append(("median step time", f"{a:,.1f} ms", f"{b:,.1f} ms", f"{b / a:.2f}x"))
    last = {n: r["losses"][-1] for n, r in results.items()}
    difference = max(abs(x - y) for x, y in zip(results[1]["losses"], results[2]["losses"]))
    rows.append((f"training loss at step {len(results[1]['losses'])}", f"{last[1]:.5f}", f"{last[2]:.5f}",
                 f"max diff {difference:.1e}"))
    print()
    print("| measure | 1 process | 2 processes | 2 / 1 |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
