"""Two versions of gpt2core's generation side by side in one process: the working tree's package and a
single-file copy of an older one (before the CUDA engine: `git show 196adc9:gpt2core/generation.py >
/tmp/generation_old.py`), on the same model,
prompts and settings, their runs alternated (old, new, old, new, ...) so machine load hits both alike. Prints the
best seconds of each and new/old throughput ratios (above 1: the new one is faster): of the best runs, and the
median of each pair's ratio (pairs run in alternating order, so load drifting during a pair evens out).

Outputs: greedy completions must agree token for token; sampled ones are only compared by token count (the
versions may draw different uniforms for a seed), end-of-text ignored so both generate the same work.

    python bench/generation_ab.py --old /tmp/generation_old.py            # CPU: 6 layers x 384, 16 and 64 prompts
    python bench/generation_ab.py --old /tmp/generation_old.py --prompts 32 --repeats 7
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2core import GPT2, GPT2Config, GPT2Tokenizer  # noqa: E402
from gpt2core import generation as new  # noqa: E402


def load_old(path: Path):
    """The other copy as module gpt2core._generation_old (its relative imports resolve inside gpt2core)."""
    spec = importlib.util.spec_from_file_location("gpt2core._generation_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prompts(tok: GPT2Tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of 8 to 64 tokens cut from Python's documentation."""
    import pydoc_data.topics

    corpus = tok.encode("\n".join(pydoc_data.topics.topics.values()))
    return [corpus[i * 997 : i * 997 + 8 + (i * 13) % 57] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the other generation.py")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    old = load_old(args.old)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=args.layers, n_head=args.width // 64, n_embd=args.width)).eval()
    tok = GPT2Tokenizer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.layers} layers x {args.width} "
          f"({model.num_parameters():,} parameters); {args.new_tokens} new tokens; best/median of {args.repeats} "
          "alternated runs", flush=True)
    for count in args.prompts:
        batch = prompts(tok, count)
        for mode, extra in (("sampling", dict(temperature=0.8, top_k=50, top_p=0.95)), ("greedy", dict(temperature=0))):
            runs = {}
            for name, module in (("old", old), ("new", new)):
                params = module.SamplingParams(max_new_tokens=args.new_tokens, seed=0, ignore_eos=True, **extra)
                runs[name] = (module, params)
            outputs: dict[str, list] = {}
            times: dict[str, list[float]] = {"old": [], "new": []}
            for name, (module, params) in runs.items():  # warm-up (and the outputs to compare)
                outputs[name] = [[c.token_ids for c in r.completions] for r in module.generate(model, tok, batch, params)]
            for repeat in range(args.repeats):  # pairs, in alternating order (old-new, new-old, ...)
                for name in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
                    module, params = runs[name]
                    start = time.perf_counter()
                    module.generate(model, tok, batch, params)
                    times[name].append(time.perf_counter() - start)
            tokens = count * args.new_tokens
            assert all(len(c) == args.new_tokens for out in outputs.values() for r in out for c in r)
            same = outputs["old"] == outputs["new"]
            if mode == "greedy" and not same:
                print("  WARNING: greedy outputs differ between old and new")
            best = {k: min(v) for k, v in times.items()}
            pairs = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
            print(f"{count:3d} prompts, {mode:8s}: old {best['old']:.2f} s ({tokens / best['old']:.0f} tok/s), new "
                  f"{best['new']:.2f} s ({tokens / best['new']:.0f} tok/s); new/old throughput: best "
                  f"{best['old'] / best['new']:.3f}, median of pairs {pairs:.3f}{'; same tokens' if same else ''}",
                  flush=True)


if __name__ == "__main__":
    main()
