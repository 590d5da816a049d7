"""The GPU paths: bf16 autocast, fused AdamW, flash attention, torch.compile, exactness against transformers,
and generation (bf16 weights and cache, sampling on the device, CUDA graphs, batch size from free memory), on a
CUDA device.

Every test is marked ``cuda`` and skipped without a CUDA device, so this file is collected (and skipped) on CPU
machines. On a GPU: ``python -m pytest -m cuda -q tests/test_cuda.py`` (bench/gpu_checks.sh runs it with
--noconftest: the fixtures this file needs are its own, so it runs without the platform's dependencies).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from gpt2core import GPT2, GPT2Config, GPT2Tokenizer
from gpt2core import generation
from gpt2core.generation import SamplingParams, generate
from gpt2core.train import TrainConfig, Trainer
from tests.test_hf_interop import SHAPES, hf_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(autouse=True)
def restore_tf32():
    """The Trainer allows TF32 matmuls process-wide on CUDA; put the flags back after each test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(seed: int = 0, **overrides) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(**{"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128, **overrides}))


def repeated_text(tokenizer) -> np.ndarray:
    return np.array(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 100), dtype=np.uint16)


def test_trainer_on_cuda_uses_bf16_autocast_and_fused_adamw_and_learns(tokenizer):
    model = tiny_model()
    cfg = TrainConfig(max_steps=20, batch_size=8, block_size=32, learning_rate=3e-3, warmup_steps=3, device="cuda",
                      dtype="auto")
    trainer = Trainer(model, cfg, repeated_text(tokenizer))
    bf16 = torch.cuda.is_bf16_supported()
    assert trainer.autocast_dtype == (torch.bfloat16 if bf16 else None)
    assert trainer.optimizer.defaults["fused"] is True
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights

    logit_dtypes: set[torch.dtype] = set()
    hook = model.lm_head.register_forward_hook(lambda module, args, out: logit_dtypes.add(out.dtype))
    try:
        result = trainer.fit()
    finally:
        hook.remove()
    assert logit_dtypes == {torch.bfloat16 if bf16 else torch.float32}  # the forward really ran under autocast

    losses = result.losses
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert losses[0] > 10  # ln(50257) = 10.8 at initialisation
    # A 10-token cycle, quickly learnt (on CPU, fp32 and bf16 alike: 10.75 -> 6.5, means of 5 steps 3.4 apart).
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 2 and losses[-1] < losses[0] - 3
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_attention_takes_the_flash_kernel():
    """With only the flash kernel allowed, F.scaled_dot_product_attention raises when flash cannot serve the call;
    gpt2core's training forward (is_causal, no mask) under bf16 autocast must not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash attention needs compute capability 8.0 or newer")
    model = tiny_model().cuda().train()
    idx = torch.randint(0, 50257, (4, 128), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, targets=idx)
        loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers_on_cuda_in_float32(shape, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 matmuls on both sides
    torch.backends.cudnn.allow_tf32 = False
    reference = hf_model(**shape)
    reference.save_pretrained(tmp_path)
    reference = reference.cuda()
    model = GPT2.from_pretrained(tmp_path).cuda().eval()
    idx = torch.randint(0, 50257, (2, shape["block_size"]), device="cuda")
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = reference(idx).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_compiled_training_loss_equals_eager(tokenizer):
    data = repeated_text(tokenizer)

    def run(compile: bool) -> tuple[Trainer, list[float]]:
        cfg = TrainConfig(max_steps=3, batch_size=4, block_size=64, learning_rate=1e-3, warmup_steps=0, device="cuda",
                          dtype="float32", compile=compile)
        trainer = Trainer(tiny_model(), cfg, data)
        return trainer, trainer.fit().losses

    compiled, compiled_losses = run(compile=True)
    assert isinstance(compiled.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    _, eager_losses = run(compile=False)
    assert len(compiled_losses) == len(eager_losses) == 3
    for a, b in zip(compiled_losses, eager_losses):
        assert abs(a - b) < 1e-3, (compiled_losses, eager_losses)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_generation_on_cuda_returns_the_requested_token_counts(tokenizer, bf16):
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")
    model = tiny_model().cuda().eval()
    prompts = ["Hello", "Once upon a time there was", "", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    counts = [1, 7, 32, 64]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.8, top_k=50, top_p=0.95, seed=i, ignore_eos=True, n=1 + i % 2)
        for i, n in enumerate(counts)
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        results = generate(model, tokenizer, prompts, params, max_batch_size=3)  # fewer slots than completions
    assert [r.index for r in results] == list(range(len(prompts)))
    for result, n, p in zip(results, counts, params):
        assert len(result.completions) == p.n
        for completion in result.completions:
            assert completion.num_tokens == n and completion.finish_reason == "length"
            assert all(0 <= t < 50257 for t in completion.token_ids)


PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "A", "In 1492, Columbus sailed the ocean blue.",
           "def main():", "Once upon a time", "import torch", "The capital of France is"]


def perturbed_model(seed: int = 0, **overrides) -> GPT2:
    """The tiny model with its blocks perturbed (as tests/test_generate.py's), so greedy text varies."""
    model = tiny_model(seed, **overrides)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def outputs(results):
    return [[(c.token_ids, c.text, c.finish_reason) for c in r.completions] for r in results]


def bf16_or_skip() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")


def test_bf16_greedy_generation_agrees_with_float32(tokenizer):
    """bf16 weights and KV cache (logits and sampling in float32/float64): the first greedy tokens agree with
    float32's, and most tokens do (bf16's rounding moves a near tie now and then, and a text differs after)."""
    bf16_or_skip()
    torch.backends.cuda.matmul.allow_tf32 = False
    model = perturbed_model().cuda()
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    full = [r.completions[0].token_ids for r in generate(model, tokenizer, PROMPTS, params)]
    model.to(torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    half = [r.completions[0].token_ids for r in generate(model, tokenizer, PROMPTS, params)]
    assert all(len(t) == 16 for t in half)
    assert sum(a[0] == b[0] for a, b in zip(full, half)) >= 6, (full, half)
    assert sum(x == y for a, b in zip(full, half) for x, y in zip(a, b)) >= 0.6 * 16 * len(PROMPTS), (full, half)


def test_sampled_tokens_for_a_seed_match_the_cpu(tokenizer):
    """The uniforms come from (seed, step) alone, on any device: float32 on CUDA (no TF32) draws what the CPU
    draws, up to the rare token whose draw falls within float error of a boundary."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = perturbed_model()
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=3, ignore_eos=True)
    on_cpu = outputs(generate(model, tokenizer, PROMPTS, params))
    on_cuda = outputs(generate(model.cuda(), tokenizer, PROMPTS, params))
    assert sum(a == b for a, b in zip(on_cpu, on_cuda)) >= len(PROMPTS) - 1


def test_cuda_graph_replay_gives_the_eager_tokens(tokenizer, caplog):
    """Decode steps replayed from CUDA graphs (one per attention width and sampling plan) produce exactly the
    tokens of the same steps run eagerly: mixed sampling settings, stop strings, varied lengths, n > 1, more
    completions than slots (prefill between rounds), and sequences crossing width buckets (128 to 384)."""
    bf16_or_skip()
    model = perturbed_model(block_size=512).cuda().to(torch.bfloat16)
    prompts = [p * (1 + 12 * (i % 3)) for i, p in enumerate(PROMPTS * 2)]  # prompts of up to 250 tokens
    params = [
        SamplingParams(max_new_tokens=40 + 12 * (i % 4), temperature=0.9 if i % 2 else 0, top_k=20 * (i % 3),
                       top_p=0.9 if i % 3 == 1 else 1.0, repetition_penalty=1.3 if i % 5 == 2 else 1.0,
                       n=1 + (i % 4 == 3), seed=i, stop=["e"] if i % 7 == 1 else None)
        for i in range(len(prompts))
    ]
    eager = outputs(generate(model, tokenizer, prompts, params, max_batch_size=6, cuda_graphs=False))
    with caplog.at_level(logging.INFO, logger="gpt2core.generation"):
        graphed = outputs(generate(model, tokenizer, prompts, params, max_batch_size=6, cuda_graphs=True))
    assert graphed == eager
    assert any("CUDA graphs replayed" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    reasons = {c[2] for r in eager for c in r}
    assert reasons == {"stop", "length"}
    # The same requests a few at a time (other slots, other batch companions): the same tokens but for bf16's
    # batch-dependent rounding, which moves a token now and then.
    few = outputs(generate(model, tokenizer, prompts[:4], params[:4], max_batch_size=2, cuda_graphs=True))
    assert sum(a == b for a, b in zip(few, eager[:4])) >= 2


def test_batch_size_from_free_memory_is_sane(tokenizer):
    """generate(max_batch_size=None) on CUDA takes as many slots as free memory holds: their KV caches fit in
    it, a longer max_len gives fewer, and generation with it works."""
    bf16_or_skip()
    model = GPT2(GPT2Config.preset("gpt2")).cuda().to(torch.bfloat16).eval()
    free, total = torch.cuda.mem_get_info()
    slots = generation.auto_batch_size(model, 456)
    kv_per_slot = 2 * 12 * 768 * 512 * 2  # 456 tokens -> 512 cache columns, bf16
    assert 1 <= slots <= generation.MAX_AUTO_BATCH
    assert slots * kv_per_slot < free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if free > 8 * 2**30:
        assert slots >= 64, slots
    assert generation.auto_batch_size(model, 1024) <= slots
    results = generate(model, tokenizer, PROMPTS * 8, SamplingParams(max_new_tokens=8, seed=0, ignore_eos=True))
    assert all(c.num_tokens == 8 for r in results for c in r.completions)


def test_worker_loads_generation_models_in_bf16_on_cuda(tmp_path):
    bf16_or_skip()
    workers_generation = pytest.importorskip("workers.generation")  # needs the platform's dependencies
    tiny_model().save_pretrained(tmp_path)
    model = workers_generation.for_generation(GPT2.from_pretrained(tmp_path).eval(), torch.device("cuda"))
    assert model.device.type == "cuda" and model.transformer.wte.weight.dtype == torch.bfloat16
    assert workers_generation.batch_prompts(model) >= workers_generation.BATCH_PROMPTS
