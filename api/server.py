"""The HTTP surface: FastAPI app, engine lifecycle, routes. No model logic lives here.

Start with `uvicorn api.server:app --host H --port P`. The engine is built and warmed up in a
worker thread after the server starts listening; `GET /health` answers 503 until then.
Endpoints: `/generate` (NDJSON), `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/metrics` (Prometheus text, or JSON with `?format=json`), `/health`. With VLM_MODEL_NAME a
vision-language model serves chat requests with image parts beside the LLM (api/vlm_api.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from api import generate_api, images_api, openai_api, videos_api, vlm_api
from api.errors import APIError, install_error_handlers, validation_error
from api.generate_api import HFMode
from api.images_api import ImageGenerationRequest
from api.metrics import CONTENT_TYPE, ServerMetrics
from api.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
)
from api.serving import ServingContext
from api.videos_api import VideoGenerationRequest
from api.vlm_api import VLMServing
from backend.diffusion.service import (
    DiffusionService,
    configured_image_models,
    configured_video_models,
)
from backend.vlm.images import ImagePolicy
from backend.vlm.service import VLMService
from config import Config, configure_logging, get_config
from engine.base import MAX_N, EngineBase
from ipc.zmq_control import ControlServer
from multi_device import EnginePool

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)
EngineFactory = Callable[[], "EngineBase | EnginePool"]


@dataclass(frozen=True)
class ServerSettings:
    """The server's own flags (read from Config attributes of the same names)."""

    api_key: str = ""
    request_timeout_s: float = 0.0
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = MAX_N
    max_prompts: int = 64
    max_pending_requests: int = 0


def server_settings(config: Config | None = None) -> ServerSettings:
    """ServerSettings from `config` (default: get_config())."""
    config = config or get_config()
    return ServerSettings(**{f.name: getattr(config, f.name) for f in fields(ServerSettings)})


class ServerState:
    """The engine's lifecycle as the server sees it: loading → ready | failed."""

    def __init__(self, config: Config, settings: ServerSettings) -> None:
        self.config = config
        self.settings = settings
        self.status = "loading"
        self.error: str | None = None
        self.engine: EnginePool | None = None
        self.serving: ServingContext | None = None
        self.control: ControlServer | None = None
        self.diffusion: DiffusionService | None = None
        self.diffusion_error: str | None = None
        self.vlm: VLMServing | None = None
        self.vlm_error: str | None = None
        self.metrics = ServerMetrics(self._snapshot)
        self.hf = HFMode(config)
        self._closed = False  # shutdown has begun: engines that finish loading now stop
        self._built: Any = None  # what the factory built, before it becomes `engine`
        self._build_lock = threading.Lock()

    def _snapshot(self) -> dict[str, Any] | None:
        return self.engine.snapshot() if self.engine is not None else None

    async def load(self, factory: EngineFactory) -> None:
        """Build the engine and warm it up, both off the event loop."""
        try:
            built = await asyncio.to_thread(self._build, factory)
            engine = built if isinstance(built, EnginePool) else EnginePool(self.config, [built])
            self.engine = engine
            await asyncio.to_thread(engine.warmup)
            settings = self.settings
            serving = ServingContext.build(
                engine,
                self.metrics,
                timeout_s=settings.request_timeout_s,
                max_n=settings.max_n,
                max_prompts=settings.max_prompts,
                max_in_flight=settings.max_pending_requests,
                max_new_tokens_default=engine.first.config.max_new_tokens_default,
            )
            if self.config.zmq_control:
                self.control = ControlServer(engine, self.config.zmq_control_endpoint,
                                             self.config.zmq_control_token).start()
            self._check_vlm_name(engine.model_name)
            self.serving = serving  # serves only once all of it stands: never half-failed
            self.status = "ready"
            logger.info("model %s ready", engine.model_name)
        except Exception as exc:
            logger.exception("the engine failed to load")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"

    async def load_all(self, factory: EngineFactory) -> None:
        """Image models and the vision-language model first, then the LLM engines: never a
        model load while another model runs steps (loaders patch torch's tensor constructors
        process-wide while they build modules on the meta device)."""
        await self.load_diffusion()
        await self.load_vlm()
        await self.load(factory)

    async def load_vlm(self) -> None:
        """Load the vision-language model and start its worker, when one is configured."""
        if not self.config.vlm_configured:
            return
        try:
            service = await asyncio.to_thread(VLMService, self.config)
        except Exception as exc:
            logger.exception("the vision-language model failed to load")
            self.vlm_error = f"{type(exc).__name__}: {exc}"
            return
        settings = self.settings
        self.vlm = VLMServing(
            service,
            self.metrics,
            ImagePolicy.from_config(self.config),
            timeout_s=settings.request_timeout_s,
            max_images=self.config.vlm_max_images,
            max_in_flight=settings.max_pending_requests,
        )
        logger.info("vision-language model %s ready", service.name)

    def _check_vlm_name(self, llm_name: str) -> None:
        """Requests tell the models apart by name: a VLM named like the LLM is not served."""
        if self.vlm is not None and self.vlm.model_name == llm_name:
            logger.error("the vision-language model has the LLM's name %r; not serving it",
                         llm_name)
            self.vlm_error = f"the vision-language model has the LLM's name {llm_name!r}"
            self.vlm.service.shutdown()  # its worker is idle: nothing was submitted yet
            self.vlm = None

    def vlm_ready(self) -> VLMServing:
        """The loaded VLM; a 503 while it loads or when it failed to."""
        if self.vlm is not None:
            return self.vlm
        if self.vlm_error is not None:
            message = f"the vision-language model failed to load: {self.vlm_error}"
        else:
            message = "the vision-language model is still loading"
        raise APIError(503, message, code="model_not_ready")

    def model_cards(self) -> list[ModelCard]:
        """The LLM's card, then the VLM's when it is loaded."""
        serving = self.ready()
        cards = [ModelCard(id=serving.model_name, max_model_len=serving.max_model_len)]
        if self.vlm is not None:
            cards.append(ModelCard(id=self.vlm.model_name,
                                   max_model_len=self.vlm.service.max_context_len))
        return cards

    async def load_diffusion(self) -> None:
        """Start the diffusion service and load its default model, when one is configured."""
        if not (configured_image_models(self.config) or configured_video_models(self.config)):
            return
        try:
            service = DiffusionService(self.config)
            await asyncio.to_thread(service.load_all)
            self.diffusion = service
        except Exception as exc:
            logger.exception("the image model failed to load")
            self.diffusion_error = f"{type(exc).__name__}: {exc}"

    def _build(self, factory: EngineFactory) -> Any:
        """The factory's engines, in its thread; a server that stopped meanwhile (its
        loading task cancelled, the thread running on) gets them stopped here."""
        built = factory()
        with self._build_lock:
            if not self._closed:
                self._built = built
                return built
        built.shutdown()
        raise RuntimeError("the server stopped while its engines loaded")

    async def shutdown(self) -> None:
        with self._build_lock:
            self._closed = True
            built = self._built
        if self.diffusion is not None:
            await asyncio.to_thread(self.diffusion.shutdown)
        if self.vlm is not None:
            await asyncio.to_thread(self.vlm.service.shutdown)
        if self.control is not None:
            await asyncio.to_thread(self.control.stop)
        engine = self.engine or built  # (built, not yet wrapped in the pool)
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    def ready(self) -> ServingContext:
        if self.serving is None:
            if self.status == "loading":
                message = "the model is still loading"
            else:
                message = f"the model failed to load: {self.error}"
            raise APIError(503, message, code="model_not_ready")
        return self.serving


def create_app(
    engine_factory: EngineFactory | None = None,
    *,
    config: Config | None = None,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """The FastAPI app; its engines come from `engine_factory` (an Engine, wrapped into a
    pool of one, or an EnginePool; default: EnginePool(config))."""
    config = config or get_config()
    state = ServerState(config, settings or server_settings(config))
    factory = engine_factory or (lambda: EnginePool(config))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        configure_logging(state.config)
        loading = asyncio.create_task(state.load_all(factory))
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await state.shutdown()

    app = FastAPI(title="mini-sglang", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=state.settings.max_request_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=state.settings.api_key)
    _add_routes(app, state)
    return app


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body validated as `model` (any content type; errors as OpenAI 400s)."""
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.status == "ready" and state.engine is not None:
            pool = state.engine.health()
            return JSONResponse(pool, status_code=503 if pool["status"] == "failed" else 200)
        body: dict[str, Any] = {"status": state.status}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models() -> Response:
        cards = state.model_cards()
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        cards = {card.id: card for card in state.model_cards()}
        if model not in cards:  # (model_cards answered 503 while loading)
            raise APIError(404, f"the model '{model}' does not exist", param="model",
                           code="model_not_found")
        return Response(cards[model].model_dump_json(), media_type="application/json")

    @app.get("/metrics")
    async def metrics(format: str = "prometheus") -> Response:
        if format == "json":
            return JSONResponse(state.metrics.json_view())
        if format not in ("prometheus", "text"):
            raise APIError(400, "format must be 'prometheus' or 'json'", param="format")
        return Response(state.metrics.prometheus_text(), media_type=CONTENT_TYPE)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await parse_body(request, GenerateRequest)
        return await generate_api.generate(body, request, state.ready(), state.hf)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        target = vlm_api.chat_target(
            body.model,
            vlm_api.first_image_content(body.messages),
            llm_name=state.serving.model_name if state.serving is not None else None,
            vlm_name=state.vlm.model_name if state.vlm is not None else None,
            vlm_configured=state.config.vlm_configured,
        )
        if target == "vlm":
            return await vlm_api.chat_completions(body, request, state.vlm_ready())
        return await openai_api.chat_completions(body, request, state.ready())

    def diffusion() -> DiffusionService | None:
        """The loaded diffusion service; a 503 while it loads or when it failed to."""
        if state.diffusion is None and state.diffusion_error is not None:
            raise APIError(503, f"the diffusion models failed to load: {state.diffusion_error}",
                           code="model_not_ready")
        configured = configured_image_models(state.config) or configured_video_models(
            state.config)
        if state.diffusion is None and configured:
            raise APIError(503, "the diffusion models are still loading", code="model_not_ready")
        return state.diffusion

    @app.post("/v1/images/generations")
    async def image_generations(request: Request) -> Response:
        body = await parse_body(request, ImageGenerationRequest)
        return await images_api.generate(body, diffusion(), state.config.max_images,
                                         request.is_disconnected,
                                         state.settings.request_timeout_s)

    @app.post("/v1/videos/generations")
    async def video_generations(request: Request) -> Response:
        body = await parse_body(request, VideoGenerationRequest)
        return await videos_api.generate(body, diffusion(), request.is_disconnected,
                                         state.settings.request_timeout_s)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        if state.vlm is not None and body.model == state.vlm.model_name:
            raise APIError(400, f"the vision-language model '{body.model}' serves "
                                "/v1/chat/completions only", param="model")
        return await openai_api.completions(body, request, state.ready())


app = create_app()
