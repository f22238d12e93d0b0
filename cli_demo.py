"""Chat with the model from a terminal: one answer, or a multi-turn conversation.

    python3 cli_demo.py "Why is the sky blue?"         # one answer, in-process engine
    echo "Why is the sky blue?" | python3 cli_demo.py  # the prompt from stdin
    python3 cli_demo.py --multi-turn                   # a chat; /exit or EOF ends it
    python3 cli_demo.py --url http://127.0.0.1:8000    # through a running server

In-process, the engine's radix cache keeps the conversation so far: each turn only prefills
the new message (`--verbose` logs the cached-token count of every turn). With `--url` the
answers stream from the server's OpenAI-compatible `/v1/chat/completions` endpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

logger = logging.getLogger("cli_demo")

EXIT_COMMAND = "/exit"
Message = dict[str, str]


@dataclass
class TurnUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class ChatBackend(Protocol):
    """Streams the assistant's reply to a conversation; `usage` describes the last reply."""

    usage: TurnUsage

    def stream_reply(self, messages: list[Message]) -> Iterator[str]: ...

    def close(self) -> None: ...


class TurnError(RuntimeError):
    """One turn failed (a refused request, an engine error): the chat can go on."""


class LocalChat:
    """An in-process Engine built from the usual flags."""

    def __init__(self, max_new_tokens: int, temperature: float, seed: int | None) -> None:
        from backend.factory import create_engine
        from config import get_config
        from engine.sampling_params import SamplingParams

        self.params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
        self.params.validate()  # a bad option stops here, before the model loads
        self.engine = create_engine(get_config())
        self.usage = TurnUsage()

    def stream_reply(self, messages: list[Message]) -> Iterator[str]:
        from engine.sampling_params import InvalidRequestError

        self.usage = TurnUsage()
        try:
            yield from self._deltas(messages)
        except InvalidRequestError as exc:  # e.g. the history outgrew the context
            raise TurnError(str(exc)) from None

    def _deltas(self, messages: list[Message]) -> Iterator[str]:
        for delta in self.engine.stream(list(messages), self.params):
            if delta.error:
                raise TurnError(delta.error)
            if delta.usage is not None:
                self.usage = TurnUsage(
                    delta.usage.prompt_tokens,
                    delta.usage.completion_tokens,
                    delta.usage.cached_tokens,
                )
            if delta.text:
                yield delta.text

    def close(self) -> None:
        self.engine.shutdown()


class RemoteChat:
    """A running server, through its OpenAI-compatible streaming chat endpoint."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        model: str | None,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=server_root(url), headers=headers, timeout=httpx.Timeout(30.0, read=None)
        )
        self.model = model or self._first_model()
        self.options: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if seed is not None:
            self.options["seed"] = seed
        self.usage = TurnUsage()

    def _first_model(self) -> str:
        response = self.client.get("/v1/models")
        _raise_for_error(response)
        models = response.json().get("data") or []
        return str(models[0]["id"]) if models else "default"

    def stream_reply(self, messages: list[Message]) -> Iterator[str]:
        self.usage = TurnUsage()
        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.options,
        }
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_error(response)
            for chunk in _sse_events(response.iter_lines()):
                self._record_usage(chunk.get("usage"))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

    def _record_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        details = usage.get("prompt_tokens_details") or {}
        self.usage = TurnUsage(
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            int(details.get("cached_tokens", 0) or 0),
        )

    def close(self) -> None:
        self.client.close()


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of `data:` lines until `data: [DONE]`; an error payload raises."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise TurnError(_error_message(event))
        yield event


def _raise_for_error(response: httpx.Response) -> None:
    """TurnError for a refused request (4xx), RuntimeError for anything else."""
    if response.status_code < 400:
        return
    try:
        message = _error_message(response.json())
    except ValueError:
        message = response.text
    error = TurnError if response.status_code < 500 else RuntimeError
    raise error(f"HTTP {response.status_code}: {message}")


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error or body)


def answer(backend: ChatBackend, messages: list[Message]) -> str:
    """Stream one reply to stdout as it arrives; return it whole."""
    pieces: list[str] = []
    for text in backend.stream_reply(messages):
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    usage = backend.usage
    logger.debug(
        "prompt %d tokens (%d cached), %d generated",
        usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
    )
    return "".join(pieces)


def read_turn(interactive: bool) -> str | None:
    """The user's next message; None at EOF or /exit."""
    try:
        line = input("you> ") if interactive else sys.stdin.readline()
    except EOFError:
        return None
    if not interactive and not line:
        return None
    line = line.strip()
    return None if line == EXIT_COMMAND else line


def user_turns(interactive: bool, first: str | None = None) -> Iterator[str]:
    """`first`, then the user's non-empty messages until EOF or /exit."""
    if first:
        yield first
    while (text := read_turn(interactive)) is not None:
        if text:
            yield text


def chat_loop(backend: ChatBackend, system: str | None, first: str | None = None) -> None:
    """Multi-turn: the whole history goes with every turn (the radix cache reuses it)."""
    interactive = sys.stdin.isatty()
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for text in user_turns(interactive, first):
        messages.append({"role": "user", "content": text})
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            reply = answer(backend, messages)
        except TurnError as exc:  # that turn is dropped; the chat goes on
            sys.stdout.write("\n")
            logger.error("%s", exc)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def single_prompt(args: argparse.Namespace) -> str:
    if args.prompt:
        return " ".join(args.prompt)
    if sys.stdin.isatty():
        try:
            return input("you> ")
        except EOFError:  # Ctrl-D: no prompt
            return ""
    return sys.stdin.read().strip()


def build_backend(args: argparse.Namespace) -> ChatBackend:
    if args.url:
        return RemoteChat(
            args.url, args.api_key, args.model, args.max_new_tokens, args.temperature, args.seed
        )
    return LocalChat(args.max_new_tokens, args.temperature, args.seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="*", help="the prompt (default: read from stdin)")
    parser.add_argument("--multi-turn", action="store_true", help="keep a chat going")
    parser.add_argument("--system", default=None, help="system message of the conversation")
    parser.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None, help="bearer token for --url")
    parser.add_argument("--model", default=None, help="model name for --url (default: first)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="log token counts per turn")
    return parser.parse_args(argv)


def server_root(url: str) -> str:
    """The server's root from --url: an OpenAI client's base URL (ending in /v1) works too."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    prompt = None if args.multi_turn else single_prompt(args)
    if prompt is not None and not prompt:
        logger.error("empty prompt")
        return 2
    backend: ChatBackend | None = None
    try:
        backend = build_backend(args)
        if prompt is None:
            chat_loop(backend, args.system, " ".join(args.prompt) or None)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            answer(backend, [*system, {"role": "user", "content": prompt}])
    except (RuntimeError, ValueError, httpx.HTTPError) as exc:  # (ValueError: a bad option)
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if backend is not None:
            backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
