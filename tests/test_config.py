import os
import re
from pathlib import Path

import pytest
import torch

from config import FLAGS, ConfigError, Flag, cpu_has_native_bf16, load_config, resolve_dtype

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md"


def test_defaults_parse() -> None:
    config = load_config({})
    assert config.prefix_cache is True
    assert config.resolved_chunked_prefill_size(torch.device("cpu")) == 2048
    assert config.resolved_chunked_prefill_size(torch.device("cuda")) == 8192
    assert load_config({"CHUNKED_PREFILL_SIZE": "512"}).resolved_chunked_prefill_size(
        torch.device("cuda")) == 512
    assert config.load_format == "auto"


def test_values_are_typed() -> None:
    config = load_config({"PREFIX_CACHE": "0", "MAX_RUNNING_REQUESTS": "8", "DTYPE": "float32"})
    assert config.prefix_cache is False
    assert config.max_running_requests == 8
    assert config.resolved_dtype() == torch.float32


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("MAX_RUNNING_REQUESTS", "0"),
        ("MAX_RUNNING_REQUESTS", "65536"),
        ("DTYPE", "float64"),
        ("PREFIX_CACHE", "maybe"),
        ("KV_CACHE_MEM_FRACTION", "1.5"),
        ("CHUNKED_PREFILL_SIZE", "lots"),
        ("LOAD_FORMAT", "pickle"),
        ("METRIC_WINDOW", "0"),  # a rate over no time
        ("QUEUE_TIMEOUT_S", "nan"),
        ("REQUEST_TIMEOUT_S", "inf"),
        ("DEVICES", "cpu,gpu0"),  # not a device name
    ],
)
def test_bad_value_names_the_flag(env: str, value: str) -> None:
    with pytest.raises(ConfigError, match=env):
        load_config({env: value})


def test_cpu_auto_dtype_is_float32_for_the_int8_c_decoder() -> None:
    """The compiled int8 decoder runs float32 activations (twice bfloat16 torch ops even on
    CPUs with native bfloat16): DTYPE=auto picks them whenever the flags ask for it."""
    cpu = {"DEVICE": "cpu"}
    assert load_config(cpu).resolved_dtype() == torch.float32
    assert load_config(cpu).resolved_kv_dtype() == torch.float32
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    for other in ({"CPU_KERNEL": "torch"}, {"WEIGHT_QUANT": "int4"}, {"BACKEND_IMPL": "hf"}):
        assert load_config({**cpu, **other}).resolved_dtype() == expected, other


def test_cpu_auto_dtype_follows_native_bf16_support() -> None:
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_every_flag_is_documented_with_its_default_and_values() -> None:
    found = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| `([^`]*)` \| ([^|]*) \|",
                       DOCS.read_text(), re.M)
    rows = {env: (default, values) for env, default, values in found}
    wrong = [(flag.env, (flag.default, flag.parse.accepts), rows.get(flag.env))
             for flag in FLAGS if rows.get(flag.env) != (flag.default, flag.parse.accepts)]
    assert not wrong, f"(flag, (default, values), documented): {wrong}"
    assert set(rows) == {flag.env for flag in FLAGS}, "a documented flag config.py lacks"


@pytest.mark.parametrize("flag", FLAGS, ids=lambda flag: flag.env)
def test_every_default_is_among_the_documented_values(flag: Flag) -> None:
    """The values column is what the parser takes: the default passes it."""
    flag.parse(flag.default)


def test_the_default_cpu_kv_pool_fits_the_available_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    """KV_CACHE_CPU_TOKENS is cut to a quarter of the RAM available; an explicit
    KV_CACHE_TOKENS is kept as asked."""
    from backend import factory

    cpu = torch.device("cpu")
    assert factory.available_ram_bytes() > 0
    per_token = 200_000  # e.g. a 28-layer model with 8 KV heads of 128 in float32 is 229,376
    monkeypatch.setattr(factory, "available_ram_bytes", lambda: 4 * 2**30)
    assert factory.kv_cache_tokens(load_config({}), cpu, per_token) == 2**30 // per_token
    assert factory.kv_cache_tokens(load_config({"KV_CACHE_TOKENS": "100000"}), cpu,
                                   per_token) == 100_000
    monkeypatch.setattr(factory, "available_ram_bytes", lambda: 64 * 2**30)
    assert factory.kv_cache_tokens(load_config({}), cpu, per_token) == 65_536
