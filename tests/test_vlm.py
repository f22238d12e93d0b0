"""Vision-language chat end to end: a tiny random LLaVA (CLIP vision tower + Llama, the SmolLM2
tokenizer with an `<image>` token) served beside a tiny Qwen3 LLM by a real uvicorn on
127.0.0.1, driven with the official `openai` client; images from data: URLs and from a local
HTTP server. Also the URL, address and decoding checks of backend/vlm/images.py on their own.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import base64
import contextlib
import copy
import gzip
import io
import ipaddress
import json
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import torch
from PIL import Image

from api.server import create_app
from backend.vlm.images import (
    ImageInputError,
    ImagePolicy,
    checked_address,
    data_url_bytes,
    decode_image,
    fetch_http,
    image_bytes,
    is_public_address,
)
from config import ConfigError, load_config, mlx_vlm_available
from tests.test_server import LiveServer, engine_factory

MAX_IMAGE_BYTES = 64 * 1024
OVERSIZE = 3 * MAX_IMAGE_BYTES

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------- fixtures
def png_bytes(width: int = 40, height: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> str:
    """A tiny random LLaVA: 1-layer CLIP vision tower on 32x32 images (16 patches), a 2-layer
    Llama, the SmolLM2 tokenizer plus `<image>`, and a chat template rendering image parts."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(str(folder))
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(str(folder))
    return str(folder)


SLOW_DOWNLOAD_STARTED = threading.Event()  # ImageHandler's /slow.png was asked for


class ImageHandler(BaseHTTPRequestHandler):
    """Test images over HTTP: a PNG, oversize bodies with and without Content-Length, a
    redirect to another loopback host name, a redirect loop and a non-image."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        port = cast(ThreadingHTTPServer, self.server).server_port
        routes: dict[str, Callable[[], None]] = {
            "/red.png": lambda: self._send(png_bytes()),
            "/big": lambda: self._send(b"\x00" * OVERSIZE),
            "/endless": self._endless,
            "/to-localhost": lambda: self._redirect(f"http://localhost:{port}/red.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/text": lambda: self._send(b"<html>not an image</html>", "text/html"),
            "/gzip": self._gzip_bomb,
            "/slow.png": self._slow,
            "/to-bad-port": lambda: self._redirect("http://127.0.0.1:70000/red.png"),
        }
        routes.get(self.path, lambda: self.send_error(404))()

    def _send(self, body: bytes, content_type: str = "image/png") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self) -> None:
        """No Content-Length: bytes until the client hangs up (or 64 MiB)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(4096):
                self.wfile.write(b"\x00" * 16384)
        except OSError:
            pass

    def _slow(self) -> None:
        SLOW_DOWNLOAD_STARTED.set()
        time.sleep(3)
        with contextlib.suppress(OSError):  # the client may have given up
            self._send(png_bytes())

    def _gzip_bomb(self) -> None:
        """A few KiB that inflate to 64 MiB, whatever the client asked for."""
        body = gzip.compress(b"\x00" * 2**26)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """http://127.0.0.1:PORT serving ImageHandler."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def llm_dir(tiny_model_factory: Callable[[str], str]) -> str:
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def server(llm_dir: str, vlm_dir: str) -> Iterator[LiveServer]:
    """The LLM and the VLM in one server; 127.0.0.1 (only by that name) may serve images."""
    config = load_config({
        "MODEL_LOCAL_DIR": llm_dir, "DTYPE": "float32", "VLM_MODEL_LOCAL_DIR": vlm_dir,
        "VLM_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "VLM_IMAGE_HTTP_TIMEOUT_S": "5",
        "VLM_PRIVATE_IMAGE_HOSTS": "127.0.0.1",
    })
    live = LiveServer(create_app(engine_factory(llm_dir), config=config)).start()
    live.wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def names(client: openai.OpenAI) -> tuple[str, str]:
    """(LLM name, VLM name) as /v1/models lists them."""
    llm, vlm = (card.id for card in client.models.list().data)
    return llm, vlm


def image_message(url: str, text: str = "What is in the picture?") -> Any:
    """One user message: text, then the image (the openai client's message type)."""
    return [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]


def post_chat(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def assert_openai_400(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


# ------------------------------------------------------------- through the server
def test_models_lists_llm_and_vlm(client: openai.OpenAI, names: tuple[str, str]) -> None:
    llm, vlm = names
    assert vlm.startswith("tiny-llava")
    assert client.models.retrieve(vlm).id == vlm


def test_image_request_streams_an_answer(client: openai.OpenAI, names: tuple[str, str]) -> None:
    chunks = list(client.chat.completions.create(
        model=names[1], messages=image_message(data_url(png_bytes())),
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and finishes[-1] == "length" and finishes.count("length") == 1
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens > 16  # the image's 16 tokens are part of the prompt


def test_non_streaming_answer_matches_transformers_greedy(
    client: openai.OpenAI, names: tuple[str, str], vlm_dir: str
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    messages = image_message(data_url(png_bytes()))
    answer = client.chat.completions.create(
        model=names[1], messages=messages, max_tokens=8, temperature=0,
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    processor = AutoProcessor.from_pretrained(vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32)
    hf_messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=[prompt], images=[Image.open(io.BytesIO(png_bytes()))],
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.choices[0].message.content == expected


def test_seed_and_stop(client: openai.OpenAI, names: tuple[str, str]) -> None:
    def ask(**kwargs: Any) -> str:
        answer = client.chat.completions.create(
            model=names[1], messages=image_message(data_url(png_bytes())),
            max_tokens=8, **kwargs)
        return answer.choices[0].message.content or ""

    first = ask(temperature=1.0, seed=7)
    assert first == ask(temperature=1.0, seed=7, top_p=1.0)
    greedy = ask(temperature=0)
    stop = greedy[len(greedy) // 2:][:3]
    stopped = ask(temperature=0, stop=[stop])
    assert stop not in stopped and greedy.startswith(stopped)


def test_image_without_model_goes_to_the_vlm(server: LiveServer, names: tuple[str, str]) -> None:
    response = post_chat(server, {"messages": image_message(data_url(png_bytes())),
                                  "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == names[1]


def test_http_image_from_an_allowed_private_host(
    client: openai.OpenAI, names: tuple[str, str], image_host: str
) -> None:
    answer = client.chat.completions.create(
        model=names[1], messages=image_message(f"{image_host}/red.png"),
        max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def _bad_inputs(image_host: str) -> dict[str, tuple[str, str]]:
    """name → (image URL, a word the 400's message must contain)."""
    localhost = image_host.replace("127.0.0.1", "localhost")
    return {
        "loopback http": (f"{localhost}/red.png", "non-public"),
        "redirect to loopback": (f"{image_host}/to-localhost", "non-public"),
        "redirect loop": (f"{image_host}/loop", "redirected more than"),
        "oversize http with length": (f"{image_host}/big", "larger than"),
        "oversize http without length": (f"{image_host}/endless", "larger than"),
        "http non-image": (f"{image_host}/text", "not an image"),
        "compressed body": (f"{image_host}/gzip", "Content-Encoding"),
        "redirect to a bad port": (f"{image_host}/to-bad-port", "out of range"),
        "unclosed IPv6 bracket": ("http://[::1/a.png", "not valid"),
        "bad IDNA host": ("http://xn--/x.png", "not valid"),
        "port out of range": ("http://1.2.3.4:70000/x.png", "out of range"),
        "thin image": (data_url(png_bytes(1, 201)), "201"),
        "oversize data": (data_url(os.urandom(OVERSIZE)), "larger than"),
        "non-image data": (data_url(b"hello, not an image at all"), "not an image"),
        "truncated png": (data_url(png_bytes()[:60]), "truncated"),
        "bomb": (data_url(png_declaring(5000, 5000)), "too many pixels"),
        "huge bomb": (data_url(png_declaring(100_000, 100_000)), "too many pixels"),
        "text data url": ("data:text/plain;base64,aGVsbG8=", "image/*"),
        "bad base64": ("data:image/png;base64,@@@@", "base64"),
        "file url": ("file:///etc/hostname", "ALLOW_FILE_IMAGE_URL"),
        "bare path": ("/etc/hostname", "ALLOW_FILE_IMAGE_URL"),
        "ftp": ("ftp://example.com/a.png", "scheme"),
    }


def test_every_unsafe_or_broken_image_is_a_400(
    server: LiveServer, names: tuple[str, str], image_host: str
) -> None:
    for name, (url, word) in _bad_inputs(image_host).items():
        response = post_chat(server, {"model": names[1], "messages": image_message(url),
                                      "max_tokens": 2})
        assert response.status_code == 400, f"{name}: {response.text}"
        assert_openai_400(response, word)
        assert response.json()["error"]["param"] == "messages[0].content[1].image_url", name


def test_routing_errors(server: LiveServer, names: tuple[str, str]) -> None:
    llm, vlm = names
    to_llm = post_chat(server, {"model": llm, "messages": image_message(data_url(png_bytes()))})
    assert_openai_400(to_llm, "does not take image inputs", vlm)
    unknown = post_chat(server, {"model": "nope", "messages": image_message(data_url(png_bytes()))})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    several = post_chat(server, {"model": vlm, "n": 2, "messages": image_message(
        data_url(png_bytes()))})
    assert_openai_400(several, "n = 1")
    too_long = post_chat(server, {"model": vlm, "max_tokens": 5000,
                                  "messages": image_message(data_url(png_bytes()))})
    assert_openai_400(too_long, "context")
    completion = httpx.post(server.url + "/v1/completions", json={"model": vlm, "prompt": "hi"})
    assert_openai_400(completion, "chat/completions only")


def test_server_keeps_serving_after_refusals(
    client: openai.OpenAI, names: tuple[str, str], image_host: str
) -> None:
    llm, vlm = names
    text = client.chat.completions.create(
        model=llm, messages=[{"role": "user", "content": "Hello"}], max_tokens=3)
    assert text.model == llm and text.choices[0].finish_reason == "length"
    text_on_vlm = client.chat.completions.create(
        model=vlm, messages=[{"role": "user", "content": "Hello"}], max_tokens=3)
    assert text_on_vlm.model == vlm
    image = client.chat.completions.create(
        model=vlm, messages=image_message(f"{image_host}/red.png"),
        max_tokens=3)
    assert image.choices[0].finish_reason == "length"


def test_image_part_without_a_vlm_is_a_400(llm_dir: str) -> None:
    config = load_config({"MODEL_LOCAL_DIR": llm_dir, "DTYPE": "float32"})
    live = LiveServer(create_app(engine_factory(llm_dir), config=config)).start()
    try:
        live.wait_ready()
        response = post_chat(live, {"messages": image_message(data_url(png_bytes()))})
        assert_openai_400(response, "vision-language model", "VLM_MODEL_NAME")
        models = httpx.get(live.url + "/v1/models").json()["data"]
        assert len(models) == 1
    finally:
        live.stop()


def test_images_to_the_llm_are_a_400_while_the_vlm_is_down(llm_dir: str, tmp_path: Path) -> None:
    """With the configured VLM failed to load, an image request naming the LLM is still the
    client's error (400), not the VLM's 503."""
    config = load_config({"MODEL_LOCAL_DIR": llm_dir, "DTYPE": "float32",
                          "VLM_MODEL_LOCAL_DIR": str(tmp_path)})  # no model there
    live = LiveServer(create_app(engine_factory(llm_dir), config=config)).start()
    try:
        live.wait_ready()
        llm = live.engine.model_name
        response = post_chat(live, {"model": llm, "messages": image_message(
            data_url(png_bytes()))})
        assert_openai_400(response, "does not take image inputs")
        unnamed = post_chat(live, {"messages": image_message(data_url(png_bytes()))})
        assert unnamed.status_code == 503  # the one model that could answer is down
    finally:
        live.stop()


# -------------------------------------------------------------- images on their own
@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_only_raster_formats_are_decoded() -> None:
    """PostScript is never handed to Pillow's EPS plugin (which runs Ghostscript)."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(ImageInputError, match="not an image format the server reads"):
        decode_image(eps, ImagePolicy())


def test_hosts_resolving_to_private_addresses_are_refused() -> None:
    with pytest.raises(ImageInputError, match="non-public"):
        asyncio.run(checked_address("localhost", 80, allow_private=False))
    with pytest.raises(ImageInputError, match="non-public"):
        asyncio.run(checked_address("169.254.169.254", 80, allow_private=False))
    assert asyncio.run(checked_address("localhost", 80, allow_private=True)).is_loopback


def test_allow_private_fetches_loopback(image_host: str) -> None:
    url = f"{image_host}/red.png"
    with pytest.raises(ImageInputError, match="non-public"):
        asyncio.run(fetch_http(url, ImagePolicy()))
    policy = ImagePolicy.from_config(load_config({"VLM_ALLOW_PRIVATE_IMAGE_URLS": "1"}))
    assert asyncio.run(fetch_http(url, policy)) == png_bytes()


def test_data_urls() -> None:
    assert data_url_bytes(data_url(b"abc"), 3) == b"abc"
    with pytest.raises(ImageInputError, match="larger than"):
        data_url_bytes(data_url(b"abcd"), 3)
    with pytest.raises(ImageInputError, match="base64-encoded"):
        data_url_bytes("data:image/png,abc", 100)
    with pytest.raises(ImageInputError, match="no ','"):
        data_url_bytes("data:image/png;base64", 100)


def test_files_only_with_the_flag_and_still_capped(tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes())
    for url in (str(picture), picture.as_uri()):
        with pytest.raises(ImageInputError, match="ALLOW_FILE_IMAGE_URL"):
            asyncio.run(image_bytes(url, ImagePolicy()))
        assert asyncio.run(image_bytes(url, ImagePolicy(allow_files=True))) == png_bytes()
        with pytest.raises(ImageInputError, match="larger than"):
            asyncio.run(image_bytes(url, ImagePolicy(allow_files=True, max_bytes=10)))


def test_decode_checks_pixels_before_decoding() -> None:
    policy = ImagePolicy(max_pixels=100 * 100)
    assert decode_image(png_bytes(100, 100), policy).size == (100, 100)
    with pytest.raises(ImageInputError, match=r"too many pixels \(101x100\)"):
        decode_image(png_bytes(101, 100), policy)


def test_decode_refuses_extreme_aspect_ratios() -> None:
    """A processor scales an image's short side up to its input size: a 1x200,000 PNG of a
    few hundred bytes would become gigabytes."""
    assert decode_image(png_bytes(1, 200), ImagePolicy()).size == (1, 200)
    with pytest.raises(ImageInputError, match="200 times"):
        decode_image(png_bytes(201, 1), ImagePolicy())


def test_vlm_backend_mlx_without_mlx_vlm_stops_start_up(tmp_path: Path) -> None:
    if mlx_vlm_available():
        pytest.skip("mlx-vlm is installed here")
    with pytest.raises(ConfigError, match="mlx-vlm"):
        load_config({"VLM_BACKEND": "mlx", "VLM_MODEL_LOCAL_DIR": str(tmp_path)})


def test_runners_prepare_with_the_folders_transformers_processor(vlm_dir: str) -> None:
    """The mlx-vlm runner prepares inputs with the transformers class the folder names (not
    what AutoProcessor maps to once mlx-vlm has registered its own classes)."""
    from transformers import LlavaProcessor

    from backend.vlm.runner import transformers_processor

    processor = transformers_processor(vlm_dir)
    assert type(processor) is LlavaProcessor and processor.chat_template


def _greedy_tokens(runner: Any, count: int) -> list[int]:
    from engine.sampling_params import SamplingParams

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is this?"}]}]
    prompt = runner.prepare(messages, [Image.open(io.BytesIO(png_bytes()))])
    tokens: list[int] = []

    def on_token(token: int) -> bool:
        tokens.append(token)
        return len(tokens) >= count

    runner.generate(prompt, SamplingParams(max_new_tokens=count, temperature=0.0), on_token)
    return tokens


def test_mlx_vlm_runner_matches_transformers_greedy(vlm_dir: str, tmp_path: Path) -> None:
    """Where mlx-vlm is installed: the same greedy tokens as the transformers runner."""
    pytest.importorskip("mlx_vlm")
    import shutil

    from safetensors.torch import load_file, save_file

    from backend.vlm.hf_runner import HFVLMRunner
    from backend.vlm.mlx_runner import MLXVLMRunner

    folder = tmp_path / "llava"
    shutil.copytree(vlm_dir, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))  # the hub layout (vision_tower.vision_model.*) mlx-vlm reads
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") else k): v for k, v in tensors.items()},
              str(weights), metadata={"format": "pt"})
    config = load_config({"VLM_DTYPE": "float32"})
    expected = _greedy_tokens(HFVLMRunner(vlm_dir, "hf", config), 8)
    assert _greedy_tokens(MLXVLMRunner(str(folder), "mlx", config), 8) == expected


def test_cancelled_job_ends_with_abort(vlm_dir: str) -> None:
    from backend.vlm.service import VLMJob, VLMService
    from engine.request import StreamDelta
    from engine.sampling_params import SamplingParams

    service = VLMService(load_config({"VLM_MODEL_LOCAL_DIR": vlm_dir, "VLM_DTYPE": "float32"}))
    try:
        image = Image.open(io.BytesIO(png_bytes()))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        prompt, params = service.prepare(messages, [image], SamplingParams(temperature=0), 50)
        deltas: list[StreamDelta] = []
        finished = threading.Event()

        def sink(delta: StreamDelta) -> None:
            deltas.append(delta)
            if len(deltas) == 2:
                job.cancel()
            if delta.finished or delta.error:
                finished.set()

        job = VLMJob("abort-me", prompt, params, sink)
        service.submit(job)
        assert finished.wait(timeout=30)
        assert deltas[-1].finish_reason == "abort"
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 2
    finally:
        service.shutdown()


def test_jobs_cancelled_while_waiting_give_their_place_up(vlm_dir: str) -> None:
    """VLM_QUEUE counts jobs that still wait: one whose client left no longer holds a place."""
    from backend.vlm.service import VLMBusy, VLMJob, VLMService
    from engine.request import StreamDelta
    from engine.sampling_params import SamplingParams

    config = load_config({"VLM_MODEL_LOCAL_DIR": vlm_dir, "VLM_DTYPE": "float32",
                          "VLM_QUEUE": "1"})
    service = VLMService(config)
    release, started = threading.Event(), threading.Event()
    try:
        image = Image.open(io.BytesIO(png_bytes()))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        prompt, params = service.prepare(messages, [image], SamplingParams(temperature=0), 4)

        def blocking_sink(delta: StreamDelta) -> None:  # holds the worker on its first token
            started.set()
            release.wait(timeout=30)

        def job(name: str) -> VLMJob:
            return VLMJob(name, prompt, params, blocking_sink if name == "running" else
                          (lambda delta: None))

        service.submit(job("running"))
        assert started.wait(timeout=30)
        waiting = job("waiting")
        service.submit(waiting)
        with pytest.raises(VLMBusy):
            service.submit(job("one too many"))
        waiting.cancel()
        last = job("takes its place")
        service.submit(last)
        last.cancel()
    finally:
        release.set()
        service.shutdown()


def test_a_checkpoints_own_logit_filters_do_not_change_greedy(
    vlm_dir: str, tmp_path: Path
) -> None:
    """transformers fills a call's unset generation fields from the checkpoint's
    generation_config.json: n-gram bans and suppressed tokens shipped there must not reach
    the engine's sampler, which decides over the model's own logits."""
    from backend.vlm.hf_runner import HFVLMRunner

    config = load_config({"VLM_DTYPE": "float32"})
    plain = _greedy_tokens(HFVLMRunner(vlm_dir, "plain", config), 12)
    folder = tmp_path / "filtered"
    shutil.copytree(vlm_dir, folder)
    own = json.loads((folder / "generation_config.json").read_text()) if (
        folder / "generation_config.json").exists() else {}
    own.update({"no_repeat_ngram_size": 1, "suppress_tokens": [plain[0]],
                "repetition_penalty": 5.0, "guidance_scale": 3.0})
    (folder / "generation_config.json").write_text(json.dumps(own))
    assert _greedy_tokens(HFVLMRunner(str(folder), "filtered", config), 12) == plain


def test_downloads_count_against_the_caps_and_the_time_limit(
    llm_dir: str, vlm_dir: str, image_host: str
) -> None:
    """A request holds its in-flight place and runs on the time limit from arrival, image
    downloads included: a second request gets its 429 at once, and a download past
    REQUEST_TIMEOUT_S ends in a 504, not a late 200."""
    config = load_config({
        "MODEL_LOCAL_DIR": llm_dir, "DTYPE": "float32", "VLM_MODEL_LOCAL_DIR": vlm_dir,
        "VLM_PRIVATE_IMAGE_HOSTS": "127.0.0.1", "REQUEST_TIMEOUT_S": "1",
        "MAX_PENDING_REQUESTS": "1",
    })
    live = LiveServer(create_app(engine_factory(llm_dir), config=config)).start()
    try:
        live.wait_ready()
        vlm_name = httpx.get(live.url + "/v1/models").json()["data"][1]["id"]
        body = {"model": vlm_name, "messages": image_message(f"{image_host}/slow.png"),
                "max_tokens": 2}
        SLOW_DOWNLOAD_STARTED.clear()
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post_chat, live, body)
            assert SLOW_DOWNLOAD_STARTED.wait(timeout=30)  # it holds its place from here
            second = post_chat(live, {**body, "messages": image_message(data_url(png_bytes()))})
            assert second.status_code == 429, second.text
            answer = slow.result(timeout=30)
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "request_timeout"
    finally:
        live.stop()


def test_shutdown_ends_the_waiting_jobs_with_a_503(vlm_dir: str) -> None:
    from backend.vlm.service import VLMJob, VLMService
    from engine.request import StreamDelta
    from engine.sampling_params import SamplingParams

    service = VLMService(load_config({"VLM_MODEL_LOCAL_DIR": vlm_dir, "VLM_DTYPE": "float32",
                                      "VLM_QUEUE": "1"}))
    release, started = threading.Event(), threading.Event()
    image = Image.open(io.BytesIO(png_bytes()))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    prompt, params = service.prepare(messages, [image], SamplingParams(temperature=0), 4)

    def blocking_sink(delta: StreamDelta) -> None:
        started.set()
        release.wait(timeout=30)

    heard: list[StreamDelta] = []
    service.submit(VLMJob("running", prompt, params, blocking_sink))
    assert started.wait(timeout=30)
    service.submit(VLMJob("waiting", prompt, params, heard.append))
    stopper = threading.Thread(target=service.shutdown)
    stopper.start()
    try:
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(d.finish_reason, d.error_status) for d in heard] == [("abort", 503)]
    finally:
        release.set()
        stopper.join(timeout=10)
    assert not service._thread.is_alive()
