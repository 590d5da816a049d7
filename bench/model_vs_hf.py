"""gpt2core against transformers' GPT2LMHeadModel (sdpa attention), side by side in one run.

Same random weights, same inputs. Prints tokens/s for each and the ratio (gpt2core / transformers):
  - training: forward + backward + AdamW step; fp32 on CPU; on CUDA bf16 autocast, fused AdamW (both models) and
    gpt2core under torch.compile (--compile, default on CUDA; transformers runs eager). Attention is
    F.scaled_dot_product_attention with is_causal=True, which takes the flash kernel on CUDA (checked on CUDA).
    Then the achieved model TFLOP/s (gpt2core.flops: 6N + 12·L·H·Q·T per token) and MFU against the device's
    dense bf16 peak, looked up by its name (gpt2core.flops.PEAK_BF16) or given with --peak-tflops;
  - generation: --gen-prompts prompts (default 16) of mixed lengths (8 to 200 tokens), --new-tokens new tokens
    each (default 64; end-of-text ignored on both sides, so both make exactly prompts x new tokens), sampling
    (temperature 0.8, top-k 50, top-p 0.95); transformers runs one left-padded batched generate(), gpt2core one
    generate() call (its batch size its default: 32 on CPU, from free memory on CUDA). fp32 on CPU; on CUDA both
    models in bf16 (weights and KV cache), transformers with its default dynamic cache and eager forward, or with
    --hf-static-cache its static cache, whose decode steps it compiles itself (torch.compile, CUDA graphs).

    python bench/model_vs_hf.py                   # gpt2 (124M) preset
    python bench/model_vs_hf.py --preset gpt2 --train-batch 16 --train-seq 1024 --repeats 5   # MFU on a GPU
    python bench/model_vs_hf.py --skip-training --gen-prompts 256 --new-tokens 256 --gen-repeats 3   # GPU generation
"""
from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel

from gpt2core import GPT2, GPT2Config, default_device
from gpt2core.flops import achieved_tflops, find_peak, mfu, num_parameters, training_flops_per_token
from gpt2core.generation import SamplingParams, generate
from gpt2core.tokenizer import GPT2Tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step_fn(model: torch.nn.Module, idx: torch.Tensor, device: torch.device, ours: bool, compile: bool = False):
    # fused: one kernel for all parameters' updates on CUDA, as gpt2core's Trainer does (build_optimizer).
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    forward = torch.compile(model) if compile else model

    def step() -> None:
        with autocast(device):
            loss = forward(idx, targets=idx)[1] if ours else forward(idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(ours: GPT2, theirs: GPT2LMHeadModel, args, device: torch.device) -> tuple[float, float]:
    idx = torch.randint(0, 50257, (args.train_batch, args.train_seq), device=device)
    steps = {
        "ours": train_step_fn(ours.train(), idx, device, True, compile=args.compile),
        "theirs": train_step_fn(theirs.train(), idx, device, False),
    }
    for step in steps.values():  # warm-up: allocator, optimizer state, kernels (and torch.compile's compilation)
        for _ in range(2 if args.compile else 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for name, step in steps.items():
            times[name].append(timed(step, device))
    tokens = idx.numel()
    return tokens / min(times["ours"]), tokens / min(times["theirs"])


def check_flash_attention(model: GPT2, args, device: torch.device) -> str:
    """Which fused attention kernel gpt2core's training forward can take: runs one bf16 forward and backward
    allowed only the flash kernel (SDPA raises when flash cannot serve the call), then only memory-efficient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return "F.scaled_dot_product_attention(is_causal=True), PyTorch's CPU kernel (the CUDA flash kernel is checked on CUDA)"
    idx = torch.randint(0, 50257, (1, args.train_seq), device=device)
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION, "memory-efficient")):
        try:
            with sdpa_kernel([backend]), autocast(device):
                model(idx, targets=idx)[1].backward()
        except RuntimeError as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"  ({name} attention unavailable: {first_line})")
            continue
        finally:
            model.zero_grad(set_to_none=True)
        return f"F.scaled_dot_product_attention(is_causal=True): {name} kernel"
    return "F.scaled_dot_product_attention(is_causal=True): math kernel (no fused kernel for these inputs)"


def peak_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The peak TFLOP/s to compute MFU against, and where it came from (or why there is none)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, (f"MFU not computed: the device is {device.type}, and gpt2core.flops' peak table has "
                      "NVIDIA GPUs only (give --peak-tflops)")
    name = torch.cuda.get_device_name(device)
    row = find_peak(name)
    if row is None:
        return None, f"MFU not computed: no peak for {name!r} in gpt2core.flops.PEAK_BF16 (give --peak-tflops)"
    if row.tflops is None:
        return None, f"MFU not computed: {name} ({row.device}) has no bf16 tensor cores: {row.source}"
    return row.tflops, f"{row.device} dense bf16 peak, {row.source}"


def mixed_prompts(tok: GPT2Tokenizer, count: int = 16, shortest: int = 8, longest: int = 200) -> list[list[int]]:
    """`count` prompts of lengths evenly spread over [shortest, longest] tokens, cut 1,000 tokens apart from
    Python's documentation (closer when that is too short for them all: about 140,000 tokens)."""
    import pydoc_data.topics

    corpus = tok.encode("\n".join(pydoc_data.topics.topics.values()))
    lengths = torch.linspace(shortest, longest, count).round().long().tolist()
    step = min(1000, (len(corpus) - longest) // count)
    return [corpus[i * step : i * step + n] for i, n in enumerate(lengths)]


class EngineLog(logging.Handler):
    """Keeps gpt2core.generation's last summary line (slots, rounds, CUDA graphs)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last = "step by step (CPU engine)"
        logger = logging.getLogger("gpt2core.generation")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


def hf_generate_fn(theirs: GPT2LMHeadModel, input_ids, attention_mask, new_tokens: int, pad: int, static: bool):
    kwargs = dict(cache_implementation="static") if static else {}

    def run() -> torch.Tensor:
        return theirs.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=0.8,
                               top_k=50, top_p=0.95, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=pad, **kwargs)

    return run


def bench_generation(ours: GPT2, theirs: GPT2LMHeadModel, args, device: torch.device) -> tuple[float, float, str]:
    tok = GPT2Tokenizer()
    prompts = mixed_prompts(tok, args.gen_prompts)
    new_tokens = args.new_tokens
    params = SamplingParams(
        max_new_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=0, ignore_eos=True
    )
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), tok.eot_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p)
        attention_mask[row, width - len(p) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        ours.to(torch.bfloat16), theirs.to(torch.bfloat16)  # (after training, which keeps fp32 master weights)
    engine = EngineLog()

    def run_ours() -> None:
        results = generate(ours, tok, prompts, params)
        assert all(len(r.completions[0].token_ids) == new_tokens for r in results)

    hf_mode = "dynamic cache, eager"
    generate_theirs = hf_generate_fn(theirs, input_ids, attention_mask, new_tokens, tok.eot_id, False)
    if args.hf_static_cache:
        try:
            with torch.inference_mode():
                static = hf_generate_fn(theirs, input_ids, attention_mask, new_tokens, tok.eot_id, True)
                static()  # compiles
            generate_theirs = static
            hf_mode = "static cache" + (", decode compiled by generate()" if device.type == "cuda" else "")
        except Exception as error:  # an unsupported combination: fall back to the plain call
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"  (transformers' static cache failed, plain generate() measured instead: {first_line})")

    def run_theirs() -> None:
        out = generate_theirs()
        assert out.shape[1] == width + new_tokens

    runs = {"ours": run_ours, "theirs": run_theirs}
    ours.eval(), theirs.eval()
    with torch.inference_mode():
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.gen_repeats or args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, device))
    tokens = len(prompts) * new_tokens
    dtype = str(ours.transformer.wte.weight.dtype).removeprefix("torch.")
    setup = f"{dtype}; gpt2core: {engine.last}; transformers: {hf_mode}"
    return tokens / min(times["ours"]), tokens / min(times["theirs"]), setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-repeats", type=int, help="repeats of the generation comparison (default --repeats)")
    parser.add_argument("--hf-static-cache", action="store_true", help="transformers with its static cache (and "
                        "the compilation generate() then does on CUDA) instead of its default dynamic cache")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU, instead of the "
                        "dense bf16 peak looked up by the device's name (gpt2core.flops.PEAK_BF16; H100 SXM: 989)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile gpt2core's training step (default: on CUDA only)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()

    device = default_device()
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as gpt2core's Trainer: fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    ours = GPT2(GPT2Config.preset(args.preset)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").to(device)
    cpu = platform.processor() or platform.machine()
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu}), "
          f"threads: {torch.get_num_threads()}, torch {torch.__version__}, preset {args.preset}")
    if not args.skip_training:
        print(f"attention: {check_flash_attention(ours, args, device)}")
        a, b = bench_training(ours, theirs, args, device)
        setup = ("fp32" if device.type != "cuda" else "bf16 autocast, fused AdamW") + (
            ", gpt2core compiled (transformers eager)" if args.compile else ", both eager")
        print(f"training   (B={args.train_batch}, T={args.train_seq}; {setup}): gpt2core {a:9.1f} tok/s   "
              f"transformers {b:9.1f} tok/s   ratio {a / b:.2f}x")
        flops = training_flops_per_token(ours.config, args.train_seq)
        n = num_parameters(ours.config, non_embedding=True)
        print(f"model FLOPs per token: {flops / 1e9:.3f} GFLOP (6N + 12·L·H·Q·T, N = {n / 1e6:.2f}M without the "
              f"position embedding, T = {args.train_seq})")
        peak, why = peak_for(device, args.peak_tflops)
        for label, tokens_per_second in (("gpt2core", a), ("transformers", b)):
            utilization = f", MFU {mfu(tokens_per_second, flops, peak):.1%}" if peak else ""
            print(f"{label} training: {achieved_tflops(tokens_per_second, flops):.4g} TFLOP/s achieved{utilization}")
        print(f"peak: {peak} TFLOP/s ({why})" if peak else why)
    if not args.skip_generation:
        a, b, setup = bench_generation(ours, theirs, args, device)
        print(f"generation ({args.gen_prompts} prompts, 8-200 tokens, {args.new_tokens} new; {setup}): "
              f"gpt2core {a:9.1f} tok/s   transformers {b:9.1f} tok/s   ratio {a / b:.2f}x", flush=True)


if __name__ == "__main__":
    main()
