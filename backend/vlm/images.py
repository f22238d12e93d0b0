"""Safe image loading for vision-language requests: data: URLs, http(s) URLs and (opt-in) files.

`load_image(url, policy)` returns an RGB `PIL.Image` or raises `ImageInputError` with a
message naming the reason (the server's 400). The rules, all from `ImagePolicy`:

- `data:image/...;base64,` URLs: base64 only, an image/* media type, the byte cap applies to
  the decoded bytes.
- http(s): the host is resolved once and every address it resolves to must be public
  (no loopback, private, link-local, shared, reserved, multicast or unspecified address)
  unless `allow_private`; the connection then goes to that checked address (the host name
  stays in the Host header and TLS SNI), so a second DNS answer cannot point elsewhere.
  Hosts in `private_hosts` are exempt from the address check (an operator's internal image
  server), by the name written in the URL.
  Redirects are followed by hand, each hop checked the same way, at most `max_redirects`.
  The byte cap is checked against Content-Length up front and again as bytes arrive; the
  whole download, redirects included, has `timeout_s`. No proxy from the environment is used.
- `file://` URLs and bare paths only with `allow_files`, size-capped as well.
  Bodies are asked for and read uncompressed only (a compressed one is refused).
- Decoding: the pixel count (width x height, read from the header) must not exceed
  `max_pixels` before any pixel is decoded, sides more than MAX_ASPECT_RATIO times apart are
  refused, and truncated or non-image data is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from config import Config

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what a request may send
_USER_AGENT = "mini-sglang-image-fetch/1"


class ImageInputError(ValueError):
    """An image input that is refused; the message says why (answered as a 400)."""


@dataclass(frozen=True)
class ImagePolicy:
    """What an image input may be and where it may come from."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    timeout_s: float = 10.0
    max_redirects: int = 3
    allow_private: bool = False
    private_hosts: frozenset[str] = frozenset()
    allow_files: bool = False

    def may_be_private(self, host: str) -> bool:
        """Whether `host` may resolve to a non-public address."""
        return self.allow_private or host.lower() in self.private_hosts

    @classmethod
    def from_config(cls, config: Config) -> ImagePolicy:
        return cls(
            max_bytes=config.vlm_max_image_bytes,
            max_pixels=config.vlm_max_image_pixels,
            timeout_s=config.vlm_image_http_timeout_s,
            max_redirects=config.vlm_image_max_redirects,
            allow_private=config.vlm_allow_private_image_urls,
            private_hosts=frozenset(
                h.strip().lower().strip("[]")
                for h in config.vlm_private_image_hosts.split(",") if h.strip()
            ),
            allow_files=config.allow_file_image_url,
        )


async def load_image(url: str, policy: ImagePolicy) -> Image.Image:
    """The RGB picture `url` names, fetched and decoded under `policy`."""
    data = await image_bytes(url, policy)
    return await asyncio.to_thread(decode_image, data, policy)


async def image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """The raw bytes `url` names (data:, http(s), or with `allow_files` a file)."""
    url = url.strip()
    if not url:
        raise ImageInputError("the image URL is empty")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ImageInputError(f"the image URL is not valid: {exc}") from None
    if scheme == "data":
        return data_url_bytes(url, policy.max_bytes)
    if scheme in ("http", "https"):
        return await fetch_http(url, policy)
    if scheme == "file" or _is_bare_path(url, scheme):
        if not policy.allow_files:
            raise ImageInputError(
                "file paths are not accepted as image URLs (the operator can allow them "
                "with ALLOW_FILE_IMAGE_URL=1); send a data: or http(s) URL"
            )
        return await asyncio.to_thread(read_file, url, policy.max_bytes)
    raise ImageInputError(
        f"image URLs with the scheme '{scheme}:' are not supported; send a data: or http(s) URL"
    )


def _is_bare_path(url: str, scheme: str) -> bool:
    """No scheme, or a Windows drive letter parsed as one (`C:\\...`)."""
    return not scheme or (len(scheme) == 1 and url[1:3] in (":\\", ":/"))


# ------------------------------------------------------------------ data: URLs
def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The decoded payload of a `data:image/...;base64,` URL, at most `max_bytes`."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageInputError("the data: URL has no ',' before its payload")
    media_type, *params = header[len("data:"):].split(";")
    if not media_type.strip().lower().startswith("image/"):
        raise ImageInputError(
            f"the data: URL's media type must be image/*, got '{media_type or 'none'}'"
        )
    if "base64" not in (p.strip().lower() for p in params):
        raise ImageInputError("the data: URL must be base64-encoded (data:image/...;base64,...)")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise _too_large(max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("the data: URL's payload is not valid base64") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


# ------------------------------------------------------------------------ files
def read_file(url: str, max_bytes: int) -> bytes:
    """A local file named by a file:// URL or a bare path, at most `max_bytes`."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise ImageInputError("file:// URLs must name a local file (no host)")
        path = Path(unquote(parts.path))
    else:
        path = Path(url).expanduser()
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ImageInputError(f"cannot read the image file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


# ------------------------------------------------------------------- http(s)
_EMBEDS_IPV4 = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("64:ff9b::/96"),
                ipaddress.IPv6Network("64:ff9b:1::/48"))  # IPv4-compatible and NAT64


def is_public_address(address: IPAddress) -> bool:
    """Whether `address` is a globally routable unicast address. An IPv6 address that
    carries an IPv4 address (mapped, compatible, NAT64, 6to4) is judged by that address too,
    and Teredo is refused."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.teredo is not None:
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in net for net in _EMBEDS_IPV4):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    return address.is_global and not address.is_multicast


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageInputError(f"cannot resolve the image host '{host}': {exc}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return list(dict.fromkeys(addresses))


async def checked_address(host: str, port: int, allow_private: bool) -> IPAddress:
    """The address to connect to for `host`: all of its addresses must be public unless
    `allow_private` (one non-public answer refuses the host)."""
    addresses = await resolve_host(host, port)
    if not addresses:
        raise ImageInputError(f"the image host '{host}' has no address")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise ImageInputError(
                    f"the image URL's host '{host}' resolves to {address}, a loopback, private, "
                    "link-local or otherwise non-public address; such URLs are refused (the "
                    "operator can allow them with VLM_ALLOW_PRIVATE_IMAGE_URLS=1)"
                )
    return addresses[0]


def _pinned_url(url: httpx.URL, address: IPAddress) -> httpx.URL:
    return url.copy_with(host=str(address))


async def fetch_http(url: str, policy: ImagePolicy) -> bytes:
    """Download an http(s) image under `policy` (see the module docstring)."""
    try:
        return await asyncio.wait_for(_fetch_following(url, policy), policy.timeout_s)
    except asyncio.TimeoutError:
        raise ImageInputError(
            f"the image download took longer than {policy.timeout_s:g} s"
        ) from None


async def _fetch_following(url: str, policy: ImagePolicy) -> bytes:
    timeout = httpx.Timeout(policy.timeout_s)
    async with httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=timeout
    ) as client:
        for _ in range(policy.max_redirects + 1):
            result = await _fetch_once(client, url, policy)
            if isinstance(result, bytes):
                return result
            url = result
    raise ImageInputError(f"the image URL redirected more than {policy.max_redirects} times")


async def _fetch_once(client: httpx.AsyncClient, url: str, policy: ImagePolicy) -> bytes | str:
    """One hop: the image bytes, or the URL a redirect points to."""
    try:
        target = httpx.URL(url)
        host = target.host
        port = target.port if target.port is not None else (
            443 if target.scheme == "https" else 80)
    except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError (bad IDNA) included
        raise ImageInputError(f"the image URL is not valid: {exc}") from None
    if target.scheme not in ("http", "https") or not host:
        raise ImageInputError(f"image URLs must be http(s) with a host, got '{url[:100]}'")
    if not 1 <= port <= 65535:
        raise ImageInputError(f"the image URL's port {port} is out of range")
    address = await checked_address(host, port, policy.may_be_private(host))
    request = client.build_request(
        "GET",
        _pinned_url(target, address),
        # no compression: a few hundred gzip bytes can inflate past any cap before it is read
        headers={"Host": target.netloc.decode("ascii"), "User-Agent": _USER_AGENT,
                 "Accept": "image/*", "Accept-Encoding": "identity"},
        extensions={"sni_hostname": host},
    )
    try:
        response = await client.send(request, stream=True)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        raise ImageInputError(f"cannot fetch the image URL: {type(exc).__name__}: {exc}") from None
    try:
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise ImageInputError("the image URL redirected without a Location")
            try:
                return urljoin(url, location)
            except ValueError as exc:
                raise ImageInputError(f"the image URL redirected to an invalid URL: {exc}") \
                    from None
        if response.status_code != 200:
            raise ImageInputError(f"the image URL answered HTTP {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ImageInputError(
                f"the image URL answered with Content-Encoding '{encoding}' (only identity "
                "is read: compressed bodies could inflate past the size cap)")
        return await _read_capped(response, policy.max_bytes)
    finally:
        await response.aclose()


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks = bytearray()
    try:
        async for chunk in response.aiter_raw():  # identity only: raw bytes are the body
            chunks += chunk
            if len(chunks) > max_bytes:
                raise _too_large(max_bytes)
    except httpx.HTTPError as exc:
        raise ImageInputError(f"the image download failed: {type(exc).__name__}: {exc}") from None
    return bytes(chunks)


def _too_large(max_bytes: int) -> ImageInputError:
    return ImageInputError(f"the image is larger than the server's limit of {max_bytes} bytes")


# ---------------------------------------------------------------------- decode
# longest side over shortest side beyond which an image is refused (Qwen2-VL's own limit)
MAX_ASPECT_RATIO = 200


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode `data` into an RGB image after checking its declared size."""
    if not data:
        raise ImageInputError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # raster formats only: Pillow would hand EPS/PS to Ghostscript, a program
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > policy.max_pixels:
                raise _bomb(width, height, policy.max_pixels)
            if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
                raise ImageInputError(
                    f"the image is {width}x{height}: sides more than {MAX_ASPECT_RATIO} times "
                    "apart are refused (a processor would scale its short side up to its "
                    "input size, the long one with it)")
            image.load()
            return image.convert("RGB")
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb(0, 0, policy.max_pixels) from None
    except UnidentifiedImageError:
        raise ImageInputError("the image data is not an image format the server reads") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageInputError(f"the image data is broken or truncated: {exc}") from None


def _bomb(width: int, height: int, max_pixels: int) -> ImageInputError:
    size = f" ({width}x{height})" if width else ""
    return ImageInputError(
        f"the image has too many pixels{size}; the server's limit is {max_pixels} "
        "(decompression-bomb guard)"
    )
