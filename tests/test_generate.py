import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2core import generation
from gpt2core.generation import engine
from gpt2core.generation.seeds import _completion_seed, _int64
from gpt2core.generation import (
    Completion,
    GenerationResult,
    PromptTooLongError,
    SamplingParams,
    generate,
    sample,
)

EOT = 50256
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog",
    "A",
    "In 1492, Columbus sailed the ocean blue.",
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=7)


@pytest.fixture
def model(tiny_model):
    """The tiny model with its blocks perturbed, so greedy text doesn't just repeat the last token."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return tiny_model


@pytest.fixture
def eot_model(model):
    """Raises the end-of-text logit so sampled completions end at varied lengths."""
    e = model.transformer.wte.weight[EOT]
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(8 * e / e.norm() ** 2)
    return model


@pytest.fixture
def hf_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    return GPT2LMHeadModel.from_pretrained(tmp_path).eval()


def token_ids(results):
    return [[c.token_ids for c in r.completions] for r in results]


def hf_generate(hf_model, prompt_ids, **kwargs):
    """transformers' batched generate on left-padded prompts; the new tokens of each row."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), EOT)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, pad_token_id=EOT, **kwargs)
    return out[:, width:].tolist()


def test_greedy_matches_transformers(model, tokenizer, hf_model):
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    results = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    expected = hf_generate(hf_model, prompt_ids, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    assert [r.completions[0].token_ids for r in results] == expected
    assert [r.prompt_token_ids for r in results] == prompt_ids


def test_repetition_penalty_matches_transformers(model, tokenizer, hf_model):
    params = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.5, ignore_eos=True)
    results = generate(model, tokenizer, PROMPTS, params)
    # transformers penalises left padding too, so its prompts run one at a time.
    for prompt, result in zip(PROMPTS, results):
        expected = hf_generate(
            hf_model,
            [tokenizer.encode(prompt)],
            do_sample=False,
            repetition_penalty=1.5,
            max_new_tokens=20,
            min_new_tokens=20,
        )
        assert result.completions[0].token_ids == expected[0]
    plain = generate(model, tokenizer, PROMPTS, GREEDY)
    assert token_ids(results) != token_ids(plain)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_prompt_alone_equals_prompt_in_batch(model, tokenizer, params):
    batched = generate(model, tokenizer, PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer, [prompt], params)
        assert token_ids(alone) == token_ids(batched[i : i + 1])


def test_seeds(model, tokenizer):
    first = generate(model, tokenizer, PROMPTS, SAMPLED)
    again = generate(model, tokenizer, PROMPTS, SAMPLED)
    other = generate(model, tokenizer, PROMPTS, SamplingParams(**{**SAMPLED.__dict__, "seed": 8}))
    assert token_ids(first) == token_ids(again)
    assert all(a != b for a, b in zip(token_ids(first), token_ids(other)))
    assert [r.seed for r in first] == [7] * len(PROMPTS)


def test_no_seed_draws_a_reported_seed(model, tokenizer):
    params = SamplingParams(max_new_tokens=32)
    first, second = generate(model, tokenizer, ["Hi", "Hi"], params)
    assert first.seed != second.seed and first.completions[0].token_ids != second.completions[0].token_ids
    replay = generate(model, tokenizer, ["Hi"], SamplingParams(max_new_tokens=32, seed=second.seed))
    assert replay[0].completions[0].token_ids == second.completions[0].token_ids


def test_seed_is_independent_of_batch_composition_and_order(model, tokenizer):
    params = [SamplingParams(max_new_tokens=10, top_k=40, seed=s) for s in (1, 2, 3, 4)]
    full = generate(model, tokenizer, PROMPTS, params)
    subset = generate(model, tokenizer, [PROMPTS[3], PROMPTS[0]], [params[3], params[0]])
    assert token_ids(subset) == [token_ids(full)[3], token_ids(full)[0]]


def test_top_k_1_and_tiny_top_p_equal_greedy(model, tokenizer):
    greedy = token_ids(generate(model, tokenizer, PROMPTS, GREEDY))
    top_k_1 = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    tiny_top_p = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3)
    assert token_ids(generate(model, tokenizer, PROMPTS, top_k_1)) == greedy
    assert token_ids(generate(model, tokenizer, PROMPTS, tiny_top_p)) == greedy


def test_mixed_params_in_one_batch(model, tokenizer):
    params = [
        GREEDY,
        SAMPLED,
        SamplingParams(max_new_tokens=5, temperature=1.2, seed=1),
        SamplingParams(max_new_tokens=12, top_p=0.5, seed=2),
    ]
    mixed = generate(model, tokenizer, PROMPTS, params)
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        assert token_ids(mixed[i : i + 1]) == token_ids(generate(model, tokenizer, [prompt], p))


def test_n_completions(model, tokenizer):
    params = SamplingParams(max_new_tokens=10, n=3, seed=5)
    results = generate(model, tokenizer, PROMPTS[:2], params)
    for r in results:
        assert len(r.completions) == 3
        assert len({tuple(c.token_ids) for c in r.completions}) == 3
    # Completion j's randomness comes from (seed, j), so completion 0 doesn't depend on n.
    single = generate(model, tokenizer, PROMPTS[:2], SamplingParams(max_new_tokens=10, seed=5))
    assert [r.completions[0].token_ids for r in single] == [r.completions[0].token_ids for r in results]
    # n larger than the batch: the prompt is prefilled again for the completions that wait.
    squeezed = generate(model, tokenizer, PROMPTS[:2], params, max_batch_size=2)
    assert token_ids(squeezed) == token_ids(results)


def test_length_finish_and_counts(model, tokenizer):
    results = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True))
    for prompt, r in zip(PROMPTS, results):
        assert isinstance(r, GenerationResult) and r.prompt == prompt
        assert r.prompt_tokens == len(tokenizer.encode(prompt))
        (c,) = r.completions
        assert isinstance(c, Completion)
        assert c.finish_reason == "length" and c.num_tokens == 7
        assert c.text == tokenizer.decode(c.token_ids)
    assert [r.index for r in results] == list(range(len(PROMPTS)))


def test_stop_strings(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS[:1], GREEDY)[0].completions[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    first = full.text.find(stop)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop=[stop, "never appears"])
    result = generate(model, tokenizer, PROMPTS[:1], params)
    c = result[0].completions[0]
    assert c.finish_reason == "stop"
    assert c.text == full.text[:first]
    # The tokens end with the one that completed the stop string.
    assert c.token_ids == full.token_ids[: len(c.token_ids)]
    assert stop in tokenizer.decode(c.token_ids) and stop not in tokenizer.decode(c.token_ids[:-1])
    assert SamplingParams(stop=stop).stop == (stop,)


def test_end_of_text_stops(eot_model, tokenizer):
    results = generate(eot_model, tokenizer, ["Hello world"], SamplingParams(max_new_tokens=20, n=8, seed=0))
    reasons = {c.finish_reason for c in results[0].completions}
    assert reasons == {"stop", "length"}
    for c in results[0].completions:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOT and EOT not in c.token_ids[:-1]
            assert c.text == tokenizer.decode(c.token_ids[:-1])
        else:
            assert EOT not in c.token_ids and c.num_tokens == 20
    params = SamplingParams(max_new_tokens=20, n=8, seed=0, ignore_eos=True)
    ignored = generate(eot_model, tokenizer, ["Hello world"], params)
    assert all(c.finish_reason == "length" and c.num_tokens == 20 for c in ignored[0].completions)


def test_continuous_batching_matches_one_big_batch(eot_model, tokenizer):
    prompts = [p * (1 + i % 3) for i, p in enumerate(PROMPTS * 3)]
    params = [
        SamplingParams(
            max_new_tokens=3 + 2 * i,
            temperature=0.9 if i % 2 else 0,
            top_k=20 * (i % 3),
            seed=i,
            stop=["e"] if i % 4 == 1 else None,
        )
        for i in range(len(prompts))
    ]
    big = generate(eot_model, tokenizer, prompts, params, max_batch_size=64)
    small = generate(eot_model, tokenizer, prompts, params, max_batch_size=3)
    assert [[(c.token_ids, c.text, c.finish_reason) for c in r.completions] for r in small] == [
        [(c.token_ids, c.text, c.finish_reason) for c in r.completions] for r in big
    ]
    assert {c.finish_reason for r in big for c in r.completions} == {"stop", "length"}


def test_prompt_too_long(model, tokenizer, monkeypatch):
    params = SamplingParams(max_new_tokens=100, temperature=0)  # block_size 128 leaves 28 prompt tokens
    long_ids = list(range(1000, 1040))

    def no_compute(*args, **kwargs):
        raise AssertionError("the model ran before all prompts were checked")

    monkeypatch.setattr(model, "hidden_states", no_compute)
    with pytest.raises(PromptTooLongError, match=r"prompt 2 has 40 tokens.*limit of 28"):
        generate(model, tokenizer, ["Hi", "Hello", long_ids], params)
    assert issubclass(PromptTooLongError, ValueError)
    with pytest.raises(PromptTooLongError, match="prompt 0"):
        generate(model, tokenizer, ["Hi"], SamplingParams(max_new_tokens=128))
    monkeypatch.undo()

    params = SamplingParams(max_new_tokens=100, temperature=0, truncate_prompt=True)
    truncated = generate(model, tokenizer, [long_ids], params)
    assert truncated[0].prompt_token_ids == long_ids[-28:] and truncated[0].truncated
    tail = generate(model, tokenizer, [long_ids[-28:]], SamplingParams(max_new_tokens=100, temperature=0))
    assert token_ids(truncated) == token_ids(tail) and not tail[0].truncated
    assert truncated[0].completions[0].num_tokens == 100


def test_prompt_forms(model, tokenizer):
    as_text = generate(model, tokenizer, PROMPTS, GREEDY)
    as_ids = generate(model, tokenizer, [tokenizer.encode(p) for p in PROMPTS], GREEDY)
    assert token_ids(as_text) == token_ids(as_ids)
    assert [r.prompt for r in as_ids] == PROMPTS
    empty, eot_text, eot_id = generate(model, tokenizer, ["", "<|endoftext|>", [EOT]], GREEDY)
    assert empty.prompt_token_ids == [EOT] == eot_id.prompt_token_ids
    assert empty.completions[0].token_ids == eot_id.completions[0].token_ids
    # User text is ordinary text: "<|endoftext|>" typed in a prompt is not the special token.
    assert eot_text.prompt_token_ids == tokenizer.encode("<|endoftext|>") and EOT not in eot_text.prompt_token_ids
    assert generate(model, tokenizer, [], GREEDY) == []
    with pytest.raises(ValueError, match="prompt 1"):
        generate(model, tokenizer, [[1, 2], [3, 60000]], GREEDY)
    with pytest.raises(ValueError, match="2 SamplingParams for 4 prompts"):
        generate(model, tokenizer, PROMPTS, [GREEDY, GREEDY])


def test_restores_training_mode(model, tokenizer):
    model.train()
    generate(model, tokenizer, ["Hi"], GREEDY, device="cpu")
    assert model.training
    with pytest.raises(ValueError, match="model is on cpu"):
        generate(model, tokenizer, ["Hi"], GREEDY, device="meta")


def test_onednn_matmuls_match_the_plain_ones(model, tokenizer, monkeypatch):
    """Decoding a batch on CPU goes through oneDNN with prepacked weights, only for the duration of the call."""
    packed = generate(model, tokenizer, PROMPTS * 2, SAMPLED)
    assert not any("forward" in vars(m) for m in model.modules())
    monkeypatch.setattr(engine, "ONEDNN_ROWS", range(0))
    assert token_ids(generate(model, tokenizer, PROMPTS * 2, SAMPLED)) == token_ids(packed)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0),
        ("stop", [""]),
        ("stop", [3]),
        ("ignore_eos", "yes"),
        ("n", 0),
        ("seed", 1.5),
        ("truncate_prompt", 1),
    ],
)
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_sampling_params_from_dict():
    assert SamplingParams.from_dict({"top_p": 0.5, "stop": "\n"}) == SamplingParams(top_p=0.5, stop=("\n",))
    with pytest.raises(ValueError, match="unknown sampling parameters: tempreature"):
        SamplingParams.from_dict({"tempreature": 0.5})


def test_sample_follows_the_filtered_distribution():
    """Evenly spaced uniforms hit each token in proportion to its probability after temperature, top-k, top-p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 10_000
    uniforms = [(i + 0.5) / draws for i in range(draws)]

    def frequencies(**kwargs):
        params = [SamplingParams(**kwargs)] * draws
        counts = torch.bincount(sample(logits.repeat(draws, 1), params, uniforms), minlength=len(logits))
        return counts / draws

    def expected(scores):
        return torch.softmax(torch.as_tensor(scores), dim=0)

    t = 0.7
    assert torch.allclose(frequencies(temperature=t), expected(logits / t), atol=1e-3)
    top3 = expected((logits / t)[:3])
    assert torch.allclose(frequencies(temperature=t, top_k=3), torch.cat([top3, torch.zeros(3)]), atol=1e-3)
    # top_p keeps the smallest prefix whose probability reaches top_p.
    probs = expected(logits)
    keep = int((probs.cumsum(0) < 0.8).sum()) + 1
    kept = probs[:keep] / probs[:keep].sum()
    assert torch.allclose(frequencies(top_p=0.8), torch.cat([kept, torch.zeros(6 - keep)]), atol=1e-3)
    assert torch.equal(frequencies(temperature=0), torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_runs_under_autocast_and_in_bfloat16(model, tokenizer):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = generate(model, tokenizer, PROMPTS, SAMPLED)
    assert all(r.completions[0].num_tokens == SAMPLED.max_new_tokens for r in results)
    results = generate(model.to(torch.bfloat16), tokenizer, PROMPTS, SAMPLED)
    assert all(r.completions[0].num_tokens == SAMPLED.max_new_tokens for r in results)


# The slot engine (CUDA's default; here through sync_every) and the counter-based uniforms.

def test_uniforms_are_splitmix64_and_the_same_from_python_and_tensors():
    # splitmix64's first outputs from state 1234567 (the reference vectors of Vigna's splitmix64.c / Java's
    # SplittableRandom), top 53 bits.
    reference = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                 16408922859458223821]
    assert [generation.uniform_for(1234567, t) for t in range(5)] == [(x >> 11) * 2.0**-53 for x in reference]
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 1234567] + [_completion_seed(s, j) for s in range(20) for j in range(3)]
    steps = [0, 1, 7, 255, 1023, 2**31]
    expected = torch.tensor([[generation.uniform_for(s, t) for t in steps] for s in seeds], dtype=torch.float64)
    got = generation.uniforms_for(torch.tensor([_int64(s) for s in seeds])[:, None], torch.tensor(steps))
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    many = generation.uniforms_for(torch.tensor(_int64(_completion_seed(7, 0))), torch.arange(100_000))
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.005
    assert abs((many < 0.1).double().mean().item() - 0.1) < 0.005


def _outputs(results):
    return [[(c.token_ids, c.text, c.finish_reason) for c in r.completions] for r in results]


def test_slot_engine_gives_the_step_by_step_tokens(eot_model, tokenizer):
    """All slots stepping with sampling on the device, tokens read back every k steps, finish checks then: the
    same completions as step by step, whatever k and the number of slots (finished completions' extra draws are
    dropped, waiting prompts fill freed slots between rounds)."""
    prompts = [p * (1 + i % 3) for i, p in enumerate(PROMPTS * 3)]
    params = [
        SamplingParams(
            max_new_tokens=3 + 2 * i,
            temperature=0.9 if i % 2 else 0,
            top_k=20 * (i % 3),
            top_p=0.9 if i % 3 == 1 else 1.0,
            repetition_penalty=1.3 if i % 5 == 2 else 1.0,
            n=1 + (i % 4 == 3),
            seed=i,
            stop=["e"] if i % 4 == 1 else None,
        )
        for i in range(len(prompts))
    ]
    stepwise = _outputs(generate(eot_model, tokenizer, prompts, params))
    assert {c[2] for r in stepwise for c in r} == {"stop", "length"}
    for slots, sync_every in ((64, 4), (3, 16), (5, 1)):
        slot_engine = generate(eot_model, tokenizer, prompts, params, max_batch_size=slots, sync_every=sync_every)
        assert _outputs(slot_engine) == stepwise, (slots, sync_every)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_slot_engine_prompt_alone_equals_prompt_in_batch(model, tokenizer, params):
    batched = generate(model, tokenizer, PROMPTS, params, sync_every=8)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer, [prompt], params, sync_every=5)
        assert token_ids(alone) == token_ids(batched[i : i + 1])


def test_slot_engine_in_bfloat16_agrees_with_float32(model, tokenizer):
    """A bfloat16 model decodes with a bfloat16 cache (logits and sampling stay float32/float64); on this model the
    greedy tokens mostly agree with float32's."""
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    full = token_ids(generate(model, tokenizer, PROMPTS, params, sync_every=8))
    half = token_ids(generate(model.to(torch.bfloat16), tokenizer, PROMPTS, params, sync_every=8))
    assert all(len(r[0]) == 16 for r in half)
    assert sum(a[0][0] == b[0][0] for a, b in zip(full, half)) >= 3
    agree = sum(x == y for a, b in zip(full, half) for x, y in zip(a[0], b[0]))
    assert agree >= 0.5 * 16 * len(PROMPTS)


def test_generate_checks_its_engine_options(model, tokenizer):
    for bad in (dict(sync_every=0), dict(sync_every=2.0), dict(max_batch_size=0), dict(cuda_graphs="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, tokenizer, ["Hi"], GREEDY, **bad)
    assert generation.auto_batch_size(model) == generation.CPU_BATCH_SIZE


def test_slots_for_memory():
    from gpt2core import GPT2Config

    config = GPT2Config.preset("gpt2")
    gib = 2**30
    # gpt2 in bf16, 456-token sequences -> 512 cache columns: 2 * 12 * 768 * 512 * 2 bytes of cache + 4 KiB of
    # history + 50257 * 108 bytes of logits and sampling temporaries = 24.3 MB per slot.
    per_slot = 2 * 12 * 768 * 512 * 2 + 8 * 512 + 50257 * generation.LOGIT_BYTES_PER_ENTRY
    prefill = generation.PREFILL_TOKENS * (6 * 768 + 2 * 3072) * 4
    free, total = 40 * gib, 80 * gib
    expected = int((free - generation.MEMORY_HEADROOM * total - prefill) // per_slot)
    assert generation.slots_for_memory(config, 456, 2, free, total) == expected
    assert 1400 < expected < 1500  # about 1,470
    assert generation.slots_for_memory(config, 456, 2, 130 * gib, 140 * gib) == generation.MAX_AUTO_BATCH
    assert generation.slots_for_memory(config, 456, 2, 20 * gib, 24 * gib) < generation.slots_for_memory(
        config, 456, 2, 40 * gib, 48 * gib)
    assert generation.slots_for_memory(config, 1024, 4, 20 * gib, 24 * gib) < generation.slots_for_memory(
        config, 256, 4, 20 * gib, 24 * gib)
    assert generation.slots_for_memory(config, 1024, 4, gib // 2, 24 * gib) == 1  # never below one slot
