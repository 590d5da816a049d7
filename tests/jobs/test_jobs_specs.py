"""The typed job specifications agree with the gpt2core objects they become."""
from typing import get_args

import pytest
from pydantic import ValidationError

from api.errors import validation_param
from gpt2core.config import GPT2_LINEAR_MODULES, LORA_DEFAULT_TARGET_MODULES, PRESETS
from jobs.specs import JOB_SPEC, FinetuneSpec, FullMethod, LoraMethod, PresetName, stored_params


def test_preset_names_are_gpt2cores():
    assert get_args(PresetName) == tuple(PRESETS)


# ---- finetune method: full or LoRA -------------------------------------------------------------------------------

FINETUNE = {"type": "finetune", "training_file": "file-abc", "model": "model-abc"}


def test_finetune_method_defaults_to_full():
    spec = JOB_SPEC.validate_python(FINETUNE)
    assert isinstance(spec, FinetuneSpec) and spec.method == FullMethod(type="full")
    assert stored_params(spec)["method"] == {"type": "full"}


def test_a_lora_method_fills_its_defaults_and_round_trips():
    spec = JOB_SPEC.validate_python({**FINETUNE, "method": {"type": "lora", "rank": 16, "alpha": 32}})
    assert isinstance(spec, FinetuneSpec)
    assert spec.method == LoraMethod(type="lora", rank=16, alpha=32.0, dropout=0.0,
                                     target_modules=list(LORA_DEFAULT_TARGET_MODULES))
    stored = stored_params(spec)
    assert stored["method"] == {"type": "lora", "rank": 16, "alpha": 32.0, "dropout": 0.0,
                                "target_modules": ["c_attn", "c_proj", "c_fc"]}
    assert JOB_SPEC.validate_python({**FINETUNE, **stored}) == spec  # as a worker reads the job back
    named = JOB_SPEC.validate_python({**FINETUNE, "method": {"type": "lora", "target_modules": ["attn.c_proj"]}})
    assert isinstance(named, FinetuneSpec) and isinstance(named.method, LoraMethod)
    assert named.method.target_modules == ["attn.c_proj"]


def first_error(body: dict) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        JOB_SPEC.validate_python(body)
    error = caught.value.errors()[0]
    return validation_param(error), error["msg"]


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "lora", "rank": 0}, "method.rank"),
        ({"type": "lora", "rank": 257}, "method.rank"),
        ({"type": "lora", "rank": "8"}, "method.rank"),  # strict: a string is not an integer
        ({"type": "lora", "rank": 8.5}, "method.rank"),
        ({"type": "lora", "alpha": 0}, "method.alpha"),
        ({"type": "lora", "alpha": 1025}, "method.alpha"),
        ({"type": "lora", "dropout": 1}, "method.dropout"),
        ({"type": "lora", "dropout": -0.1}, "method.dropout"),
        ({"type": "lora", "target_modules": []}, "method.target_modules"),
        ({"type": "lora", "target_modules": ["c_attn"] * 9}, "method.target_modules"),
        ({"type": "lora", "target_modules": ["q_proj"]}, "method.target_modules"),
        ({"type": "lora", "target_modules": ["lm_head"]}, "method.target_modules"),
        ({"type": "lora", "target_modules": ["c_fc", "c_fc"]}, "method.target_modules"),
        ({"type": "lora", "target_modules": "c_attn"}, "method.target_modules"),
        ({"type": "lora", "bias": "all"}, "method.bias"),
        ({"type": "full", "rank": 8}, "method.rank"),
        ({"type": "qlora"}, "method.type"),
        ({}, "method.type"),
        ("lora", "method"),
    ],
)
def test_invalid_methods_are_refused_naming_the_field(method, param):
    assert first_error({**FINETUNE, "method": method})[0] == param


def test_unknown_target_modules_are_named_with_the_allowed_ones():
    _, message = first_error({**FINETUNE, "method": {"type": "lora", "target_modules": ["c_attn", "q_proj"]}})
    assert "'q_proj' is not a Linear layer of GPT-2; choose from " + ", ".join(GPT2_LINEAR_MODULES) in message


def test_only_finetune_jobs_take_a_method():
    body = {"type": "train", "training_file": "file-abc", "method": {"type": "lora"}}
    assert first_error(body)[0] == "method"


def test_the_schema_lists_gpt2cores_module_names():
    """The OpenAPI document's choices are gpt2core.config's list, the one the validator and apply_lora use."""
    schema = LoraMethod.model_json_schema()["properties"]["target_modules"]
    assert schema["items"]["enum"] == list(GPT2_LINEAR_MODULES)
    assert schema["default"] == list(LORA_DEFAULT_TARGET_MODULES) and schema["uniqueItems"] is True
    assert (schema["minItems"], schema["maxItems"]) == (1, 8)


def test_lora_targets_that_name_one_layer_twice_are_refused():
    body = {"type": "finetune", "training_file": "f", "model": "model-x",
            "method": {"type": "lora", "target_modules": ["c_attn", "attn.c_attn"]}}
    with pytest.raises(ValidationError, match="both name attn.c_attn"):
        JOB_SPEC.validate_python(body)
    body["method"]["target_modules"] = ["attn.c_proj", "mlp.c_proj"]
    assert JOB_SPEC.validate_python(body).method.target_modules == ["attn.c_proj", "mlp.c_proj"]


def test_an_auto_batch_takes_the_default_accumulation_only():
    def submit(hyper):
        return JOB_SPEC.validate_python({"type": "train", "training_file": "f", "hyperparameters": hyper},
                                        context={"submission": True})

    assert submit({"batch_size": "auto", "grad_accum_steps": 1}).hyperparameters.batch_size == "auto"
    with pytest.raises(ValidationError, match="grad_accum_steps"):
        submit({"batch_size": "auto", "grad_accum_steps": 4})


@pytest.mark.parametrize("hyper, devices", [({"batch_size": 8}, 2), ({"batch_size": 3, "grad_accum_steps": 2}, 2),
                                            ({"batch_size": 1, "grad_accum_steps": 4}, 4), ({"batch_size": "auto"}, 3)])
def test_devices_take_a_global_batch_that_splits_evenly(hyper, devices):
    spec = JOB_SPEC.validate_python({**FINETUNE, "hyperparameters": hyper, "devices": devices})
    assert spec.devices == devices and stored_params(spec)["devices"] == devices
    assert JOB_SPEC.validate_python(FINETUNE).devices == 1


@pytest.mark.parametrize("hyper, devices", [({"batch_size": 3}, 2), ({"batch_size": 4, "grad_accum_steps": 3}, 8),
                                            ({"batch_size": 8}, 3)])
def test_a_batch_that_does_not_split_across_the_devices_is_refused_naming_both(hyper, devices):
    param, message = first_error({**FINETUNE, "hyperparameters": hyper, "devices": devices})
    assert param == "devices" and f"hyperparameters.batch_size {hyper['batch_size']}" in message
    assert f"does not split evenly across {devices} devices" in message


@pytest.mark.parametrize("devices", [0, 17, "2", 1.5, True])
def test_devices_is_a_count_from_1_to_16(devices):
    assert first_error({**FINETUNE, "devices": devices})[0] == "devices"
