"""fp16 on CPU workers is refused before any worker starts, naming the key and the fix."""

from __future__ import annotations

import pytest

from launcher.errors import RecipeError
from launcher.recipe import from_dict
from launcher.runtime.devices import check_dtype


def _recipe(dtype: str, gpus: int = 0):
    return from_dict({
        "name": "dtype",
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                  "dtype": dtype},
        "tokenizer": {"builtin": "bytes"},
        "data": {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 32}, "max_seq_len": 128},
        "train": {"max_steps": 2},
        "resources": {"gpus_per_node": gpus} if gpus else {"cpu_workers": 1},
    })


def _cpu_has_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


def test_fp16_on_cpu_workers_is_refused_by_the_preflight():
    if _cpu_has_fp16():
        pytest.skip("this CPU has fp16 kernels: DeepSpeed trains fp16 on it")
    from launcher.runtime.job import preflight

    recipe = _recipe("fp16")
    with pytest.raises(RecipeError) as e:
        preflight(recipe)
    assert e.value.key == "model.dtype"
    assert "bf16" in str(e.value) and "gpus_per_node" in str(e.value)


def test_other_dtypes_and_gpu_workers_pass():
    check_dtype(_recipe("bf16"))
    check_dtype(_recipe("fp32"))
    check_dtype(_recipe("fp16", gpus=8))  # checked where the GPUs are, not on this CPU
