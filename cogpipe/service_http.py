"""`cogpipe serve-api`'s HTTP side: the FastAPI app over a `service.Service`, and `serve`,
which binds the port, loads the pipeline and runs uvicorn until SIGINT or SIGTERM.

Routes (under /v1; with COGPIPE_API_KEY set each needs `Authorization: Bearer <key>`):
`POST /videos` (prompt, or template + slots; lora, lora_scale, seed, steps, guidance,
frames, height, width, fps, step_cache, step_cache_threshold; image as base64 for an
image-to-video model) -> 202 and a job, or 200 and a stored result; `GET /videos/{id}`,
`GET /videos/{id}/content` (the mp4), `DELETE /videos/{id}` (cancels a queued job);
`GET|POST /loras`; `GET /templates`; `GET|POST /queue` (pause and resume the worker).
`GET /health` and `/docs` need no key.
Refusals are `{"detail": reason}` with their 4xx, as FastAPI's own validation errors.
"""

from __future__ import annotations

import hmac
import os
import socket
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cogpipe.rate import quiet_stop
from cogpipe.service import NAME, Service, ServiceError, VideoRequest, job_order
from cogpipe.service_adapters import Lora, RequestError

KEY_ENV = "COGPIPE_API_KEY"


class LoraRequest(BaseModel):
    """POST /v1/loras: a name and a checkpoint folder or LoRA .safetensors file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    path: str


class QueueRequest(BaseModel):
    """POST /v1/queue: pause (jobs are still accepted) or resume the worker."""

    model_config = ConfigDict(extra="forbid")

    paused: bool


# --------------------------------------------------------------------------- HTTP


def create_app(service: Service) -> FastAPI:
    """The FastAPI app: /v1 routes behind the API key (when set), /health and /docs open."""
    app = FastAPI(title="cogpipe inference service", version="1")
    app.add_exception_handler(RequestError, _refused)
    key = os.environ.get(KEY_ENV) or None
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(key))])

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "model": service.defaults.model, "loras": sorted(service.loras)}

    @v1.post("/videos", status_code=202)
    def post_video(req: VideoRequest) -> JSONResponse:
        job, status = service.submit(req)
        return JSONResponse(service.view(job), status_code=status)

    @v1.get("/videos/{job_id}")
    def get_video(job_id: str) -> dict:
        return service.view(_job(service, job_id))

    @v1.get("/videos/{job_id}/content")
    def get_content(job_id: str) -> FileResponse:
        job = _job(service, job_id)
        if job["state"] != "done":
            raise RequestError(409, f"job {job_id} is {job['state']}, not done")
        if not (service.folder / job["result"]).is_file():
            raise RequestError(404, f"job {job_id}: its video {job['result']} was removed")
        return FileResponse(service.folder / job["result"], media_type="video/mp4")

    @v1.delete("/videos/{job_id}")
    def delete_video(job_id: str) -> dict:
        job = _job(service, job_id)
        if not service.store.cancel(job_id):
            raise RequestError(409, f"job {job_id} is {job['state']}; only a queued job cancels")
        return service.view(_job(service, job_id))

    @v1.get("/loras")
    def get_loras() -> list[dict]:
        return [_lora_view(x) for x in sorted(service.loras.values(), key=lambda x: x.name)]

    @v1.post("/loras", status_code=201)
    def post_lora(req: LoraRequest) -> dict:
        return _lora_view(service.add_lora(req.name, req.path))

    @v1.get("/templates")
    def get_templates() -> list[dict]:
        return [t.as_dict() for t in service.templates.values()]

    @v1.get("/queue")
    def get_queue() -> dict:
        order = [j["id"] for j in job_order(service.store.queued(), *service.last)]
        return {"paused": service.paused, "counts": service.store.counts(), "order": order}

    @v1.post("/queue")
    def post_queue(req: QueueRequest) -> dict:
        service.paused = req.paused
        service.wake.set()
        return get_queue()

    app.include_router(v1)
    return app


def _auth(key: str | None):
    """A dependency that refuses a request without `Authorization: Bearer <key>` (401)."""

    def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError(401, f"missing or wrong API key (Authorization: Bearer ${KEY_ENV})")

    return check


def _refused(request: Request, e: RequestError) -> JSONResponse:
    """A RequestError as FastAPI's own errors look: `{"detail": reason}` with its status."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"detail": str(e)}, status_code=e.status, headers=headers)


def _job(service: Service, job_id: str) -> dict:
    """The job of a URL's id, or a 404 naming it."""
    job = service.store.get(job_id)
    if job is None:
        raise RequestError(404, f"no job {job_id}")
    return job


def _lora_view(lora: Lora) -> dict:
    return {"name": lora.name, "path": str(lora.path), "sha256": lora.sha256}


# --------------------------------------------------------------------------- serving


def serve(
    service: Service,
    loras: dict[str, Path],
    host: str,
    port: int,
    on_line: Callable[[str], None] = print,
) -> None:
    """Load the pipeline, then serve until SIGINT or SIGTERM; `port` 0 picks a free one.

    Raises:
        ServiceError: the port is taken, or a LoRA does not load.
    """
    import uvicorn

    sock = _listen(host, port)
    try:
        service.start(loras, on_line)
        shown = f"[{host}]" if ":" in host else host
        on_line(f"serve-api: http://{shown}:{sock.getsockname()[1]}/ (docs at /docs)")
        config = uvicorn.Config(
            create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=3
        )
        with quiet_stop():
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.shutdown()
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads: a port taken fails in a second."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise ServiceError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0: any free one)"
        ) from e
    return sock
