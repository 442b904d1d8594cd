"""App factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.files.router import router as files_router
from app.health.router import router as health_router
from app.inference.router import router as inference_router
from app.jobs import metrics as job_metrics
from app.jobs.reaper import ReaperThread
from app.jobs.router import router as jobs_router
from app.kit.errors import install_error_handlers
from app.kit.input_guard import guard_input
from app.kit.logging import configure_logging
from app.kit.metrics import install_metrics
from app.kit.request_id import RequestIdMiddleware
from app.models_registry.router import router as models_router
from app.openapi_spec import document_api
from app.settings import Settings, get_settings
from app.tenancy.ratelimit import install_rate_limit_headers
from app.tenancy.router import router as tenancy_router
from app.tenancy.service import flush_metered_usage
from app.ui.router import install_ui


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    reaper = ReaperThread() if get_settings().run_reaper else None
    if reaper:
        reaper.start()
    yield
    if reaper:
        reaper.stop_event.set()
    await flush_metered_usage()  # served counts still in memory (app.tenancy.meter)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(
        title="tunehouse",
        version="0.1.0",
        description="Self-hosted fine-tuning service with an OpenAI-compatible API.",
        lifespan=lifespan,
        docs_url=None,  # document_api serves /docs and /redoc without a CDN
        redoc_url=None,
        dependencies=[Depends(guard_input)],  # NUL / lone surrogates in any parameter: a 400, first
    )
    install_error_handlers(app)
    install_metrics(app)
    install_rate_limit_headers(app)
    job_metrics.register()
    app.include_router(health_router)
    app.include_router(files_router, prefix="/v1")
    app.include_router(jobs_router, prefix="/v1")
    app.include_router(models_router, prefix="/v1")
    app.include_router(inference_router, prefix="/v1")
    app.include_router(tenancy_router, prefix="/v1")
    install_ui(app)  # the web console at /ui
    document_api(app)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response and log line has the id
    return app
