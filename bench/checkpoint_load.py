"""Loading a checkpoint: what the one GPT-2 checkpoint check costs, against transformers' from_pretrained.

The same gpt2-preset checkpoint (random weights, model.safetensors) is loaded in one run by:
  - gpt2core.checkpoint.check_checkpoint without values (config + headers: what every import and load reads),
  - check_checkpoint with values (every weight read once for NaN/infinity, numpy on raw bits, no torch),
  - GPT2.from_pretrained (runs the full check, then loads),
  - transformers' GPT2LMHeadModel.from_pretrained (no value check),
and prints seconds and ratios against transformers. Best of the repeats, interleaved.

    python bench/checkpoint_load.py --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from gpt2core import GPT2, GPT2Config
from gpt2core.checkpoint import check_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        torch.manual_seed(0)
        GPT2(GPT2Config.preset(args.preset)).save_pretrained(folder)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{args.preset}: {size / 1e6:.0f} MB in {folder.name}/")
        cases = {
            "check (headers)": lambda: check_checkpoint(folder, check_values=False),
            "check (headers + values)": lambda: check_checkpoint(folder),
            "gpt2core from_pretrained": lambda: GPT2.from_pretrained(folder),
            "transformers from_pretrained": lambda: GPT2LMHeadModel.from_pretrained(folder),
        }
        best = {name: float("inf") for name in cases}
        for _ in range(args.repeats):
            for name, load in cases.items():
                start = time.perf_counter()
                load()
                best[name] = min(best[name], time.perf_counter() - start)
        peer = best["transformers from_pretrained"]
        for name, seconds in best.items():
            print(f"{name:30s} {seconds:7.3f} s   {seconds / peer:5.2f}x transformers   "
                  f"{size / seconds / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    main()
