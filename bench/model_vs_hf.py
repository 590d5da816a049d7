"""gpt2core against transformers' GPT2LMHeadModel (sdpa attention), side by side in one run.

Same random weights, same inputs. Prints tokens/s for each and the ratio (gpt2core / transformers):
  - training: forward + backward + AdamW step, fp32 on CPU (bf16 autocast on CUDA);
  - generation: 16 prompts of mixed lengths (8 to 200 tokens), 64 new tokens each, sampling
    (temperature 0.8, top-k 50, top-p 0.95); transformers runs one left-padded batched generate().

    python bench/model_vs_hf.py                   # gpt2 (124M) preset
    python bench/model_vs_hf.py --preset gpt2 --train-batch 4 --train-seq 256 --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel

from gpt2core import GPT2, GPT2Config, default_device
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


def train_step_fn(model: torch.nn.Module, idx: torch.Tensor, device: torch.device, ours: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        with autocast(device):
            loss = model(idx, targets=idx)[1] if ours else model(idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(ours: GPT2, theirs: GPT2LMHeadModel, args, device: torch.device) -> tuple[float, float]:
    idx = torch.randint(0, 50257, (args.train_batch, args.train_seq), device=device)
    steps = {"ours": train_step_fn(ours.train(), idx, device, True), "theirs": train_step_fn(theirs.train(), idx, device, False)}
    for step in steps.values():  # warm-up: allocator, optimizer state, kernels
        step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for name, step in steps.items():
            times[name].append(timed(step, device))
    tokens = idx.numel()
    return tokens / min(times["ours"]), tokens / min(times["theirs"])


def training_flops_per_token(model: GPT2, seq_len: int) -> float:
    """nanoGPT's (PaLM appendix B) estimate: 6 per parameter plus attention, forward and backward."""
    c = model.config
    return 6 * model.num_parameters() + 12 * c.n_layer * c.n_embd * seq_len


def mixed_prompts(tok: GPT2Tokenizer, count: int = 16, shortest: int = 8, longest: int = 200) -> list[list[int]]:
    import pydoc_data.topics

    corpus = tok.encode("\n".join(pydoc_data.topics.topics.values()))
    lengths = torch.linspace(shortest, longest, count).round().long().tolist()
    return [corpus[i * 1000 : i * 1000 + n] for i, n in enumerate(lengths)]


def bench_generation(ours: GPT2, theirs: GPT2LMHeadModel, args, device: torch.device) -> tuple[float, float]:
    tok = GPT2Tokenizer()
    prompts = mixed_prompts(tok)
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

    def run_ours() -> None:
        results = generate(ours, tok, prompts, params)
        assert all(len(r.completions[0].token_ids) == new_tokens for r in results)

    def run_theirs() -> None:
        out = theirs.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=0.8,
            top_k=50,
            top_p=0.95,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.eot_id,
        )
        assert out.shape[1] == width + new_tokens

    runs = {"ours": run_ours, "theirs": run_theirs}
    ours.eval(), theirs.eval()
    with torch.inference_mode(), autocast(device):
        for run in runs.values():
            run()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, device))
    tokens = len(prompts) * new_tokens
    return tokens / min(times["ours"]), tokens / min(times["theirs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, to print MFU "
                        "(H100 SXM bf16 dense: 989)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()

    device = default_device()
    torch.manual_seed(0)
    ours = GPT2(GPT2Config.preset(args.preset)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").to(device)
    cpu = platform.processor() or platform.machine()
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu}), "
          f"threads: {torch.get_num_threads()}, torch {torch.__version__}, preset {args.preset}")
    if not args.skip_training:
        a, b = bench_training(ours, theirs, args, device)
        print(f"training   (B={args.train_batch}, T={args.train_seq}): gpt2core {a:9.1f} tok/s   "
              f"transformers {b:9.1f} tok/s   ratio {a / b:.2f}x")
        achieved = a * training_flops_per_token(ours, args.train_seq) / 1e12
        mfu = f", MFU {achieved / args.peak_tflops:.1%}" if args.peak_tflops else ""
        print(f"gpt2core training: {achieved:.2f} TFLOP/s achieved{mfu}")
    if not args.skip_generation:
        a, b = bench_generation(ours, theirs, args, device)
        print(f"generation (16 prompts, 8-200 tokens, {args.new_tokens} new): gpt2core {a:9.1f} tok/s   "
              f"transformers {b:9.1f} tok/s   ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
