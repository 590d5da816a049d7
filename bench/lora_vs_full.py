"""LoRA against full fine-tuning, side by side in one run: the same base model, data and Trainer settings.

Setup: a base model is first trained (full, not measured) on the Python documentation's topics
(pydoc_data.topics) for --pretrain-steps steps; then it is fine-tuned on different text, Python source code from
the standard library (asyncio, email, json; the last 10% held out for validation), once with full fine-tuning
and once with LoRA (gpt2core.lora.apply_lora: peft's LoRA layers on every block Linear layer by default), with the
same TrainConfig. Prints, per method: trainable parameters, peak memory, training tokens/s, and the validation loss
before and after; then the ratios LoRA / full.

How memory is measured: each method's fine-tuning run (fit()) is a fresh child process, so one run's allocations
cannot hide the other's.
  - CUDA: torch.cuda.max_memory_allocated() over the fine-tuning run (reset after the base model is loaded onto
    the device): weights, gradients, optimizer state and activations at their peak. Also printed: that peak
    less the memory allocated before the run (what training added to the loaded model).
  - CPU: the process's resident set size (RSS, /proc/self/statm), sampled every 2 ms by a thread during fit();
    reported as the peak RSS less the RSS just before the Trainer was built (the loaded model and data are in
    that baseline): what training added (gradients, AdamW's two moments, activations, the LoRA layers). Peaks
    shorter than the sampling interval can be missed; a training step's memory lives for a whole step.
tokens/s: measured apart, in this one process: a Trainer for each method on the same base model and data, their
optimizer steps (Trainer.train_step) interleaved (full, lora, full, lora, ...) so machine noise hits both alike;
--warmup-steps steps each are left out, then --speed-steps steps each are timed. Reported: the best step (the
shortest step time: noise only adds time) and the median step, as each step's training tokens over its time.

    python bench/lora_vs_full.py                                  # small shape, CPU, about 3 minutes on 2 cores
    python bench/lora_vs_full.py --preset gpt2 --batch 8 --seq 1024 --steps 60 --speed-steps 30  # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gpt2core import GPT2, GPT2Config, default_device
from gpt2core.config import GPT2_LINEAR_MODULES, LORA_DEFAULT_TARGET_MODULES
from gpt2core.lora import LoraSettings, apply_lora, trainable_parameters
from gpt2core.tokenizer import GPT2Tokenizer
from gpt2core.train import TrainConfig, Trainer

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---- data --------------------------------------------------------------------------------------------------------


def corpora(tok: GPT2Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pretraining tokens, fine-tuning train tokens, fine-tuning validation tokens)."""
    import asyncio
    import email
    import pydoc_data.topics

    docs = tok.encode("\n".join(pydoc_data.topics.topics.values()))
    files: list[Path] = []
    for package in (asyncio, email, json):
        assert package.__file__ is not None
        files += sorted(Path(package.__file__).parent.glob("*.py"))
    code = tok.encode("\n".join(f.read_text(encoding="utf-8") for f in files))
    split = int(len(code) * 0.9)
    as_array = lambda tokens: np.asarray(tokens, dtype=np.uint16)  # noqa: E731
    return as_array(docs), as_array(code[:split]), as_array(code[split:])


# ---- memory ------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The peak resident set size while the `with` block runs, sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---- one run (a child process) -----------------------------------------------------------------------------------


class StepLosses:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, metrics) -> None:
        self.losses.append(metrics.loss)


def finetune_model(args: argparse.Namespace, method: str, work: Path, device: torch.device) -> torch.nn.Module:
    """The saved base model on `device`, wrapped with LoRA for method "lora"."""
    model = GPT2.from_pretrained(work / "base", tokenizer_vocab_size=None).to(device)
    if method == "lora":
        settings = LoraSettings(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.targets))
        return apply_lora(model, settings, seed=0)
    return model


def finetune_config(args: argparse.Namespace, method: str, device: torch.device) -> TrainConfig:
    return TrainConfig(max_steps=args.steps, batch_size=args.batch, block_size=args.seq,
                       learning_rate=args.lr_lora if method == "lora" else args.lr_full,
                       warmup_steps=max(1, args.steps // 10), weight_decay=0.0, eval_windows=args.eval_windows,
                       device=str(device), seed=1)


def run_one(args: argparse.Namespace) -> dict:
    """Fine-tune the saved base model with one method (in a child process): memory and losses as a dict."""
    device = torch.device(args.device) if args.device else default_device()
    work = Path(args.work)
    train = np.load(work / "train.npy", mmap_mode="r")
    val = np.load(work / "val.npy", mmap_mode="r")
    model = finetune_model(args, args.method, work, device)
    trainable, total = trainable_parameters(model)
    config = finetune_config(args, args.method, device)
    losses = StepLosses()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(model, config, train, val, callbacks=[losses])  # type: ignore[arg-type]
        val_before = trainer.evaluate()
        trainer.fit()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        memory = {"peak_bytes": peak, "added_bytes": peak - before}
    else:
        import gc

        gc.collect()
        with PeakRSS() as rss:
            baseline = rss.peak
            trainer = Trainer(model, config, train, val, callbacks=[losses])  # type: ignore[arg-type]
            val_before = trainer.evaluate()
            trainer.fit()
        memory = {"peak_bytes": rss.peak, "added_bytes": rss.peak - baseline}
    val_after = trainer.evaluate()
    return {"method": args.method, "trainable": trainable, "total": total, **memory,
            "val_before": val_before, "val_after": val_after, "final_train_loss": losses.losses[-1]}


# ---- the comparison (parent) -------------------------------------------------------------------------------------


def pretrain(args: argparse.Namespace, work: Path, device: torch.device) -> GPT2:
    tok = GPT2Tokenizer()
    docs, train, val = corpora(tok)
    np.save(work / "train.npy", train)
    np.save(work / "val.npy", val)
    torch.manual_seed(0)
    if args.preset:
        config = GPT2Config.preset(args.preset, block_size=max(args.seq, 64))
    else:
        config = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.seq)
    model = GPT2(config)
    if args.pretrain_steps:
        started = time.perf_counter()
        cfg = TrainConfig(max_steps=args.pretrain_steps, batch_size=args.batch, block_size=args.seq,
                          learning_rate=args.lr_pretrain, warmup_steps=max(1, args.pretrain_steps // 10),
                          device=str(device), seed=0)
        result = Trainer(model, cfg, docs).fit()
        print(f"base model: {model.num_parameters():,} parameters, pretrained {args.pretrain_steps} steps on the "
              f"docs ({len(docs):,} tokens) in {time.perf_counter() - started:.0f} s, loss {result.final_loss:.3f}")
    else:
        print(f"base model: {model.num_parameters():,} parameters, random weights (--pretrain-steps 0)")
    model.save_pretrained(work / "base")
    print(f"fine-tuning data: {len(train):,} tokens of stdlib source (asyncio, email, json), {len(val):,} held out")
    return model


def speed(args: argparse.Namespace, work: Path, device: torch.device) -> dict[str, list[float]]:
    """Step times (seconds) of both methods, their steps interleaved in this one process."""
    train = np.load(work / "train.npy", mmap_mode="r")
    trainers = {method: Trainer(finetune_model(args, method, work, device),  # type: ignore[arg-type]
                                finetune_config(args, method, device), train) for method in ("full", "lora")}
    times: dict[str, list[float]] = {method: [] for method in trainers}
    for i in range(args.warmup_steps + args.speed_steps):
        for method, trainer in trainers.items():
            step_time = trainer.train_step().step_time  # ends with loss.item(): the device is synchronised
            if i >= args.warmup_steps:
                times[method].append(step_time)
    return times


def child_command(args: argparse.Namespace, method: str, work: Path) -> list[str]:
    command = [sys.executable, __file__, "--child", "--method", method, "--work", str(work)]
    for name in ("steps", "batch", "seq", "rank", "alpha", "lr_full", "lr_lora", "eval_windows"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--targets", *args.targets]
    if args.device:
        command += ["--device", args.device]
    return command


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                        help="a GPT-2 preset (for a GPU); default: the small shape below")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per method")
    parser.add_argument("--pretrain-steps", type=int, default=30, help="full training of the base model first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", nargs="+", default=list(LORA_DEFAULT_TARGET_MODULES), choices=GPT2_LINEAR_MODULES)
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=1e-3, help="LoRA's usual learning rate is ~10x full's")
    parser.add_argument("--lr-pretrain", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps each left out of tokens/s")
    parser.add_argument("--speed-steps", type=int, default=15, help="steps each timed for tokens/s")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_one(args)))
        return

    device = torch.device(args.device) if args.device else default_device()
    where = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {device} ({where}), threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"fine-tuning: {args.steps} steps of {args.batch} x {args.seq} tokens; full lr {args.lr_full:g}, LoRA lr "
          f"{args.lr_lora:g}, rank {args.rank}, alpha {args.alpha:g}, targets {' '.join(args.targets)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pretrain(args, work, device)
        for method in ("full", "lora"):
            out = subprocess.run(child_command(args, method, work), capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"the {method} run failed:\n{out.stderr}")
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        times = speed(args, work, device)

    full, lora = results["full"], results["lora"]
    peak = {m: r["added_bytes"] for m, r in results.items()}
    peak_total = {m: r["peak_bytes"] for m, r in results.items()}
    tokens = args.batch * args.seq
    rate = {(m, "best"): tokens / min(t) for m, t in times.items()}
    rate.update({(m, "median"): tokens / statistics.median(t) for m, t in times.items()})
    memory_name = "peak CUDA memory (total)" if device.type == "cuda" else "peak RSS added by training"
    rows = [
        ("trainable parameters", f"{full['trainable']:,}", f"{lora['trainable']:,}",
         f"{lora['trainable'] / full['trainable']:.4f}x"),
    ]
    shown = peak_total if device.type == "cuda" else peak
    rows.append((memory_name, mib(shown["full"]), mib(shown["lora"]), f"{shown['lora'] / shown['full']:.2f}x"))
    if device.type == "cuda":
        rows.append(("peak CUDA memory added by training", mib(peak["full"]), mib(peak["lora"]),
                     f"{peak['lora'] / peak['full']:.2f}x"))
    for kind in ("best", "median"):
        a, b = rate["full", kind], rate["lora", kind]
        rows.append((f"training tokens/s ({kind} step)", f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}x"))
    rows += [
        ("validation loss before", f"{full['val_before']:.3f}", f"{lora['val_before']:.3f}", ""),
        ("validation loss after", f"{full['val_after']:.3f}", f"{lora['val_after']:.3f}", ""),
    ]
    print()
    print("| measure | full | LoRA | LoRA / full |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
