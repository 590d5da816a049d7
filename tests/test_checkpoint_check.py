"""gpt2core.checkpoint.check_checkpoint: the torch-free check of a Hugging Face GPT-2 checkpoint folder, and
GPT2.from_pretrained, which runs it, on every weights layout transformers loads (tiny random models, no downloads)."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import GPT2Config as HFConfig
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from gpt2core import GPT2, CheckpointError, GPT2Config, GPT2Tokenizer, SamplingParams, generate
from gpt2core.checkpoint import CheckpointInfo, parameter_count, check_checkpoint

TINY = dict(n_layer=2, n_head=2, n_embd=16, n_positions=32)
C = TINY["n_embd"]


def hf_tiny(seed: int = 0, cls=GPT2LMHeadModel, **overrides) -> GPT2LMHeadModel:
    """A tiny random transformers GPT-2, LayerNorms and biases randomised so a skipped or transposed tensor shows."""
    torch.manual_seed(seed)
    model = cls(HFConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, std=0.1)
    return model


def save_bin(model, directory: Path, max_shard_size: str | None = None) -> None:
    """pytorch_model.bin (or shards + pytorch_model.bin.index.json), as transformers 4 wrote with
    safe_serialization=False (transformers 5 only writes safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    save_torch_state_dict(model.state_dict(), directory, safe_serialization=False, **kwargs)
    model.config.save_pretrained(directory)


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def assert_loads_like(directory: Path, reference) -> GPT2:
    """check_checkpoint passes and GPT2.from_pretrained computes the reference's logits (reference upcast)."""
    info = check_checkpoint(directory)
    assert isinstance(info, CheckpointInfo)
    model = GPT2.from_pretrained(directory).eval()
    assert model.transformer.wte.weight.dtype == torch.float32
    idx = torch.randint(0, reference.config.vocab_size, (2, TINY["n_positions"]))
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference.float(), idx), atol=1e-4, rtol=0)
    return model


def refused(directory: Path, match: str) -> str:
    """Both check_checkpoint and GPT2.from_pretrained refuse with a message matching `match`, without the path."""
    with pytest.raises(CheckpointError, match=match) as checked:
        check_checkpoint(directory)
    with pytest.raises(CheckpointError, match=match) as loaded:
        GPT2.from_pretrained(directory)
    for message in (str(checked.value), str(loaded.value)):
        for path in {str(directory), str(directory.resolve()), str(directory.parent), tempfile.gettempdir()}:
            assert path not in message, message
    return str(checked.value)


def edit_safetensors(directory: Path, edit, file: str = "model.safetensors") -> None:
    tensors = load_file(directory / file)
    edit(tensors)
    save_file(tensors, directory / file, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path):
    """A tiny transformers model saved as model.safetensors, and the model."""
    reference = hf_tiny()
    reference.save_pretrained(tmp_path)
    return tmp_path, reference


# ----------------------------------------------------------------------------------------------------------------
# Every layout transformers loads


def test_safetensors(saved):
    directory, reference = saved
    assert_loads_like(directory, reference)
    info = check_checkpoint(directory)
    assert (info.n_layer, info.n_head, info.n_embd, info.n_positions, info.vocab_size) == (2, 2, 16, 32, 50257)
    assert info.n_inner is None and info.layer_norm_epsilon == 1e-5
    assert info.config["model_type"] == "gpt2"
    assert info.parameter_count == reference.num_parameters() == sum(p.numel() for p in reference.parameters())
    names = list(info.tensors)
    assert names[:3] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight"] and names[-2:] == ["ln_f.weight", "ln_f.bias"]
    assert len(names) == 4 + 12 * 2
    assert info.tensors["wte.weight"] == ("F32", (50257, C), "model.safetensors")
    assert info.tensors["h.1.attn.c_attn.weight"] == ("F32", (C, 3 * C), "model.safetensors")
    assert info.tensors["h.1.mlp.c_proj.weight"] == ("F32", (4 * C, C), "model.safetensors")
    assert info.files == ["model.safetensors"]


def test_gpt2_smallparameter_count():
    defaults = dict(n_layer=12, n_embd=768, n_positions=1024, vocab_size=50257, n_inner=None)
    assert parameter_count(defaults) == 124_439_808


def test_sharded_safetensors(tmp_path):
    reference = hf_tiny(1)
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_loads_like(tmp_path, reference)
    info = check_checkpoint(tmp_path)
    assert len(info.files) > 1 and all(f.startswith("model-") for f in info.files)


def test_pytorch_model_bin(tmp_path):
    reference = hf_tiny(2)
    save_bin(reference, tmp_path)
    assert {p.name for p in tmp_path.glob("*.bin")} == {"pytorch_model.bin"}
    assert_loads_like(tmp_path, reference)
    # transformers 4 kept the tied lm_head.weight in .bin files: present, right shape, ignored.
    assert "lm_head.weight" in check_checkpoint(tmp_path).ignored


def test_sharded_pytorch_model_bin(tmp_path):
    reference = hf_tiny(3)
    save_bin(reference, tmp_path, max_shard_size="200KB")
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    assert len(list(tmp_path.glob("pytorch_model-*-of-*.bin"))) > 1
    assert_loads_like(tmp_path, reference)


@pytest.mark.parametrize("dtype, name", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_half_precision_weights(tmp_path, dtype, name, layout):
    reference = hf_tiny(4).to(dtype)
    if layout == "safetensors":
        reference.save_pretrained(tmp_path)
    else:
        save_bin(reference, tmp_path)
    info = check_checkpoint(tmp_path)
    assert {dtype_ for dtype_, _, _ in info.tensors.values()} == {name}
    assert_loads_like(tmp_path, reference)


def test_float64_weights(tmp_path):
    reference = hf_tiny(5)
    reference.save_pretrained(tmp_path)
    edit_safetensors(tmp_path, lambda t: t.update({k: v.double() for k, v in t.items()}))
    assert check_checkpoint(tmp_path).tensors["ln_f.bias"][0] == "F64"
    assert_loads_like(tmp_path, reference)


def test_larger_vocabulary_loads_and_generates(tmp_path):
    """A model with an added token (resize_token_embeddings) loads; generation never emits the extra id."""
    reference = hf_tiny(6)
    reference.resize_token_embeddings(50258)
    reference.save_pretrained(tmp_path)
    assert check_checkpoint(tmp_path).vocab_size == 50258
    model = assert_loads_like(tmp_path, reference)
    assert model.config.vocab_size == 50258
    assert GPT2.from_pretrained(tmp_path, pad_vocab_multiple=64).transformer.wte.weight.shape[0] == 50304


def test_safetensors_preferred_over_bin(tmp_path):
    reference = hf_tiny(7)
    reference.save_pretrained(tmp_path)
    save_bin(hf_tiny(8), tmp_path)  # different weights; transformers would read model.safetensors
    reference.config.save_pretrained(tmp_path)
    assert check_checkpoint(tmp_path).files == ["model.safetensors"]
    assert_loads_like(tmp_path, reference)


def test_gpt2model_names_and_old_buffers(tmp_path):
    """GPT2Model names (no `transformer.`), and the causal-mask buffers old transformers saved (uint8, float)."""
    reference = hf_tiny(9)
    state = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.uint8))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    reference.config.save_pretrained(tmp_path)
    assert_loads_like(tmp_path, reference)
    assert check_checkpoint(tmp_path).ignored == [
        "h.0.attn.bias", "h.0.attn.masked_bias", "h.1.attn.bias", "h.1.attn.masked_bias"
    ]


def test_other_gpt2_heads_are_ignored(tmp_path):
    """A GPT2ForSequenceClassification checkpoint: the backbone loads, score.weight is ignored."""
    reference = hf_tiny(10, cls=GPT2ForSequenceClassification, num_labels=3)
    reference.save_pretrained(tmp_path)
    info = check_checkpoint(tmp_path)
    assert info.ignored == ["score.weight"]
    model = GPT2.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        expected = reference.transformer(idx).last_hidden_state
        torch.testing.assert_close(model.hidden_states(idx), expected, atol=1e-5, rtol=0)


def test_checkpoint_module_does_not_import_torch():
    code = "import gpt2core.checkpoint, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    code = "import gpt2core, gpt2core.config, sys; gpt2core.CheckpointError; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_lazy_package_keeps_its_names():
    import gpt2core
    import gpt2core.hf

    assert gpt2core.CheckpointError is gpt2core.hf.CheckpointError
    assert issubclass(CheckpointError, ValueError)
    for name in gpt2core.__all__:
        assert getattr(gpt2core, name) is not None
    with pytest.raises(AttributeError):
        _ = gpt2core.no_such_name


# ----------------------------------------------------------------------------------------------------------------
# Refusals: each names what is wrong, never the folder's path


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(add_cross_attention=True), "config.json: add_cross_attention=true is not supported"),
        (dict(scale_attn_by_inverse_layer_idx=True), "config.json: scale_attn_by_inverse_layer_idx=true is not supported"),
        (dict(reorder_and_upcast_attn=True), "config.json: reorder_and_upcast_attn=true"),
        (dict(tie_word_embeddings=False), "config.json: tie_word_embeddings=false is not supported"),
        (dict(vocab_size=50000), "config.json: vocab_size is 50,000, but GPT-2's tokenizer has 50,257 tokens"),
        (dict(activation_function="relu"), 'config.json: activation_function "relu" is not supported'),
    ],
)
def test_unsupported_transformers_models(tmp_path, overrides, match):
    hf_tiny(11, **overrides).save_pretrained(tmp_path)
    refused(tmp_path, match)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="llama"), "config.json: model_type is 'llama', expected 'gpt2'"),
        (dict(n_layer=True), "config.json: n_layer must be a positive integer, got true"),
        (dict(n_embd=16.0), "config.json: n_embd must be a positive integer, got 16.0"),
        (dict(n_head=3), r"config.json: n_embd \(16\) must be divisible by n_head \(3\)"),
        (dict(n_inner=0), "config.json: n_inner must be a positive integer or null, got 0"),
        (dict(layer_norm_epsilon=0), "config.json: layer_norm_epsilon must be a positive number, got 0"),
        (dict(resid_pdrop=1.0), r"config.json: resid_pdrop must be a number in \[0, 1\)"),
        (dict(scale_attn_weights=False), "config.json: scale_attn_weights=false is not supported"),
        (dict(n_positions=64), r"model.safetensors: tensor wpe.weight has shape \[32, 16\], expected \[64, 16\]: "
                               r"it has 32 rows but config.json n_positions is 64"),
        (dict(vocab_size=50258), r"tensor wte.weight has shape \[50257, 16\], expected \[50258, 16\]: "
                                 r"it has 50,257 rows but config.json vocab_size is 50,258"),
        (dict(n_layer=3), r"model.safetensors: checkpoint lacks tensor h\.2\.ln_1\.weight \(and 11 more\)"),
        (dict(n_layer=1), r"model.safetensors: unexpected tensor h\.1\.\S+ \(config.json has n_layer=1\)"),
        (dict(n_embd=18), r"tensor wte.weight has shape \[50257, 16\], expected \[50257, 18\]"),
    ],
)
def test_bad_config(saved, changes, match):
    directory, _ = saved
    edit_config(directory, **changes)
    refused(directory, match)


def test_config_not_json_or_too_big(saved):
    directory, _ = saved
    (directory / "config.json").write_bytes(b"\xff\xfe{}")
    refused(directory, "config.json: not valid JSON: not UTF-8")
    (directory / "config.json").write_text("[1, 2]")
    refused(directory, "config.json: expected a JSON object")
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "pad": "x" * (1 << 20)}))
    refused(directory, "config.json: larger than 1,048,576 bytes")


def test_missing_tensor(saved):
    directory, _ = saved
    edit_safetensors(directory, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    refused(directory, r"^model.safetensors: checkpoint lacks tensor h\.1\.mlp\.c_fc\.bias$")
    edit_safetensors(directory, lambda t: [t.pop(k) for k in list(t) if k.startswith("transformer.h.0.")])
    refused(directory, r"checkpoint lacks tensor h\.0\.ln_1\.weight \(and 12 more\)")


def test_wrong_shape_names_the_shard(tmp_path):
    hf_tiny(12).save_pretrained(tmp_path, max_shard_size="200KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["transformer.h.0.attn.c_attn.weight"]
    edit_safetensors(tmp_path, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(16, 32)}), shard)
    refused(tmp_path, rf"^{shard}: tensor h\.0\.attn\.c_attn\.weight has shape \[16, 32\], expected \[16, 48\]$")


def test_sharded_index_problems(tmp_path):
    hf_tiny(13).save_pretrained(tmp_path, max_shard_size="200KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for evil in ("../model-00001-of-00002.safetensors", str(tmp_path / "model-00001-of-00002.safetensors"), "x.bin"):
        bad = {**index, "weight_map": {**index["weight_map"], "transformer.wte.weight": evil}}
        index_file.write_text(json.dumps(bad))
        refused(tmp_path, r"^model.safetensors.index.json: tensor transformer.wte.weight is not mapped to the plain "
                          r"name of a .safetensors file in the checkpoint folder$")
    moved = {**index, "weight_map": {**index["weight_map"], "transformer.wte.weight": "model-00009-of-00009.safetensors"}}
    index_file.write_text(json.dumps(moved))
    refused(tmp_path, "model.safetensors.index.json: names shard model-00009-of-00009.safetensors, which is missing")
    shards = sorted(set(index["weight_map"].values()))
    wrong = {**index, "weight_map": {k: shards[0] for k in index["weight_map"]}}
    index_file.write_text(json.dumps(wrong))
    refused(tmp_path, rf"model.safetensors.index.json: says tensor \S+ is in {shards[0]}, but {shards[0]} does not hold it")
    del index["weight_map"]["transformer.ln_f.bias"]
    index_file.write_text(json.dumps(index))
    refused(tmp_path, r"model-\S+.safetensors: holds tensor transformer.ln_f.bias, which model.safetensors.index.json "
                      r"does not list")


@pytest.mark.parametrize(
    "name, match",
    [
        ("transformer.h.0.crossattention.c_attn.weight", r"^model.safetensors: unexpected tensor "
                                                         r"h\.0\.crossattention\.c_attn\.weight; it is not part of GPT-2$"),
        ("transformer.h.2.ln_1.weight", r"unexpected tensor h\.2\.ln_1\.weight \(config.json has n_layer=2\)"),
        ("lm_head.bias", "unexpected tensor lm_head.bias"),
        ("wte.weight", r"tensor wte\.weight appears twice"),
    ],
)
def test_unexpected_tensor(saved, name, match):
    directory, _ = saved
    edit_safetensors(directory, lambda t: t.update({name: torch.zeros(50257, 16) if "wte" in name else torch.zeros(16)}))
    refused(directory, match)


def test_ignored_tensors_are_checked_and_listed(saved):
    directory, _ = saved
    edit_safetensors(directory, lambda t: t.update({"lm_head.weight": torch.zeros(50257, 16), "qa_outputs.weight": torch.zeros(2, 16)}))
    assert check_checkpoint(directory).ignored == ["lm_head.weight", "qa_outputs.weight"]
    edit_safetensors(directory, lambda t: t.update({"lm_head.weight": torch.zeros(50256, 16)}))
    refused(directory, r"tensor lm_head.weight has shape \[50256, 16\], expected \[50257, 16\] \(it is tied to wte.weight\)")


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.uint8, "U8"), (torch.bool, "BOOL")])
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_integer_dtype(tmp_path, dtype, name, layout):
    reference = hf_tiny(14)
    with torch.no_grad():
        reference.transformer.ln_f.bias = torch.nn.Parameter(torch.ones(16, dtype=dtype), requires_grad=False)
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"},
                  tmp_path / "model.safetensors")
        file = "model.safetensors"
    else:
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
        file = "pytorch_model.bin"
    reference.config.save_pretrained(tmp_path)
    refused(tmp_path, rf"^{file}: tensor ln_f\.bias has dtype {name}; weights must be F32, F16, BF16 or F64$")


def test_corrupt_safetensors(saved):
    directory, _ = saved
    file = directory / "model.safetensors"
    data = file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + header_len]
    file.write_bytes(data[:-100])
    refused(directory, r"model.safetensors: cannot read weights: tensor \S+: data_offsets .* outside")
    file.write_bytes(data[: 8 + header_len // 2])
    refused(directory, "model.safetensors: cannot read weights: safetensors header length .* runs past the end")
    file.write_bytes(data[:5])
    refused(directory, r"model.safetensors: cannot read weights: file too short \(5 bytes\)")
    file.write_bytes(data + b"\0" * 8)
    refused(directory, "model.safetensors: cannot read weights: tensors cover .* data bytes")
    file.write_bytes(struct.pack("<Q", 9) + b"{not json" + data[8 + header_len :])
    refused(directory, "model.safetensors: cannot read weights: safetensors header is not valid JSON")
    file.write_bytes(struct.pack("<Q", 2) + b"\xff}")
    refused(directory, "safetensors header is not UTF-8")
    file.write_bytes(struct.pack("<Q", 200_000_000) + header)
    refused(directory, "safetensors header of 200,000,000 bytes is over the 100,000,000 byte limit")
    parsed = json.loads(header)
    parsed["transformer.ln_f.bias"]["dtype"] = "F16"  # now its offsets span twice the bytes it needs
    text = json.dumps(parsed).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_len :])
    refused(directory, r"tensor transformer.ln_f.bias: data_offsets span 64 bytes, but F16 \[16\] needs 32")
    parsed["transformer.ln_f.bias"]["dtype"] = "F4"
    text = json.dumps(parsed).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_len :])
    refused(directory, 'tensor transformer.ln_f.bias: unsupported dtype "F4"')


def test_missing_files_and_not_a_directory(saved):
    directory, _ = saved
    refused(directory / "nowhere", "^checkpoint is not a directory$")
    (directory / "model.safetensors").unlink()
    refused(directory, "^missing weights file")
    (directory / "config.json").unlink()
    refused(directory, "^missing config.json$")


def test_legacy_torch_save_format(tmp_path):
    reference = hf_tiny(15)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reference.config.save_pretrained(tmp_path)
    refused(tmp_path, r"pytorch_model.bin: .*legacy torch.save .* re-save with torch>=1.6 or as safetensors")


def test_bin_storage_missing_or_short(tmp_path):
    reference = hf_tiny(16)
    save_bin(reference, tmp_path)
    original = (tmp_path / "pytorch_model.bin").read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as source:
        records = {info.filename: source.read(info) for info in source.infolist()}
    for drop, change in ((True, False), (False, True)):
        with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as target:
            for name, data in records.items():
                if name.endswith("/data/0"):
                    if drop:
                        continue
                    data = data[:-4] if change else data
                target.writestr(name, data)
        refused(tmp_path, "pytorch_model.bin: cannot read weights: storage data/0 " + ("is missing" if drop else "holds"))
    (tmp_path / "pytorch_model.bin").write_bytes(original[: len(original) // 2])
    refused(tmp_path, "pytorch_model.bin: cannot read weights: corrupt or truncated zip archive")


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("payload", ["system", "nested", "builtins", "build"])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    reference = hf_tiny(17)
    save_bin(reference, tmp_path)
    evil = _Evil(f"touch {marker}")
    if payload == "system":
        pickled = pickle.dumps(evil, protocol=2)
        match = "refused to load posix.system"
    elif payload == "nested":
        pickled = pickle.dumps({"transformer.wte.weight": evil}, protocol=2)
        match = "refused to load posix.system"
    elif payload == "builtins":
        pickled = b"cbuiltins\nexec\n(Vopen(%r, 'w')\ntR." % str(marker).encode()
        match = "refused to load builtins.exec"
    else:  # a real tensor record, then BUILD to overwrite its fields
        pickled = (
            b"\x80\x02}X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
            b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85\x89"
            b"ccollections\nOrderedDict\n)RtR}X\x05\x00\x00\x00shapeX\x03\x00\x00\x00abcsbs."
        )
        match = "unexpected state for _TensorRef"
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    message = refused(tmp_path, match)
    assert message.startswith("pytorch_model.bin: cannot read weights: data.pkl: ")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Generation never emits an id the tokenizer cannot decode


def test_generation_masks_ids_beyond_the_tokenizer():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50258)).eval()
    with torch.no_grad():
        # Every position's final hidden state is all ones, so the extra row (id 50257) wins by far.
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[50257] = 10.0
        logits, _ = model(torch.tensor([[15496]]))
    assert logits[0, -1].argmax().item() == 50257
    tok = GPT2Tokenizer()
    for params in (SamplingParams(max_new_tokens=8, temperature=0),
                   SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=1, ignore_eos=True)):
        [result] = generate(model, tok, ["Hello"], params)
        for completion in result.completions:
            assert all(0 <= t < tok.vocab_size for t in completion.token_ids)
            assert completion.text == tok.decode(completion.token_ids[: len(completion.token_ids)
                                                 - (completion.finish_reason == "stop")])
    with pytest.raises(ValueError, match=r"outside \[0, 50257\)"):
        generate(model, tok, [[15496, 50257]], SamplingParams(max_new_tokens=2))


# ----------------------------------------------------------------------------------------------------------------
# Property: check_checkpoint passes exactly when GPT2.from_pretrained loads, and exactly when no mutation broke it

BASE = dict(n_layer=2, n_head=2, n_embd=4, n_positions=8, vocab_size=50257)
LAYER_SHAPES = {
    "ln_1.weight": lambda c, i: (c,), "ln_1.bias": lambda c, i: (c,),
    "attn.c_attn.weight": lambda c, i: (c, 3 * c), "attn.c_attn.bias": lambda c, i: (3 * c,),
    "attn.c_proj.weight": lambda c, i: (c, c), "attn.c_proj.bias": lambda c, i: (c,),
    "ln_2.weight": lambda c, i: (c,), "ln_2.bias": lambda c, i: (c,),
    "mlp.c_fc.weight": lambda c, i: (c, i), "mlp.c_fc.bias": lambda c, i: (i,),
    "mlp.c_proj.weight": lambda c, i: (i, c), "mlp.c_proj.bias": lambda c, i: (c,),
}  # fmt: skip

# (field, value, breaks the checkpoint): values differ from BASE unless marked harmless.
CONFIG_MUTATIONS = [
    ("n_layer", 1, True), ("n_layer", 3, True), ("n_layer", True, True), ("n_layer", 2.0, True),
    ("n_embd", 5, True), ("n_embd", 8, True), ("n_head", 1, False), ("n_head", 4, False), ("n_head", 3, True),
    ("n_positions", 16, True), ("vocab_size", 50000, True), ("vocab_size", 50258, True),
    ("n_inner", 7, True), ("n_inner", 0, True), ("n_inner", None, False), ("n_inner", 16, False),
    ("layer_norm_epsilon", 1e-6, False), ("layer_norm_epsilon", 0, True), ("layer_norm_epsilon", "1e-5", True),
    ("activation_function", "gelu_pytorch_tanh", False), ("activation_function", "relu", True),
    ("scale_attn_weights", False, True), ("scale_attn_by_inverse_layer_idx", True, True),
    ("reorder_and_upcast_attn", True, True), ("tie_word_embeddings", False, True), ("add_cross_attention", True, True),
    ("add_cross_attention", False, False), ("model_type", "gpt_neo", True), ("resid_pdrop", 0.0, False),
    ("resid_pdrop", 1.5, True), ("n_ctx", 99, False),
    ("n_embd", KeyError, True), ("vocab_size", KeyError, False), ("layer_norm_epsilon", KeyError, False),
    ("activation_function", KeyError, False), ("n_inner", KeyError, False),
]  # fmt: skip

EXTRA_TENSORS = [  # (name, shape, breaks)
    ("h.0.crossattention.c_attn.weight", (4, 12), True), ("h.2.ln_1.weight", (4,), True), ("foo.bar", (1,), True),
    ("lm_head.weight", (50257, 4), False), ("lm_head.weight", (50257, 5), True), ("score.weight", (3, 4), False),
    ("multiple_choice_head.summary.weight", (1, 4), False), ("classifier.bias", (2,), False),
    ("h.1.attn.masked_bias", (), False), ("h.9.attn.bias", (1, 1, 8, 8), False),
]  # fmt: skip

mutation = st.one_of(
    st.tuples(st.just("config"), st.sampled_from(CONFIG_MUTATIONS)),
    st.tuples(st.just("drop"), st.integers(0, 10_000)),
    st.tuples(st.just("extra"), st.sampled_from(EXTRA_TENSORS)),
    st.tuples(st.just("reshape"), st.integers(0, 10_000)),
    st.tuples(st.just("dtype"), st.tuples(st.integers(0, 10_000), st.sampled_from(
        [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool]))),
    st.tuples(st.just("duplicate"), st.integers(0, 10_000)),
)


def base_tensors(prefix: str, buffers: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, inner = BASE["n_embd"], 4 * BASE["n_embd"]
    shapes = {"wte.weight": (BASE["vocab_size"], c), "wpe.weight": (BASE["n_positions"], c)}
    for i in range(BASE["n_layer"]):
        shapes.update({f"h.{i}.{k}": f(c, inner) for k, f in LAYER_SHAPES.items()})
        if buffers:
            shapes[f"h.{i}.attn.bias"] = (1, 1, 8, 8)
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,)})
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def is_required(key: str) -> bool:
    name = key.removeprefix("transformer.")
    return not (name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"
                or name.startswith(("score.", "multiple_choice_head.", "qa_outputs.", "classifier.")))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(["transformer.", ""]),
    buffers=st.booleans(),
    seed=st.integers(0, 2**16),
    mutations=st.lists(mutation, max_size=3),
)
def test_check_passes_exactly_when_from_pretrained_loads(prefix, buffers, seed, mutations):
    """Random config and tensor-set mutations of a valid tiny checkpoint: check_checkpoint passes if and only if
    GPT2.from_pretrained loads it, and if and only if no mutation broke it; what loads holds exactly the file's
    tensors and computes what transformers computes."""
    config = json.loads(HFConfig(**BASE).to_json_string())
    tensors = base_tensors(prefix, buffers, seed)
    config_harm: dict[str, bool] = {}  # the last mutation of a field decides whether that field is broken
    tensor_harm = False
    touched: set[str] = set()  # each tensor is mutated at most once, so mutations cannot undo each other
    for kind, arg in mutations:
        if kind == "config":
            field_, value, harmful = arg
            if value is KeyError:
                config.pop(field_, None)
            else:
                config[field_] = value
            config_harm[field_] = harmful
            continue
        if kind == "extra":
            name, shape, harmful = arg
            key = prefix + name if name.startswith("h.") else name  # heads sit outside `transformer.`
            if key not in tensors and key not in touched:
                tensors[key] = torch.zeros(shape)
                touched.add(key)
                tensor_harm |= harmful
            continue
        index = arg[0] if kind == "dtype" else arg
        candidates = sorted(set(tensors) - touched)
        if not candidates:
            continue
        key = candidates[index % len(candidates)]
        touched.add(key)
        if kind == "drop":
            del tensors[key]
            tensor_harm |= is_required(key)
        elif kind == "reshape":
            t = tensors[key]
            tensors[key] = t.reshape(-1).contiguous() if t.dim() >= 2 else t.unsqueeze(0).contiguous()
            tensor_harm |= is_required(key) or key.endswith("lm_head.weight")
        elif kind == "dtype":
            dtype = arg[1]
            tensors[key] = tensors[key].to(dtype)
            tensor_harm |= is_required(key) and not dtype.is_floating_point
        elif kind == "duplicate":
            other = key.removeprefix("transformer.") if key.startswith("transformer.") else "transformer." + key
            tensors[other] = tensors[key].clone()
            touched.add(other)
            tensor_harm = True
    wte = tensors.get(prefix + "wte.weight")
    if "lm_head.weight" in tensors and tensors["lm_head.weight"].shape == (50257, 4) and wte is not None:
        # A saved lm_head.weight is the tied wte (transformers 4 wrote it into .bin files); transformers 5 would
        # read this copy, so it must hold the same values.
        tensors["lm_head.weight"] = wte.clone()
    should_pass = not tensor_harm and not any(config_harm.values())
    event("loadable" if should_pass else "refused")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "config.json").write_text(json.dumps(config))
        save_file(tensors, directory / "model.safetensors")
        try:
            info = check_checkpoint(directory)
        except CheckpointError as exc:
            info = None
            assert tmp not in str(exc)
        try:
            model = GPT2.from_pretrained(directory).eval()
        except CheckpointError as exc:
            model = None
            assert tmp not in str(exc)
        assert (info is not None) == (model is not None)
        assert (info is not None) == should_pass, mutations
        if model is None:
            return
        # What loaded is exactly the file's tensors (cast to float32, Conv1D weights transposed), and it computes
        # what transformers computes from the same folder.
        params = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
        for name in info.tensors:
            stored = tensors[prefix + name].float()
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                stored = stored.t()
            torch.testing.assert_close(params[name], stored, atol=0, rtol=0)
        reference = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
        idx = torch.randint(0, 50257, (1, info.n_positions))
        torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, dtype, layout, value):
    """A NaN or infinite weight makes every output NaN: refused by the check and the loader, naming the tensor."""
    model = hf_tiny().to(dtype)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[2, 3] = value
    if layout == "safetensors":
        model.save_pretrained(tmp_path)
    else:
        save_bin(model, tmp_path)
    message = refused(tmp_path, "tensor h.1.mlp.c_proj.weight holds NaN or infinite values")
    assert message.startswith("model.safetensors:" if layout == "safetensors" else "pytorch_model.bin:")
    assert check_checkpoint(tmp_path, check_values=False).parameter_count > 0  # the header pass alone is fine


def test_non_finite_values_in_ignored_tensors_are_fine(saved):
    directory, _ = saved
    edit_safetensors(directory, lambda tensors: tensors.__setitem__("score.weight", torch.full((2, C), float("nan"))))
    assert "score.weight" in check_checkpoint(directory).ignored
    GPT2.from_pretrained(directory)
