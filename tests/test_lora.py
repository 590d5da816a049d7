"""LoRA fine-tuning (gpt2core.lora, with Hugging Face peft): what trains, that it learns, that the merged model is
the same model in gpt2core and in transformers, LoRA checkpoints and their exact resume, refused settings."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from gpt2core import GPT2, GPT2Config
from gpt2core.config import GPT2_LINEAR_MODULES, LORA_DEFAULT_TARGET_MODULES
from gpt2core.lora import (
    ADAPTER_DIR,
    LoraSettings,
    apply_lora,
    is_lora,
    linear_module_names,
    merge_lora,
    merged_state_dict,
    save_merged,
    settings_of,
    trainable_parameters,
)
from gpt2core.train import STATE_FILE, TrainConfig, Trainer, build_optimizer, list_checkpoints

N_EMBD = 32


def small_model(seed: int = 0, dropout: float = 0.0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=N_EMBD, block_size=64, dropout=dropout))


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 512, n).astype(np.uint16)


def idx(batch: int = 2, length: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def adapted(model: torch.nn.Module) -> set[str]:
    """The names (in GPT2) of the layers that carry a LoRA adapter."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {name for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def with_random_adapters(model: PeftModel, seed: int = 3) -> PeftModel:
    """B starts at zero (the wrapped model computes what the base does); give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ---- wrapping --------------------------------------------------------------------------------------------------


def test_apply_lora_leaves_only_the_adapters_trainable():
    base = small_model()
    before = copy.deepcopy(base).eval()
    model = apply_lora(base, LoraSettings(rank=8, alpha=16))
    assert is_lora(model) and not is_lora(before) and isinstance(model.get_base_model(), GPT2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # rank x (in + out) per adapted layer: c_attn (32 -> 96), attn.c_proj (32 -> 32), c_fc (32 -> 128),
    # mlp.c_proj (128 -> 32), in each of the 2 blocks
    expected = 2 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert trainable_parameters(model) == (expected, before.num_parameters() + expected)
    assert adapted(model) == {f"transformer.h.{i}.{layer}" for i in range(2)
                              for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    # the optimizer (built as the Trainer builds it) holds exactly the adapters
    optimizer = build_optimizer(model, TrainConfig(device="cpu"), torch.device("cpu"))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    # gpt2core's call convention, and B = 0: the wrapped model starts out computing exactly what the base does
    model.eval()
    x = idx()
    logits, loss = model(x, x)
    ref_logits, ref_loss = before(x, x)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    torch.testing.assert_close(model(x, attention_mask=mask)[0], before(x, attention_mask=mask)[0], rtol=0, atol=0)
    assert model.config is base.config and model.config.block_size == 64  # GPT2's attributes, forwarded


def test_target_modules_pick_the_layers():
    only_attn_proj = apply_lora(small_model(), LoraSettings(target_modules=("attn.c_proj",)))
    assert adapted(only_attn_proj) == {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}
    both_proj = apply_lora(small_model(), LoraSettings(target_modules=("c_proj",)))
    assert adapted(both_proj) == {f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")}
    assert settings_of(both_proj) == LoraSettings(target_modules=("c_proj",))
    assert LoraSettings().target_modules == LORA_DEFAULT_TARGET_MODULES == ("c_attn", "c_proj", "c_fc")


def test_the_allowed_names_are_the_models_linear_layers():
    """gpt2core.config's torch-free list (which the job spec checks against) is what the model has."""
    assert linear_module_names(small_model()) == GPT2_LINEAR_MODULES
    assert "lm_head" not in GPT2_LINEAR_MODULES  # tied to the token embedding: never adapted


def test_a_seed_fixes_the_initial_adapters_and_leaves_the_global_rng_alone():
    models = []
    for global_seed in (1, 2):
        base = small_model()
        torch.manual_seed(global_seed)
        expected_next = torch.rand(3)
        torch.manual_seed(global_seed)
        models.append(apply_lora(base, seed=5))
        assert torch.equal(torch.rand(3), expected_next)  # the global RNG is where it was
    a, b = models
    assert any("lora_A" in name and p.abs().sum() > 0 for name, p in a.named_parameters())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=-2), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha="16"), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(target_modules=()), "target_modules"),
        (dict(target_modules="c_attn"), "target_modules"),
        (dict(target_modules=("q_proj",)), "target_modules"),
        (dict(target_modules=("lm_head",)), "target_modules"),
        (dict(target_modules=("c_attn", "c_attn")), "target_modules"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=rf"LoraSettings\.{field}"):
        LoraSettings(**settings)


def test_unknown_module_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match="choose from c_attn, c_proj, c_fc, attn.c_attn"):
        LoraSettings(target_modules=("c_attn", "q_proj"))


def test_apply_lora_refuses_a_wrapped_model_and_other_modules():
    model = apply_lora(small_model())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model)
    with pytest.raises(TypeError, match="gpt2core GPT2"):
        apply_lora(torch.nn.Linear(4, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="apply_lora"):
        merge_lora(small_model())  # type: ignore[arg-type]


# ---- training ----------------------------------------------------------------------------------------------


def test_a_short_lora_finetune_lowers_the_loss_and_leaves_the_base_weights():
    """A base model trained on one sequence learns another one through its adapters alone. (On a random base the
    loss could hardly move: the LayerNorm and the tied embedding, frozen at init, bound the logits to about 0.6.)"""
    rng = np.random.default_rng(0)
    first, second = rng.permutation(64).astype(np.uint16), rng.permutation(64).astype(np.uint16)
    torch.manual_seed(0)
    base = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=N_EMBD, block_size=64, vocab_size=64))
    config = TrainConfig(max_steps=40, batch_size=4, block_size=32, learning_rate=1e-2, warmup_steps=0,
                         device="cpu", seed=1)
    assert Trainer(base, config, np.tile(first, 60)).fit().losses[-1] < 1.0
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraSettings(rank=8, alpha=16), seed=0)
    config = TrainConfig(max_steps=30, batch_size=4, block_size=32, learning_rate=3e-2, warmup_steps=0,
                         device="cpu", seed=1)
    result = Trainer(model, config, np.tile(second, 60)).fit()
    assert result.losses[-1] < result.losses[0] / 2, result.losses
    merged = merged_state_dict(model)
    changed = [k for k in frozen if k != "lm_head.weight" and not torch.equal(merged[k], frozen[k])]
    assert changed and all(k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) for k in changed)
    for name, p in model.get_base_model().named_parameters():  # the base weights themselves never moved
        if ".lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer.", ".")]), name


def test_the_merged_model_is_the_same_model_in_gpt2core_and_transformers(tmp_path):
    model = with_random_adapters(apply_lora(small_model(), LoraSettings(rank=4, alpha=8), seed=0)).eval()
    x = idx(3, 20)
    with torch.no_grad():
        wrapped = model(x)[0]
        save_merged(model, tmp_path / "merged")  # without merging the model itself
        assert is_lora(model) and torch.equal(model(x)[0], wrapped)
        theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(x).logits
        ours = GPT2.from_pretrained(tmp_path / "merged").eval()(x)[0]
        merged = merge_lora(model)
        assert type(merged) is GPT2 and not adapted(merged)
        assert all(type(m) is torch.nn.Linear for m in merged.modules() if isinstance(m, torch.nn.Linear))
        merged.eval()
        in_place = merged(x)[0]
    assert not torch.equal(wrapped, small_model().eval()(x)[0])  # the adapters change what the model computes
    for logits in (theirs, ours, in_place):
        torch.testing.assert_close(logits, wrapped, rtol=0, atol=1e-4)
    merged.save_pretrained(tmp_path / "in_place")  # merge_and_unload's weights are exactly the ones save_merged wrote
    a, b = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "in_place" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_wrapped_model_generates_what_its_merged_model_generates():
    """gpt2core.generate (and so Trainer.sample) takes the wrapped model as it takes a GPT2."""
    from gpt2core import GPT2Tokenizer
    from gpt2core.generation import SamplingParams, generate

    model = with_random_adapters(apply_lora(small_model(), LoraSettings(rank=4), seed=0), seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8], [9, 10]] * 2  # 8 rows: the CPU's prepacked-matmul path too
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    tok = GPT2Tokenizer()
    wrapped = [r.completions[0].token_ids for r in generate(model, tok, prompts, params)]
    merged = [r.completions[0].token_ids for r in generate(merge_lora(copy.deepcopy(model)), tok, prompts, params)]
    base = [r.completions[0].token_ids for r in generate(small_model(), tok, prompts, params)]
    assert wrapped == merged and wrapped != base


# ---- checkpoints -------------------------------------------------------------------------------------------


SETTINGS = LoraSettings(rank=4, alpha=8, dropout=0.1)


class StopAfter:
    def __init__(self, steps: int):
        self.steps, self.seen = steps, 0

    def on_step(self, metrics) -> None:
        self.seen = metrics.step

    def should_stop(self) -> bool:
        return self.seen >= self.steps


def lora_run(ckpt_dir, *, resume_from=None, stop_after=None, lora_seed=0, settings=SETTINGS):
    """A LoRA run with dropout (base and adapters) and gradient accumulation, on a freshly wrapped base model."""
    model = apply_lora(small_model(seed=123, dropout=0.1), settings, seed=lora_seed)
    data = random_tokens(4000, seed=1)
    config = TrainConfig(max_steps=8, batch_size=2, block_size=32, grad_accum_steps=2, learning_rate=3e-3,
                         warmup_steps=2, checkpoint_every=3, checkpoint_dir=ckpt_dir, eval_every=4, eval_windows=2,
                         device="cpu", seed=7)
    callbacks = [StopAfter(stop_after)] if stop_after else []
    trainer = Trainer(model, config, data[:3500], data[3500:], callbacks=callbacks)
    if resume_from is not None:
        trainer.resume(resume_from)
    return trainer, trainer.fit()


def adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def test_lora_checkpoints_hold_the_merged_model_and_the_adapter(tmp_path):
    trainer, result = lora_run(tmp_path / "run")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3, 6, 8]
    final = tmp_path / "run" / "step-000008"
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "config.json", "model.safetensors", STATE_FILE]
    assert sorted(p.name for p in (final / ADAPTER_DIR).iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    state = torch.load(final / STATE_FILE, weights_only=True)
    assert state["lora"] == SETTINGS.to_dict()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(state["optimizer"]["state"]) == len(trainable)  # Adam's moments: the adapters' only
    assert sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values()) == sum(p.numel() for p in trainable)
    config = json.loads((final / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)

    # The checkpoint is a plain GPT-2 checkpoint of the merged weights: both libraries load it, same logits.
    model = trainer.model.eval()
    x = idx(2, 24)
    with torch.no_grad():
        wrapped = model(x)[0]
        ours = GPT2.from_pretrained(final, dropout=0.0).eval()(x)[0]
        theirs = GPT2LMHeadModel.from_pretrained(final).eval()(x).logits
    torch.testing.assert_close(ours, wrapped, rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs, wrapped, rtol=0, atol=1e-4)
    # ... and the adapter folder is peft's: PeftModel.from_pretrained on the base model loads it.
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(small_model(seed=123), final / ADAPTER_DIR).eval()(x)[0]
    torch.testing.assert_close(loaded, wrapped, rtol=0, atol=1e-5)


def test_lora_resume_continues_exactly(tmp_path):
    full_trainer, full = lora_run(tmp_path / "full")
    assert full.steps == 8

    # A fresh base with fresh adapters (drawn from another seed: the checkpoint's replace them) from step 3.
    resumed_trainer, resumed = lora_run(tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000003",
                                        lora_seed=1)
    assert resumed.losses == full.losses[3:]
    assert resumed.val_loss == full.val_loss
    a, b = adapter_weights(full_trainer.model), adapter_weights(resumed_trainer.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Stopped at step 5 (not a checkpoint step), resumed from the run folder's latest checkpoint.
    _, stopped = lora_run(tmp_path / "stopped", stop_after=5)
    assert stopped.stopped and stopped.steps == 5
    _, rest = lora_run(tmp_path / "stopped", resume_from=tmp_path / "stopped", lora_seed=2)
    assert stopped.losses + rest.losses == full.losses


def test_saving_a_checkpoint_leaves_the_training_model_as_it_was(tmp_path):
    trainer, _ = lora_run(tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.save_checkpoint(tmp_path / "again")
    after = trainer.model.state_dict()
    assert is_lora(trainer.model) and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_checkpoint_of_the_other_kind_or_other_settings(tmp_path):
    lora_run(tmp_path / "lora")
    config = TrainConfig(max_steps=2, batch_size=2, block_size=32, device="cpu", checkpoint_dir=tmp_path / "full")
    plain = Trainer(small_model(seed=123), config, random_tokens(2000))
    with pytest.raises(ValueError, match="a LoRA checkpoint .* wrap the base model with gpt2core.lora.apply_lora"):
        plain.resume(tmp_path / "lora")
    plain.fit()
    assert not (tmp_path / "full" / "step-000002" / ADAPTER_DIR).exists()  # full fine-tuning: as before
    assert "lora" not in torch.load(tmp_path / "full" / "step-000002" / STATE_FILE, weights_only=True)
    wrapped = Trainer(apply_lora(small_model(seed=123), SETTINGS), config, random_tokens(2000))
    with pytest.raises(ValueError, match="a full fine-tuning checkpoint"):
        wrapped.resume(tmp_path / "full")
    other = Trainer(apply_lora(small_model(seed=123), LoraSettings(rank=8)), config, random_tokens(2000))
    with pytest.raises(ValueError, match="LoRA settings .* differ"):
        other.resume(tmp_path / "lora")


def test_trainer_describes_what_trains():
    config = TrainConfig(max_steps=1, device="cpu")
    plain = small_model()
    assert Trainer(plain, config, random_tokens(2000)).describe_parameters() == f"{plain.num_parameters():,} parameters"
    model = apply_lora(small_model(), LoraSettings(rank=4))
    trainable, total = trainable_parameters(model)
    assert Trainer(model, config, random_tokens(2000)).describe_parameters() == (
        f"{trainable:,} of {total:,} parameters (LoRA adapters, rank 4)")


def test_the_worker_turns_the_job_method_into_lora_settings():
    from jobs.specs import LoraMethod
    from workers.convert import lora_settings

    method = LoraMethod(type="lora", rank=16, alpha=32, dropout=0.05, target_modules=["c_attn", "mlp.c_proj"])
    assert lora_settings(method) == LoraSettings(rank=16, alpha=32.0, dropout=0.05,
                                                 target_modules=("c_attn", "mlp.c_proj"))
    assert lora_settings(LoraMethod(type="lora")) == LoraSettings()  # one set of defaults
