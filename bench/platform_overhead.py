"""The platform's overhead on bulk generation: the same prompts through the API, queue, workers and database,
against calling gpt2core.generate directly on the same model, in one run. Prints both throughputs and their
ratio (platform / direct; the target is at least 0.9).

The model has random weights (nothing is downloaded); it is imported through POST /v1/models like a user's
Hugging Face checkpoint. The platform runs on the embedded default (SQLite, filesystem broker) unless
DATABASE_URL / BROKER_URL are set; `--workers` worker processes (default 1: the same compute as the direct run).
Both sides use the same per-prompt seeds, so both generate exactly the same tokens.

    python bench/platform_overhead.py                      # 1,000 prompts, 6-layer 384-wide model
    python bench/platform_overhead.py --prompts 200 --layers 2
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pydoc_data.topics
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.local import LocalPlatform  # noqa: E402
from gpt2jobs_client import Client  # noqa: E402
from gpt2core import GPT2, GPT2Config, GPT2Tokenizer, SamplingParams, generate  # noqa: E402
from workers.generation import item_seed  # noqa: E402

SEED = 1234


def prompts(count: int) -> list[str]:
    """`count` prompts cut from Python's documentation text, 4 to 40 words long."""
    words = " ".join(pydoc_data.topics.topics.values()).split()
    return [" ".join(words[i * 37: i * 37 + 4 + i % 37]) for i in range(count)]


def archive(model_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for file in sorted(model_dir.iterdir()):
            tar.add(file, arcname=file.name)
    return buffer.getvalue()


def direct(model: GPT2, texts: list[str], sampling: dict) -> tuple[float, int]:
    params = [SamplingParams(**{**sampling, "seed": item_seed(SEED, i)}) for i in range(len(texts))]
    start = time.perf_counter()
    results = generate(model, GPT2Tokenizer(), texts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(c.num_tokens for r in results for c in r.completions)


def through_platform(api: Client, model_id: str, texts: list[str], sampling: dict) -> tuple[float, int]:
    start = time.perf_counter()
    job = api.jobs.create(type="generate", model=model_id, prompts=texts, sampling={**sampling, "seed": SEED})
    job = api.jobs.wait(job.id, poll_interval=0.25)
    elapsed = time.perf_counter() - start
    assert job.progress["completed"] == len(texts), job.progress
    return elapsed, sum((r.usage or {}).get("completion_tokens", 0) for r in api.jobs.results(job.id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved; the best is compared")
    parser.add_argument("--var", type=Path, help="keep the platform's database, artifacts and logs here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=args.layers, n_head=args.width // 64, n_embd=args.width, block_size=256)).eval()
    texts = prompts(args.prompts)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 0.8, "top_k": 50}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {model.num_parameters():,} parameters; "
          f"{len(texts)} prompts x {args.max_new_tokens} new tokens; {args.workers} worker(s)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        model.save_pretrained(model_dir)
        var = args.var or Path(scratch) / "var"
        with LocalPlatform(var, workers=args.workers, env={"MAX_INLINE_PROMPTS": str(len(texts))}) as local:
            key = local.run("flask", "--app", "api", "keys", "create", "--owner", "bench").strip().splitlines()[-1]
            api = Client(local.url, key)
            model_archive = Path(scratch) / "model.tar.gz"
            model_archive.write_bytes(archive(model_dir))
            imported = api.models.upload(model_archive, name="bench")
            runs: dict[str, list[tuple[float, int]]] = {"direct": [], "platform": []}
            for repeat in range(args.repeats):
                runs["direct"].append(direct(model, texts, sampling))
                runs["platform"].append(through_platform(api, imported.id, texts, sampling))
                for name, (seconds, tokens) in ((k, v[-1]) for k, v in runs.items()):
                    print(f"run {repeat + 1} {name:8s}: {tokens:,} tokens in {seconds:.1f} s = "
                          f"{tokens / seconds:,.0f} tok/s", flush=True)
    best = {name: max(tokens / seconds for seconds, tokens in values) for name, values in runs.items()}
    if runs["platform"][0][1] != runs["direct"][0][1]:
        print(f"note: token counts differ ({runs['platform'][0][1]} vs {runs['direct'][0][1]})")
    print(f"best: direct gpt2core.generate {best['direct']:,.0f} tok/s; platform (API + queue + worker + "
          f"database) {best['platform']:,.0f} tok/s")
    print(f"ratio platform / direct: {best['platform'] / best['direct']:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
