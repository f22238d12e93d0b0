"""The root scripts run end to end as a user runs them: subprocesses on a tiny random model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script_env(tiny_model_factory: Callable[[str], str]) -> dict[str, str]:
    """The environment of a script run on the tiny Qwen3 (float32, small KV pool, offline)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "LOAD_FORMAT")}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MODEL_LOCAL_DIR=tiny_model_factory("qwen3"),
        DTYPE="float32",
        DEVICE="cpu",
        KV_CACHE_CPU_TOKENS="4096",
        LOG_LEVEL="info",
    )
    return env


def run_script(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def summary_value(stdout: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}:\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{stdout}"
    return match.group(1).strip()


def test_smoke_test_streams_and_summarises(
    script_env: dict[str, str], smollm2_tokenizer: Any
) -> None:
    prompt = "Hello mini-sglang"
    result = run_script(script_env, "smoke_test.py", "--raw", "--max-new-tokens", "6", prompt)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--- summary ---" in out
    assert int(summary_value(out, "prompt tokens")) == len(smollm2_tokenizer.encode(prompt))
    generated = int(summary_value(out, "generated tokens"))
    assert 1 <= generated <= 6
    reason = summary_value(out, "finish reason")
    assert reason == "length" if generated == 6 else reason == "stop"
    assert summary_value(out, "time to first tok").endswith(" ms")
    assert summary_value(out, "decode speed").endswith(" tok/s")


def test_smoke_test_rejects_bad_options_before_loading(script_env: dict[str, str]) -> None:
    result = run_script(script_env, "smoke_test.py", "--max-new-tokens", "0", "hi")
    assert result.returncode != 0
    assert "max_tokens must be at least 1" in result.stderr


def test_bench_cpu_writes_summary_json_and_png(script_env: dict[str, str], tmp_path: Path) -> None:
    streams, new_tokens = 2, 8
    result = run_script(
        script_env, "bench_suite.py", "cpu", "--num-prompts", str(streams),
        "--max-output", str(new_tokens), "--results-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY cpu:")]
    assert len(summaries) == 1, result.stdout
    assert "tok/s" in summaries[0] and "vs HF" in summaries[0]
    json_files = list(tmp_path.glob("cpu-*.json"))
    png_files = list(tmp_path.glob("cpu-*.png"))
    assert len(json_files) == 1 and len(png_files) == 1
    assert json_files[0].stem == png_files[0].stem
    assert png_files[0].read_bytes()[:8] == PNG_MAGIC
    data = json.loads(json_files[0].read_text())
    assert data["workload"] == "cpu"
    assert data["meta"]["dtype"] == "float32"
    engine = data["metrics"]["engine"]
    assert engine["single"]["output_tokens"] == new_tokens
    assert engine["multi"]["output_tokens"] == streams * new_tokens
    assert engine["multi"]["output_tok_s"] > 0
    assert data["metrics"]["baseline"]["multi"]["output_tok_s"] > 0


def greedy_chat_answer(env: dict[str, str], text: str, max_new_tokens: int) -> str:
    """The in-process engine's greedy answer to one user message."""
    from config import load_config
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams

    engine = Engine(load_config(env))
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        [[output]] = engine.generate([[{"role": "user", "content": text}]], params)
    finally:
        engine.shutdown()
    return output.text


def test_smoke_test_refuses_a_request_past_the_context(script_env: dict[str, str]) -> None:
    result = run_script(script_env, "smoke_test.py", "--max-new-tokens", "100000", "hi")
    assert result.returncode == 2
    assert "exceeds" in result.stderr and "Traceback" not in result.stderr


def test_smoke_test_reports_a_model_that_does_not_load(
    script_env: dict[str, str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-model-here")
    result = run_script({**script_env, "MODEL_LOCAL_DIR": missing}, "smoke_test.py", "hi")
    assert result.returncode == 1
    assert "no-model-here" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script", [("smoke_test.py", "hi"), ("-m", "ipc.zmq_control", "health")],
                         ids=["smoke_test", "zmq_control"])
def test_a_bad_flag_is_one_line_not_a_traceback(
    script_env: dict[str, str], script: tuple[str, ...]
) -> None:
    result = run_script({**script_env, "DTYPE": "float64"}, *script)
    assert result.returncode == 2
    assert "DTYPE" in result.stderr and "Traceback" not in result.stderr


def test_cli_demo_takes_an_openai_base_url_too() -> None:
    """--url accepts the server root or the /v1 base URL an OpenAI client is given."""
    from cli_demo import server_root

    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/"):
        assert server_root(url) == "http://127.0.0.1:8000"


def test_cli_demo_survives_a_refused_turn_and_a_server_that_is_down(
    script_env: dict[str, str]
) -> None:
    """A turn past the context is reported and dropped, the chat goes on; a --url that
    answers nothing is one error line, not a traceback."""
    too_long = " ".join(["word"] * 2000)
    result = run_script(
        script_env, "cli_demo.py", "--multi-turn", "--verbose", "--max-new-tokens", "4",
        "--temperature", "0", stdin=f"Hello there\n{too_long}\nAnd again\n",
    )
    assert result.returncode == 0, result.stderr
    assert "context is 512" in result.stderr and "Traceback" not in result.stderr
    assert len(re.findall(r"prompt \d+ tokens", result.stderr)) == 2  # both other turns
    down = run_script(script_env, "cli_demo.py", "--url", "http://127.0.0.1:9", "hello")
    assert down.returncode == 1
    assert "ERROR" in down.stderr and "Traceback" not in down.stderr


def test_cli_demo_answers_a_prompt_from_stdin(script_env: dict[str, str]) -> None:
    result = run_script(
        script_env, "cli_demo.py", "--max-new-tokens", "4", "--temperature", "0",
        stdin="Hello there\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_chat_answer(script_env, "Hello there", 4) + "\n"


def test_cli_demo_multi_turn_reuses_the_history(script_env: dict[str, str]) -> None:
    result = run_script(
        script_env, "cli_demo.py", "--multi-turn", "--verbose", "--max-new-tokens", "4",
        "--temperature", "0", stdin="Hello there\nAnd again\n/exit\nnever sent\n",
    )
    assert result.returncode == 0, result.stderr
    turns = [
        (int(m[1]), int(m[2]))
        for m in re.finditer(r"prompt (\d+) tokens \((\d+) cached\)", result.stderr)
    ]
    assert len(turns) == 2, result.stderr
    (first_prompt, first_cached), (second_prompt, second_cached) = turns
    assert first_cached == 0
    assert second_prompt > first_prompt
    assert second_cached >= first_prompt


def test_workload_generators_are_seeded_and_shaped() -> None:
    from benchmarks.workloads import arrival_offsets, random_requests, shared_prefix_requests

    first = random_requests(50, input_range=(3, 9), output_range=(2, 4), vocab_size=100, seed=7)
    again = random_requests(50, input_range=(3, 9), output_range=(2, 4), vocab_size=100, seed=7)
    other = random_requests(50, input_range=(3, 9), output_range=(2, 4), vocab_size=100, seed=8)
    assert first == again and first != other
    assert all(3 <= r.input_len <= 9 and 2 <= r.max_new_tokens <= 4 for r in first)
    assert all(0 <= t < 100 for r in first for t in r.prompt_ids)
    assert {r.input_len for r in first} == set(range(3, 10))

    groups = shared_prefix_requests(num_groups=3, prompts_per_group=4, system_len=10,
                                    question_len=5, output_len=2, vocab_size=1000, seed=0)
    assert len(groups) == 12 and all(r.input_len == 15 for r in groups)
    prefixes = [tuple(r.prompt_ids[:10]) for r in groups]
    assert [len(set(prefixes[g * 4 : g * 4 + 4])) for g in range(3)] == [1, 1, 1]
    assert len(set(prefixes)) == 3

    assert arrival_offsets(4, float("inf")) == [0.0] * 4
    paced = arrival_offsets(2000, 10.0, seed=1)
    assert paced == sorted(paced) and 150 < paced[-1] < 250


def test_report_percentiles_and_files(tmp_path: Path) -> None:
    from benchmarks.report import BenchResult, PlotPanel, percentile, write_result

    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0], 100) == 3.0
    result = BenchResult(
        workload="unit", summary="s", metrics={"missing": float("nan")},
        table_headers=["a", "b"], table_rows=[["x", 1.5]],
        panels=[PlotPanel("t", "tok/s", {"ours": {"c": 2.0}, "theirs": {"c": float("nan")}})],
    )
    files = write_result(result, tmp_path / "out")
    assert json.loads(files.json_path.read_text())["metrics"] == {"missing": None}
    assert files.png_path is not None and files.png_path.read_bytes()[:8] == PNG_MAGIC
    assert result.table().splitlines()[2].split() == ["x", "1.5"]


def test_scheduler_profile_reports_both_step_kinds(script_env: dict[str, str]) -> None:
    result = run_script(script_env, "-m", "benchmarks.scheduler_profile", "--num-prompts",
                        "32", "--top", "3")
    assert result.returncode == 0, result.stderr
    counts = {line.split()[0]: int(line.split()[2]) for line in result.stdout.splitlines()
              if line.startswith(("mixed ", "decode "))}
    assert counts["mixed"] > 0 and counts["decode"] >= 100  # 128 new tokens each


def test_step_timeline_counts_the_steps_of_a_workload(script_env: dict[str, str]) -> None:
    """6 requests of 40 prompt and 12 output tokens: the steps forward every prompt token and
    every output token but the last (6 x 40 + 6 x 11 = 306 tokens, however the prefills fall
    into steps) in at least 12 steps, decode steps carry at most the 6 requests, and the parts
    cover every step."""
    out = run_script(script_env, "-m", "benchmarks.step_timeline", "--num-prompts", "6",
                     "--max-input", "40", "--max-output", "12", "--parts", "2")
    assert out.returncode == 0, out.stderr
    assert "offline: 6 requests, 72 output tokens" in out.stdout
    rows = {}
    for line in out.stdout.splitlines():
        match = re.match(r"(\S.*?)\s+steps\s+(\d+) .* batch\s+([\d.]+)\s+tokens\s+([\d.]+)$",
                         line)
        if match:
            rows[match.group(1)] = (int(match.group(2)), float(match.group(3)),
                                    float(match.group(4)))
    kinds = [rows["decode"], rows["prefill/mixed"]]
    assert round(sum(steps * tokens for steps, _, tokens in kinds)) == 306
    assert 1 <= rows["decode"][1] <= 6 and sum(steps for steps, _, _ in kinds) >= 12
    assert rows["part 1/2"][0] + rows["part 2/2"][0] == sum(steps for steps, _, _ in kinds)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_agreement_report(tmp_path: Path, dtype: str) -> None:
    """The agreement harness: float32 native equals float32 HF exactly; bfloat16 stays close."""
    from transformers import Qwen3Config

    from benchmarks.bf16_agreement import main

    Qwen3Config(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=128,
                max_position_embeddings=512).save_pretrained(str(tmp_path / "config"))
    assert main(["--config", str(tmp_path / "config"), "--device", "cpu", "--dtype", dtype,
                 "--prompts", "2", "--prompt-len", "12", "--new-tokens", "6",
                 "--results-dir", str(tmp_path / "results")]) == 0
    [path] = (tmp_path / "results").glob("bf16_agreement-*.json")
    result = json.loads(path.read_text())
    assert result["positions"] == result["hf_same_dtype"]["positions"] == 12
    if dtype == "float32":
        assert result["agreement_rate"] == 1.0 and result["max_abs_logit_diff"] < 1e-4
        assert result["hf_same_dtype"]["max_abs_logit_diff"] == 0.0
    else:
        assert 0 < result["hf_same_dtype"]["max_abs_logit_diff"] < 0.1
        assert result["agreement_rate"] >= 0.5 and 0 < result["max_abs_logit_diff"] < 0.1
