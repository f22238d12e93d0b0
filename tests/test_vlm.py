"""The URL, address and decoding checks of backend/vlm/images.py, with images from data:
URLs, files and a local HTTP server."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import base64
import io
import ipaddress
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

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

MAX_IMAGE_BYTES = 64 * 1024
OVERSIZE = 3 * MAX_IMAGE_BYTES

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
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


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


def test_vlm_backend_mlx_without_mlx_vlm_stops_start_up(tmp_path: Path) -> None:
    if mlx_vlm_available():
        pytest.skip("mlx-vlm is installed here")
    with pytest.raises(ConfigError, match="mlx-vlm"):
        load_config({"VLM_BACKEND": "mlx", "VLM_MODEL_LOCAL_DIR": str(tmp_path)})

