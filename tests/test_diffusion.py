"""Image generation: a tiny random Z-Image pipeline built offline, served through
/v1/images/generations and the z_image_mps.py command line."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai
import pytest
import torch
from PIL import Image

from api.images_api import ImageGenerationRequest, image_request
from api.server import create_app
from backend.diffusion.images import (
    ASPECT_PRESETS,
    SIZE_MULTIPLE,
    ImageRequest,
    ImageRequestError,
    parse_size,
)
from backend.diffusion.service import DiffusionBusy
from config import load_config
from tests.test_server import LiveServer
from tests.test_vlm import png_declaring

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def z_image_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> str:
    """A 2-layer random Z-Image pipeline (transformer, VAE, Qwen3 text encoder) on disk."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32])
    with torch.no_grad():  # allocated with torch.empty: give them values
        for name in ("x_pad_token", "cap_pad_token"):
            token = getattr(transformer, name)
            token.copy_(torch.ones_like(token))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=512))
    pipeline: Any = ZImagePipeline(transformer=transformer, vae=vae,
                              scheduler=FlowMatchEulerDiscreteScheduler(),
                              text_encoder=text_encoder, tokenizer=smollm2_tokenizer)
    folder = tmp_path_factory.mktemp("tiny-z-image") / "tiny-z-image"
    pipeline.save_pretrained(str(folder))
    return str(folder)


def _tiny_wan(folder: Path, tokenizer: Any, image_to_video: bool) -> str:
    """A 2-layer random Wan pipeline (Wan 2.2 layout: no image encoder for image-to-video)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    parts: dict[str, Any] = {
        "vae": AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True]),
        "text_encoder": T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8,
                                                d_ff=32, num_layers=2, num_heads=4)),
        "transformer": WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=36 if image_to_video else 16, out_channels=16, text_dim=32,
            freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction",
                                             use_flow_sigmas=True, flow_shift=3.0),
        "tokenizer": tokenizer,
    }
    pipeline: Any = (WanImageToVideoPipeline(**parts, image_encoder=None, image_processor=None)
                     if image_to_video else WanPipeline(**parts))
    pipeline.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def live(z_image_dir: str, tiny_model_factory: Callable[[str], str], smollm2_tokenizer: Any,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("tiny-wan")
    config = load_config({
        "MODEL_LOCAL_DIR": tiny_model_factory("qwen3"), "DTYPE": "float32",
        "Z_IMAGE_MODEL_DIR": z_image_dir, "DIFFUSION_QUEUE": "1", "MAX_IMAGES": "3",
        "VLM_MAX_IMAGE_PIXELS": "10000",  # first frames of image-to-video are capped by it
        "VIDEO_MODEL_ID": _tiny_wan(root / "tiny-wan-t2v", smollm2_tokenizer, False),
        "VIDEO_I2V_MODEL_ID": _tiny_wan(root / "tiny-wan-i2v", smollm2_tokenizer, True)})
    server = LiveServer(create_app(config=config)).start()
    server.wait_ready()
    _wait_for_diffusion(server)
    yield server
    server.stop()


def _wait_for_diffusion(server: LiveServer) -> None:
    deadline = time.monotonic() + 60
    while server.app.state.server.diffusion is None:
        assert time.monotonic() < deadline, "the image model did not load"
        time.sleep(0.05)


def _images(response: httpx.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            for item in response.json()["data"]]


def _post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"prompt": "a red fox", **body},
                      timeout=120)


def test_sizes_and_presets() -> None:
    assert parse_size(None, None) == (1024, 1024)
    assert parse_size("640x384", None) == (640, 384)
    assert all(w % SIZE_MULTIPLE == 0 and h % SIZE_MULTIPLE == 0
               for w, h in ASPECT_PRESETS.values())
    assert parse_size(None, "16:9") == ASPECT_PRESETS["16:9"]
    for size in ("100x100", "64", "x64", "4096x64", "64x0", "16x64"):
        with pytest.raises(ImageRequestError):
            parse_size(size, None)


def test_images_have_the_size_and_count_asked_for(live: LiveServer) -> None:
    response = _post(live.url, size="64x48", n=2, seed=5, steps=3)
    images = _images(response)
    assert [(im.format, im.size) for im in images] == [("PNG", (64, 48))] * 2
    assert response.json()["model"] == "tiny-z-image"
    assert images[0].tobytes() != images[1].tobytes()  # two samples, not one copied


def test_a_seed_gives_the_same_pixels(live: LiveServer) -> None:
    first = _images(_post(live.url, size="48x48", seed=11, steps=2))[0]
    again = _images(_post(live.url, size="48x48", seed=11, steps=2))[0]
    other = _images(_post(live.url, size="48x48", seed=12, steps=2))[0]
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"size": "100x100"}, 400, "size"),
    ({"size": "\u00b2x64"}, 400, "size"),  # a superscript digit
    ({"size": "1" * 5000 + "x64"}, 400, "size"),
    ({"aspect": "2:1"}, 400, "aspect"),
    ({"size": "64x64", "aspect": "1:1"}, 400, "size"),
    ({"n": 0}, 400, "n"),
    ({"n": 4}, 400, "n"),
    ({"steps": 0}, 400, "steps"),
    ({"guidance_scale": -1}, 400, "guidance_scale"),
    ({"response_format": "url"}, 400, "response_format"),
    ({"n": True}, 400, "n"),
    ({"n": "2"}, 400, "n"),
    ({"quality": "bogus"}, 400, "quality"),
    ({"style": "bogus"}, 400, "style"),
    ({"moderation": "bogus"}, 400, "moderation"),
    ({"output_compression": 500}, 400, "output_compression"),
    ({"prompt": "  "}, 400, "prompt"),
    ({"model": "other-model"}, 404, "model"),
    ({"image_path": "/etc/passwd"}, 400, None),
])
def test_bad_image_requests(live: LiveServer, body: dict[str, Any], status: int,
                            param: str | None) -> None:
    response = _post(live.url, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_openai_nulls_mean_the_defaults(live: LiveServer) -> None:
    """OpenAI's optional fields are nullable: a client may send null for what it leaves unset."""
    response = _post(live.url, size="32x32", steps=1, n=None, response_format=None,
                     quality="auto", style="natural", output_compression=80)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def test_the_queue_answers_429_and_llm_streams_go_on(live: LiveServer) -> None:
    async def scenario() -> tuple[list[httpx.Response], float, float]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            slow = {"prompt": "slow", "size": "64x64", "steps": 100, "seed": 1}
            jobs = [asyncio.create_task(client.post("/v1/images/generations", json=slow))
                    for _ in range(4)]
            await asyncio.sleep(0.1)
            start = time.monotonic()
            chat = await client.post("/v1/completions", json={
                "model": "qwen3", "prompt": "Hello", "max_tokens": 8})
            assert chat.status_code == 200
            chat_done = time.monotonic() - start
            responses = list(await asyncio.gather(*jobs))
            return responses, chat_done, time.monotonic() - start

    responses, chat_s, images_s = asyncio.run(scenario())
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["Retry-After"] and busy.json()["error"]["code"] == "server_busy"
    assert chat_s < images_s  # the LLM answered while images were still being made


def test_a_client_that_leaves_cancels_its_job(live: LiveServer) -> None:
    """A job whose client has gone is stopped between denoising steps (or dropped while it
    waits), so the next request does not wait for a picture nobody will read."""
    service = live.app.state.server.diffusion
    before = service.num_cancelled
    slow = {"prompt": "slow", "size": "64x64", "steps": 100, "seed": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/images/generations", json=slow, timeout=0.3)
    deadline = time.monotonic() + 30
    while service.num_cancelled == before:
        assert time.monotonic() < deadline, "the job of a client that left ran on"
        time.sleep(0.05)
    assert _images(_post(live.url, size="32x32", steps=1, seed=3))  # the worker serves on


def test_a_cancelled_waiting_job_gives_its_place_back(live: LiveServer) -> None:
    """DIFFUSION_QUEUE (1 here) counts waiting jobs that someone still wants: one
    cancelled while it waits frees its place at once, not when the worker reaches it."""
    service = live.app.state.server.diffusion
    model = service.default_model
    slow = ImageRequest(prompt="slow", width=64, height=64, steps=100, seed=6)
    running = service.submit_image(model, slow)
    deadline = time.monotonic() + 30
    while not running.future.running():
        assert time.monotonic() < deadline, "the first job did not start"
        time.sleep(0.01)
    waiting = service.submit_image(model, slow)
    with pytest.raises(DiffusionBusy):
        service.submit_image(model, slow)
    waiting.cancel()
    quick = service.submit_image(model, ImageRequest(prompt="quick", width=32, height=32,
                                                     steps=1, seed=7))
    running.cancel()
    assert quick.future.result(timeout=60)
    assert waiting.future.cancelled()


def test_the_time_limit_cancels_a_job(z_image_dir: str, tiny_model_factory: Callable[[str], str]
                                      ) -> None:
    """Past REQUEST_TIMEOUT_S an image request is a 504 and its job stops."""
    config = load_config({"MODEL_LOCAL_DIR": tiny_model_factory("qwen3"), "DTYPE": "float32",
                          "Z_IMAGE_MODEL_DIR": z_image_dir, "REQUEST_TIMEOUT_S": "0.5"})
    server = LiveServer(create_app(config=config)).start()
    try:
        server.wait_ready()
        _wait_for_diffusion(server)
        started = time.monotonic()
        response = _post(server.url, size="64x64", steps=100, seed=4)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 30
        while server.app.state.server.diffusion.num_cancelled < 1:
            assert time.monotonic() < deadline, "the timed-out job ran on"
            time.sleep(0.05)
    finally:
        server.stop()


def test_openai_image_parameters(live: LiveServer) -> None:
    """The official client's neutral settings are accepted; what cannot be honoured is a 400
    naming the field."""
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(prompt="a red fox", output_format="png",
                                    background="auto", moderation="low",
                                    extra_body={"steps": 1, "seed": 5, "size": "32x32"})
    assert answer.data and answer.data[0].b64_json
    auto = image_request(ImageGenerationRequest(prompt="x", size="auto"), max_images=1)
    assert (auto.width, auto.height) == parse_size(None, None)  # "auto": the default size
    for field, value in (("output_format", "jpeg"), ("background", "transparent")):
        refused = _post(live.url, size="32x32", steps=1, **{field: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field


def test_command_line(z_image_dir: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "z_image_mps.py", "-p", "a boat", "--model-dir", z_image_dir,
         "--width", "64", "--height", "32", "--num-images", "2", "--seed", "4", "-s", "2",
         "--device", "cpu", "-o", str(tmp_path / "boat.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    paths = sorted(tmp_path.glob("boat-*.png"))
    assert [Image.open(p).size for p in paths] == [(64, 32), (64, 32)]
    bad = subprocess.run(
        [sys.executable, "z_image_mps.py", "-p", "x", "--model-dir", z_image_dir, "--width",
         "70", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "multiple of 16" in bad.stderr


# ------------------------------------------------------------------ video
def _video(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/videos/generations", timeout=120,
                      json={"prompt": "waves", "size": "48x32", "steps": 2, **body})


def _decode_mp4(data: str) -> list[Any]:
    import av

    with av.open(io.BytesIO(base64.b64decode(data))) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def test_text_to_video_as_mp4_and_frames(live: LiveServer) -> None:
    response = _video(live.url, num_frames=9, fps=8, seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["num_frames"], body["fps"], body["model"]) == (9, 8, "tiny-wan-t2v")
    frames = _decode_mp4(body["data"][0]["b64_mp4"])
    assert len(frames) == 9 and {f.size for f in frames} == {(48, 32)}
    first = _video(live.url, num_frames=5, seed=3, response_format="frames_b64_png")
    again = _video(live.url, num_frames=5, seed=3, response_format="frames_b64_png")
    pngs = first.json()["data"][0]["frames_b64_png"]
    assert len(pngs) == 5 and pngs == again.json()["data"][0]["frames_b64_png"]
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0]))).size == (48, 32)


def test_image_to_video(live: LiveServer) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = _video(live.url, image_url=url, num_frames=5, response_format="frames_b64_png")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny-wan-i2v"
    assert len(response.json()["data"][0]["frames_b64_png"]) == 5


@pytest.mark.parametrize(("body", "param"), [
    ({"num_frames": 8}, "num_frames"),
    ({"num_frames": 1000}, "num_frames"),
    ({"fps": 0}, "fps"),
    ({"response_format": "gif"}, "response_format"),
    ({"size": "50x32"}, "size"),
    ({"size": "2048x2048", "num_frames": 129}, "num_frames"),  # past 81 frames of 720p
    ({"image_url": "http://127.0.0.1/cat.png"}, "image_url"),
    ({"image_url": "blob:image/png;base64,"  # only data: URLs
      + base64.b64encode(png_declaring(40, 40)).decode()}, "image_url"),
    ({"image_url": "/etc/hosts"}, "image_url"),
    ({"image_url": "data:image/png;base64,not-base64!"}, "image_url"),
    ({"image_url": "data:image/png;base64,"  # a decompression bomb: 30000 x 30000 declared
      + base64.b64encode(png_declaring(30000, 30000)).decode()}, "image_url"),
    ({"image_url": "data:image/png;base64,"  # past the operator's VLM_MAX_IMAGE_PIXELS
      + base64.b64encode(png_declaring(200, 200)).decode()}, "image_url"),
])
def test_bad_video_requests(live: LiveServer, body: dict[str, Any], param: str) -> None:
    response = _video(live.url, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_video_nulls_mean_the_defaults(live: LiveServer) -> None:
    response = _video(live.url, num_frames=5, fps=None, response_format=None)
    assert response.status_code == 200, response.text
    assert "b64_mp4" in response.json()["data"][0]


def test_a_job_cancelled_while_waiting_lets_its_request_go() -> None:
    """The queue keeps a cancelled job's shell until the worker reaches it: the request it
    carried (a decoded first frame can be tens of MiB) is freed at once."""
    import gc
    import weakref

    from backend.diffusion.service import DiffusionJob

    class Payload:
        pass

    payload = Payload()
    alive = weakref.ref(payload)

    def run(stop: threading.Event, held: Payload = payload) -> Payload:
        return held

    job = DiffusionJob(run=run)
    del payload, run
    job.cancel()
    gc.collect()
    assert job.future.cancelled() and alive() is None


def test_image_benchmark_runs_on_dummy_weights(z_image_dir: str, tmp_path: Path) -> None:
    from bench_suite import main

    assert main(["image", "--model", z_image_dir, "--load-format", "dummy", "--image-size", "32",
                 "--image-steps", "1", "--repeats", "1", "--results-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("image-*.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert metrics["steps"] == 1 and metrics["size"] == 32
    for n in ("n1", "n4"):
        assert metrics[n]["mini-sglang"]["images_per_min"] > 0
        assert metrics[n]["diffusers"]["s_per_image"] > 0
