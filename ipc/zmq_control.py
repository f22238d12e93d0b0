"""The ZMQ control plane: JSON commands to the engine pool over a REQ/REP socket.

With ZMQ_CONTROL=1 the server runs a `ControlServer` beside HTTP, bound to
ZMQ_CONTROL_ENDPOINT (loopback by default). Each request is one JSON object
`{"cmd": NAME, ...}` and gets exactly one JSON reply, `{"ok": true, "result": ...}` or
`{"ok": false, "error": "..."}`; a malformed message gets an error reply and the server keeps
answering. With ZMQ_CONTROL_TOKEN set, a request must carry `"token": <the same value>`.

Commands:
- `metrics`: the pool's snapshot (engine counters, per-engine views, rolling windows);
- `health`: the pool's status and each engine's liveness;
- `list_engines`: index, device, liveness and sequences in flight of each engine;
- `warm`: `{"prompt": text}` or `{"tokens": n}` (a prompt of n tokens is made up): queued for
  the background warmer when ASYNC_PREFILL_QUEUE is on, else cached in every engine now;
- `insert_prefix`: `{"prompt": text or token ids}` cached in every engine now;
- `flush_cache`: drop every engine's unreferenced cached prefixes.

Client: `python3 -m ipc.zmq_control metrics` (or any command; `--arg key=value` adds fields,
`--endpoint` and `--token` default to the flags).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import zmq

from config import ConfigError, get_config

logger = logging.getLogger(__name__)

POLL_MS = 200
MAX_MESSAGE_BYTES = 1 << 20
MAX_WARM_TOKENS = 1 << 16


class CommandError(ValueError):
    """A command that cannot be carried out; its message is the error reply."""


class ControlServer:
    """Answers control commands for `pool` on `endpoint` from a background thread."""

    def __init__(self, pool: Any, endpoint: str, token: str = "") -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.token = token
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.bind(endpoint)
        last = self._socket.getsockopt(zmq.LAST_ENDPOINT)
        self.bound = last.decode() if isinstance(last, bytes) else endpoint
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zmq-control", daemon=True)
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "metrics": lambda _: self.pool.snapshot(),
            "health": lambda _: self.pool.health(),
            "list_engines": lambda _: self._engines(),
            "warm": self._warm,
            "insert_prefix": self._insert_prefix,
            "flush_cache": lambda _: {"freed_tokens": self.pool.flush_cache()},
        }

    def start(self) -> ControlServer:
        self._thread.start()
        logger.info("ZMQ control plane on %s", self.bound)
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            # every frame of a multipart message is read, so that REP may answer it
            frames = self._socket.recv_multipart()
            self._socket.send(self._reply(frames))

    def _reply(self, frames: list[bytes]) -> bytes:
        """The encoded reply to one message (never raises: REP must answer every request)."""
        try:
            reply = (self.handle(frames[0]) if len(frames) == 1 else
                     {"ok": False, "error": "the request must be a single-frame message"})
            return json.dumps(reply).encode()
        except Exception as exc:  # a reply that is not JSON, or a bug: the thread goes on
            logger.exception("control request failed")
            return json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode()

    def handle(self, raw: bytes) -> dict[str, Any]:
        """The reply to one raw request (never raises)."""
        try:
            request = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"ok": False, "error": "the request is not JSON"}
        except ValueError as exc:  # e.g. an integer past Python's digit limit
            return {"ok": False, "error": f"the request is not usable JSON: {exc}"}
        except RecursionError:
            return {"ok": False, "error": "the request is nested too deeply"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "the request must be a JSON object"}
        if self.token and not self._authorized(request.get("token")):
            return {"ok": False, "error": "unauthorized: missing or wrong token"}
        name = request.get("cmd")
        command = self._commands.get(name) if isinstance(name, str) else None
        if command is None:
            return {"ok": False, "error": f"unknown cmd {name!r}; known: "
                                          f"{', '.join(sorted(self._commands))}"}
        try:
            return {"ok": True, "result": command(request)}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the control plane keeps answering
            logger.exception("control command %s failed", name)
            return {"ok": False, "error": f"{name} failed: {type(exc).__name__}: {exc}"}

    def _authorized(self, token: Any) -> bool:
        """Whether `token` is ZMQ_CONTROL_TOKEN, compared in constant time as UTF-8 bytes
        (any text may come, not only ASCII)."""
        return isinstance(token, str) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self.token.encode("utf-8"))

    def _engines(self) -> list[dict[str, Any]]:
        return [{**view, "in_flight": slot.in_flight}
                for view, slot in zip(self.pool.health()["engines"], self.pool.slots,
                                      strict=True)]

    def _warm(self, request: dict[str, Any]) -> dict[str, Any]:
        prompt = self._prompt(request, allow_count=True)
        if self.pool.warm(prompt):
            return {"queued": True}
        return {"queued": False, "inserted_tokens": self.pool.insert_prefix(prompt)}

    def _insert_prefix(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"inserted_tokens": self.pool.insert_prefix(self._prompt(request))}

    def _prompt(self, request: dict[str, Any], allow_count: bool = False) -> str | list[int]:
        prompt = request.get("prompt")
        if isinstance(prompt, str) and prompt:
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = self.pool.first.info.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise CommandError(f"token ids must be in [0, {vocab})")
            return prompt
        tokens = request.get("tokens")
        if allow_count and isinstance(tokens, int) and not isinstance(tokens, bool):
            if not 0 < tokens <= min(MAX_WARM_TOKENS, self.pool.max_context_len - 1):
                raise CommandError("tokens must be between 1 and the context length")
            return [100 + i % 1000 for i in range(tokens)]
        wanted = '"prompt" (text or token ids) or "tokens" (a count)' if allow_count else \
            '"prompt" (text or token ids)'
        raise CommandError(f"{request.get('cmd')} needs {wanted}")


def request(command: str, endpoint: str, token: str = "", *, timeout_ms: int = 10_000,
            fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send one command with its extra `fields` and return the reply (a fresh REQ socket
    per call)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
    try:
        socket.connect(endpoint)
        message: dict[str, Any] = {**(fields or {}), "cmd": command}
        if token:
            message["token"] = token
        socket.send(json.dumps(message).encode())
        reply: dict[str, Any] = json.loads(socket.recv())
        return reply
    finally:
        socket.close()


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def main(argv: list[str] | None = None) -> int:
    try:  # for the endpoint and token defaults only
        config = get_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description="Send one command to the ZMQ control plane.")
    parser.add_argument("cmd", help="metrics | health | list_engines | warm | insert_prefix | "
                                    "flush_cache")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra field (JSON values are parsed), e.g. --arg tokens=512")
    parser.add_argument("--endpoint", default=config.zmq_control_endpoint)
    parser.add_argument("--token", default=config.zmq_control_token)
    args = parser.parse_args(argv)
    fields = {}
    for item in args.arg:
        key, _, value = item.partition("=")
        if key in ("cmd", "token"):
            parser.error(f"--arg {key}=... is not an extra field: give the command or --token")
        fields[key] = _parse_value(value)
    try:
        reply = request(args.cmd, args.endpoint, args.token, fields=fields)
    except zmq.Again:
        print(f"no reply from {args.endpoint}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
