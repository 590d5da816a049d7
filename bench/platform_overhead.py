"""The platform's overhead on bulk generation: the same prompts through the API, queue, workers and database,
against calling gpt2core.generate directly on the same model, in one run. Prints both throughputs and their
ratio (platform / direct; the target is at least 0.9).

The model has random weights (nothing is downloaded); it is imported through POST /v1/models like a user's
Hugging Face checkpoint. The platform runs on the embedded default (SQLite, filesystem broker) unless
DATABASE_URL / BROKER_URL are set; `--workers` worker processes (default 1: the same compute as the direct run).
Both sides use the same per-prompt seeds, so on CPU both generate exactly the same tokens (on CUDA, up to bf16's
batch-dependent rounding).

On CUDA (--device, default: CUDA when there is one) the worker loads the model onto the GPU in bf16 as it does
for any generation job (workers.generation.for_generation), and the direct call gets the same bf16 model. The
platform's shard size (GENERATION_SHARD_SIZE, --shard-size) bounds what one generate() call of a worker gets; on a
GPU a shard should hold at least a batch's worth (gpu_checks.sh runs one shard of all 1,000 prompts), or the
worker decodes fewer completions per step than the direct call.

    python bench/platform_overhead.py                      # 1,000 prompts, 6-layer 384-wide model, 32 new tokens
    python bench/platform_overhead.py --prompts 200 --layers 2
    python bench/platform_overhead.py --preset gpt2 --new-tokens 256 --device cuda --shard-size 1000 --repeats 3
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
from workers.generation import for_generation, item_seed  # noqa: E402

SEED = 1234


def prompts(count: int) -> list[str]:
    """`count` prompts cut from Python's documentation text, 4 to 40 words long."""
    words = " ".join(pydoc_data.topics.topics.values()).split()
    return [" ".join(words[i * 37: i * 37 + 4 + i % 37]) for i in range(count)]


def archive(model_dir: Path) -> bytes:
    """An uncompressed tar (compressing a 500 MB checkpoint of random weights takes long and gains nothing)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(model_dir.iterdir()):
            tar.add(file, arcname=file.name)
    return buffer.getvalue()


def direct(model: GPT2, texts: list[str], sampling: dict) -> tuple[float, int]:
    params = [SamplingParams(**{**sampling, "seed": item_seed(SEED, i)}) for i in range(len(texts))]
    start = time.perf_counter()
    results = generate(model, GPT2Tokenizer(), texts, params)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if model.device.type == "cuda":  # the worker (another process) sizes its batch on the device's free memory
        torch.cuda.empty_cache()
    return elapsed, sum(c.num_tokens for r in results for c in r.completions)


def through_platform(api: Client, model_id: str, texts: list[str], sampling: dict,
                     poll_interval: float) -> tuple[float, int]:
    start = time.perf_counter()
    job = api.jobs.create(type="generate", model=model_id, prompts=texts, sampling={**sampling, "seed": SEED})
    job = api.jobs.wait(job.id, poll_interval=poll_interval)
    elapsed = time.perf_counter() - start
    assert job.progress["completed"] == len(texts), job.progress
    return elapsed, sum((r.usage or {}).get("completion_tokens", 0) for r in api.jobs.results(job.id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--new-tokens", "--max-new-tokens", dest="new_tokens", type=int, default=32)
    parser.add_argument("--preset", help="a GPT-2 preset (gpt2, gpt2-medium, ...) instead of --layers x --width")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when there is a GPU (the workers are told the same, GPT2CORE_DEVICE)")
    parser.add_argument("--shard-size", type=int, help="the platform's GENERATION_SHARD_SIZE (default: its own, 128)")
    parser.add_argument("--poll-interval", type=float, help="seconds between the client's looks at the job "
                        "(default 0.25 on CPU; 0.05 on CUDA, where the whole run takes a few seconds)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved; the best is compared")
    parser.add_argument("--var", type=Path, help="keep the platform's database, artifacts and logs here")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    poll_interval = args.poll_interval or (0.05 if device.type == "cuda" else 0.25)
    texts = prompts(args.prompts)
    longest = max(len(ids) for ids in GPT2Tokenizer().encode_batch(texts))
    torch.manual_seed(0)
    if args.preset:
        config = GPT2Config.preset(args.preset)
    else:
        block_size = max(256, -(-(longest + args.new_tokens) // 64) * 64)
        config = GPT2Config(n_layer=args.layers, n_head=args.width // 64, n_embd=args.width, block_size=block_size)
    model = GPT2(config).eval()
    sampling = {"max_new_tokens": args.new_tokens, "temperature": 0.8, "top_k": 50}
    env = {"MAX_INLINE_PROMPTS": str(len(texts)), "GPT2CORE_DEVICE": device.type}
    if args.shard_size:
        env["GENERATION_SHARD_SIZE"] = str(args.shard_size)
    on = (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{on}, torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.preset or 'custom'} "
          f"{model.num_parameters():,} parameters; {len(texts)} prompts (up to {longest} tokens) x {args.new_tokens} "
          f"new tokens; {args.workers} worker(s), shards of {args.shard_size or 'the default size'}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        model.save_pretrained(model_dir)
        model = for_generation(model, device)  # as the worker loads it: bf16 on a GPU that has it
        print(f"direct and worker: {model.transformer.wte.weight.dtype} on {model.device}", flush=True)
        var = args.var or Path(scratch) / "var"
        with LocalPlatform(var, workers=args.workers, env=env) as local:
            key = local.run("flask", "--app", "api", "keys", "create", "--owner", "bench").strip().splitlines()[-1]
            api = Client(local.url, key)
            model_archive = Path(scratch) / "model.tar"
            model_archive.write_bytes(archive(model_dir))
            imported = api.models.upload(model_archive, name="bench")
            runs: dict[str, list[tuple[float, int]]] = {"direct": [], "platform": []}
            for repeat in range(args.repeats):
                runs["direct"].append(direct(model, texts, sampling))
                runs["platform"].append(through_platform(api, imported.id, texts, sampling, poll_interval))
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
