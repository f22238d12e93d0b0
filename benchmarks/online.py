"""The online workload's plumbing: the HTTP server in a subprocess and a concurrent client.

`running_server(config)` starts `uvicorn api.server:app` on a free local port with the
benchmark's flags in its environment and waits for `/health`. `http_run` sends token-id
requests to `/v1/completions` (streaming) at a given request rate and times every chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm.auto import tqdm

from benchmarks.measure import BenchError, RunStats
from benchmarks.workloads import BenchRequest, arrival_offsets
from config import FLAGS, Config

REPO_ROOT = Path(__file__).resolve().parent.parent


def server_available() -> bool:
    """Whether this tree has the HTTP server module (api/server.py)."""
    return importlib.util.find_spec("api.server") is not None


def config_env(config: Config) -> dict[str, str]:
    """`config` as the environment variables that reproduce it in another process."""
    env: dict[str, str] = {}
    for flag in FLAGS:
        value = getattr(config, flag.attr)
        env[flag.env] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(config: Config, startup_timeout_s: float = 900.0) -> Iterator[str]:
    """A server for `config` on 127.0.0.1; yields its base URL and stops it on exit."""
    if not server_available():
        raise BenchError("the online workload needs the HTTP server, api/server.py, which is "
                         "not in this tree yet")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "uvicorn", "api.server:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, **config_env(config)}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, process, log, startup_timeout_s)
            yield url
        finally:
            _stop(process)


def _wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: IO[str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the server exited with code {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise BenchError(f"the server was not healthy after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: IO[str], chars: int = 4000) -> str:
    log.seek(0)
    return log.read()[-chars:]


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class _HttpTrace:
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0
    sent: float = 0.0


def http_run(
    url: str,
    requests: Sequence[BenchRequest],
    request_rate: float,
    desc: str,
    api_key: str | None = None,
    seed: int = 0,
) -> RunStats:
    """Send `requests` at `request_rate` per second (inf: all at once); time every chunk."""
    return asyncio.run(_http_run(url, requests, request_rate, desc, api_key, seed))


async def _http_run(
    url: str,
    requests: Sequence[BenchRequest],
    request_rate: float,
    desc: str,
    api_key: str | None,
    seed: int,
) -> RunStats:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    offsets = arrival_offsets(len(requests), request_rate, seed)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=httpx.Timeout(None), limits=limits
    ) as client:
        model = await _model_name(client)
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as progress:
            start = time.perf_counter()
            tasks = [asyncio.create_task(_send(client, model, r, start + off, progress))
                     for r, off in zip(requests, offsets)]
            traces = await _all_or_cancel(tasks)
    ends = [t.chunk_times[-1] for t in traces if t.chunk_times]
    stats = RunStats(
        num_requests=len(requests),
        wall_s=(max(ends) if ends else time.perf_counter()) - start,
        input_tokens=sum(r.input_len for r in requests),
        output_tokens=sum(t.output_tokens for t in traces),
        cached_tokens=sum(t.cached_tokens for t in traces),
    )
    for trace in traces:
        if trace.chunk_times:
            stats.ttfts_s.append(trace.chunk_times[0] - trace.sent)
            stats.itls_s.extend(b - a for a, b in zip(trace.chunk_times, trace.chunk_times[1:]))
    return stats


async def _all_or_cancel(tasks: list[asyncio.Task[_HttpTrace]]) -> list[_HttpTrace]:
    """Every task's result; the first failure cancels the others and is raised."""
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _model_name(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise BenchError(f"GET /v1/models: HTTP {response.status_code}: {response.text[:500]}")
    models = response.json().get("data") or []
    return str(models[0]["id"]) if models else "default"


async def _send(
    client: httpx.AsyncClient,
    model: str,
    request: BenchRequest,
    send_at: float,
    progress: tqdm,
) -> _HttpTrace:
    await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
    trace = _HttpTrace(sent=time.perf_counter())
    body = {
        "model": model,
        "prompt": request.prompt_ids,
        "max_tokens": request.max_new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise BenchError(f"POST /v1/completions: HTTP {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            _record_chunk(trace, json.loads(payload), time.perf_counter())
    trace.output_tokens = trace.output_tokens or len(trace.chunk_times)
    progress.update()
    return trace


def _record_chunk(trace: _HttpTrace, chunk: dict[str, Any], now: float) -> None:
    if "error" in chunk:
        raise BenchError(f"request failed: {chunk['error']}")
    if any(choice.get("text") for choice in chunk.get("choices") or []):
        trace.chunk_times.append(now)
    usage = chunk.get("usage")
    if usage:
        trace.output_tokens = int(usage.get("completion_tokens", 0))
        details = usage.get("prompt_tokens_details") or {}
        trace.cached_tokens = int(details.get("cached_tokens", 0) or 0)
