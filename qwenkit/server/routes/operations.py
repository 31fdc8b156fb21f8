"""Operations: liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from qwenkit.server.routes.context import ServerContext


def operations_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/health", summary="Liveness: 200 while the engine runs")
    async def health():
        return {"status": "ok", "model": ctx.names[0]}

    @router.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        data, content_type = ctx.metrics.render()
        return Response(data, media_type=content_type)

    return router
