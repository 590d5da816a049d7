"""`python -m gpt2core demo`: train a small GPT-2 on Python's own documentation text, then generate from it.

Everything it needs ships with Python and this package: the corpus is `pydoc_data.topics` (about 465 kB of
English), the tokenizer is the exact GPT-2 BPE. Runs on CPU in a few minutes.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import pydoc_data.topics

from . import GPT2, GPT2Config, GPT2Tokenizer, SamplingParams, Trainer, TrainConfig, generate, load_dataset, prepare_dataset
from .device import default_device
from .train import StepMetrics, TrainerCallback

PROMPTS = ["The for statement", "Exceptions are", "A class definition"]


class ProgressPrinter(TrainerCallback):
    def __init__(self, every: int, max_steps: int):
        self.every = every
        self.max_steps = max_steps

    def on_step(self, metrics: StepMetrics) -> None:
        if metrics.step % self.every == 0 or metrics.step == self.max_steps:
            print(
                f"step {metrics.step:4d}/{self.max_steps}  loss {metrics.loss:.3f}  "
                f"lr {metrics.learning_rate:.2e}  {metrics.tokens_per_second:,.0f} tok/s",
                flush=True,
            )

    def on_eval(self, step: int, val_loss: float, perplexity: float, accuracy: float | None) -> None:
        shown = f"  token accuracy {accuracy:.1%}" if accuracy is not None else ""
        print(f"step {step:4d}  val loss {val_loss:.3f}  perplexity {perplexity:.1f}{shown}", flush=True)


def unigram_entropy(tokens) -> float:
    counts = Counter(tokens.tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def demo(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "pydoc_topics.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    print(f"device: {default_device()}; corpus: {corpus} ({corpus.stat().st_size:,} bytes)", flush=True)

    info = prepare_dataset([corpus], out / "dataset", val_fraction=0.05)
    dataset = load_dataset(out / "dataset")
    print(f"dataset: {info.train_tokens:,} train tokens, {info.val_tokens:,} val tokens; "
          f"unigram entropy {unigram_entropy(dataset.train):.2f} nats (a model that learns nothing gets no lower)")

    config = GPT2Config(n_layer=4, n_head=4, n_embd=128, block_size=128)
    model = GPT2(config)
    print(f"model: {model.num_parameters():,} parameters ({config.n_layer} layers, {config.n_embd} wide)")
    train_config = TrainConfig(
        max_steps=args.steps,
        batch_size=8,
        learning_rate=3e-3,
        warmup_steps=args.steps // 10,
        eval_every=max(args.steps // 4, 1),
        checkpoint_every=max(args.steps // 2, 1),
        checkpoint_dir=out / "checkpoints",
        keep_last_checkpoints=1,
        seed=0,
    )
    started = time.perf_counter()
    result = Trainer(model, train_config, dataset.train, dataset.val, [ProgressPrinter(25, args.steps)]).fit()
    print(f"trained {result.steps} steps in {time.perf_counter() - started:.0f} s; "
          f"val loss {result.val_loss:.3f} (perplexity {result.perplexity:.1f})")

    model.save_pretrained(out / "model")
    print(f"model saved in Hugging Face format: {out / 'model'}")
    results = generate(model, GPT2Tokenizer(), PROMPTS, SamplingParams(max_new_tokens=40, temperature=0.7, top_k=40, seed=1))
    for r in results:
        c = r.completions[0]
        print(f"\n--- {r.prompt!r} ({c.num_tokens} tokens, {c.finish_reason})\n{r.prompt}{c.text}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt2core")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help=__doc__.splitlines()[0])
    demo_parser.add_argument("--steps", type=int, default=200)
    demo_parser.add_argument("--out", default="var/demo")
    args = parser.parse_args()
    if args.command == "demo":
        demo(args)


if __name__ == "__main__":
    main()
