"""The ZMQ control plane against a live server with a two-engine pool: every command, the
token, garbage input, and the command-line client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import pytest
import zmq

from api.server import create_app
from config import load_config
from ipc.zmq_control import request
from tests.test_server import LiveServer

TOKEN = "control-secret"
ROOT = Path(__file__).resolve().parent.parent


def _free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def control(tiny_model_factory: Callable[[str], str]) -> Iterator[tuple[LiveServer, str]]:
    endpoint = _free_endpoint()
    config = load_config({
        "MODEL_LOCAL_DIR": tiny_model_factory("qwen3"), "DTYPE": "float32",
        "KV_CACHE_CPU_TOKENS": "4096", "NUM_ENGINES": "2", "ZMQ_CONTROL": "1",
        "ZMQ_CONTROL_ENDPOINT": endpoint, "ZMQ_CONTROL_TOKEN": TOKEN,
        "ASYNC_PREFILL_QUEUE": "0",
    })
    live = LiveServer(create_app(config=config)).start()
    live.wait_ready()
    yield live, endpoint
    live.stop()


def _ask(endpoint: str, cmd: str, **fields: Any) -> dict[str, Any]:
    return request(cmd, endpoint, TOKEN, fields=fields)


def test_metrics_health_and_engines(control: tuple[LiveServer, str]) -> None:
    _, endpoint = control
    metrics = _ask(endpoint, "metrics")
    assert metrics["ok"] is True
    result = metrics["result"]
    assert isinstance(result, dict) and result["pool"]["num_engines"] == 2
    health = _ask(endpoint, "health")
    assert health == {"ok": True, "result": {"status": "ok", "engines": [
        {"engine": 0, "device": "cpu", "alive": True},
        {"engine": 1, "device": "cpu", "alive": True}]}}
    engines = _ask(endpoint, "list_engines")["result"]
    assert isinstance(engines, list) and [e["in_flight"] for e in engines] == [0, 0]


def test_warm_insert_and_flush(control: tuple[LiveServer, str]) -> None:
    live, endpoint = control
    prompt = " ".join(["prefix"] * 40)
    inserted = _ask(endpoint, "insert_prefix", prompt=prompt)
    assert inserted["ok"] is True and inserted["result"]["inserted_tokens"] > 30
    warmed = _ask(endpoint, "warm", tokens=64)
    assert warmed == {"ok": True, "result": {"queued": False, "inserted_tokens": 64}}
    reply = httpx.post(live.url + "/v1/completions", timeout=60, json={
        "model": "qwen3", "prompt": prompt + " tail", "max_tokens": 2})
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 30
    flushed = _ask(endpoint, "flush_cache")
    assert flushed["ok"] is True and flushed["result"]["freed_tokens"] > 0
    for bad in ({"prompt": ""}, {"tokens": 0}, {"tokens": "many"}, {"prompt": [1, -5]}):
        answer = _ask(endpoint, "warm", **bad)
        assert answer["ok"] is False and answer["error"]


def test_token_and_garbage(control: tuple[LiveServer, str]) -> None:
    _, endpoint = control
    assert request("metrics", endpoint)["ok"] is False  # no token
    wrong = request("metrics", endpoint, "not-it")
    assert wrong == {"ok": False, "error": "unauthorized: missing or wrong token"}
    assert request("metrics", endpoint, "é-not-ascii")["ok"] is False
    assert request("metrics", endpoint, 12345)["ok"] is False  # type: ignore[arg-type]
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    nested = b"[" * 100_000 + b"]" * 100_000  # past the JSON decoder's recursion limit
    huge = b'{"cmd": "health", "n": ' + b"9" * 5000 + b"}"  # past int's digit limit
    for frames in ([b"\xff\xfe not json"], [b"[1, 2]"], [b"{}"], [nested], [huge],
                   [json.dumps({"cmd": "explode", "token": TOKEN}).encode()],
                   [json.dumps({"cmd": "health", "token": TOKEN}).encode(), b"more"]):
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(endpoint)
        sock.send_multipart(frames)
        reply = json.loads(sock.recv())
        sock.close(linger=0)
        assert reply["ok"] is False and reply["error"]
        assert _ask(endpoint, "health")["ok"] is True  # still answering


def test_command_line_client(control: tuple[LiveServer, str]) -> None:
    _, endpoint = control
    done = subprocess.run(
        [sys.executable, "-m", "ipc.zmq_control", "list_engines", "--endpoint", endpoint,
         "--token", TOKEN], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [e["engine"] for e in json.loads(done.stdout)["result"]] == [0, 1]
    refused = subprocess.run(
        [sys.executable, "-m", "ipc.zmq_control", "warm", "--arg", "tokens=0", "--endpoint",
         endpoint, "--token", TOKEN], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False)
    assert refused.returncode == 1 and "tokens must be" in refused.stdout
    for reserved in ("token=x", "cmd=flush_cache"):  # not extra fields
        clash = subprocess.run(
            [sys.executable, "-m", "ipc.zmq_control", "metrics", "--arg", reserved,
             "--endpoint", endpoint, "--token", TOKEN], cwd=ROOT, capture_output=True,
            text=True, timeout=60, check=False)
        assert clash.returncode == 2 and "is not an extra field" in clash.stderr


def test_a_control_plane_that_cannot_bind_fails_the_whole_server(
    tiny_model_factory: Callable[[str], str]
) -> None:
    """An endpoint already taken fails start-up as a whole: /health says failed and the
    API answers 503, rather than serving while health reports a failure."""
    endpoint = _free_endpoint()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    taken = context.socket(zmq.REP)
    taken.bind(endpoint)
    config = load_config({
        "MODEL_LOCAL_DIR": tiny_model_factory("qwen3"), "DTYPE": "float32",
        "KV_CACHE_CPU_TOKENS": "4096", "ZMQ_CONTROL": "1", "ZMQ_CONTROL_ENDPOINT": endpoint,
    })
    live = LiveServer(create_app(config=config)).start()
    try:
        health = live.wait_loaded()
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "Address already in use" in health.json()["error"]
        answer = httpx.post(live.url + "/v1/completions", timeout=30,
                            json={"model": "qwen3", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 503
    finally:
        live.stop()
        taken.close(linger=0)
