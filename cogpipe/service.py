"""`cogpipe serve-api`: one long-lived process per GPU holding a CogVideoX pipeline, serving
text- and image-to-video over HTTP with LoRAs hot-swapped by name and a job queue that
survives restarts.

    cogpipe serve-api demo/demo.yaml --lora slap=demo/workspace/train/run/checkpoint-000006
    curl -X POST 127.0.0.1:8000/v1/videos -d '{"prompt": "A fighter slaps.", "lora": "slap"}'
    curl 127.0.0.1:8000/v1/videos/<id>              # state, queue position, step progress
    curl -o slap.mp4 127.0.0.1:8000/v1/videos/<id>/content

The HTTP routes are in `service_http`.

What is notable:
- a video equals `cogpipe generate`'s with the same model, LoRA, scale, seed and settings:
  the worker calls `generate.generate_one` and `generate.write_video` on a pipeline that
  `generate.load` loaded once; a LoRA is a diffusers adapter on it, set per job (the base
  model's jobs run with the adapters disabled), so switching LoRAs reloads nothing;
- one worker thread takes the jobs one at a time: the oldest first, then queued jobs of
  the same LoRA back to back (at most `STREAK` in a row, so no LoRA waits for ever);
- every job's key hashes the model (files and dtype), the LoRA file's sha256, the scale,
  the settings, the seed, the prompt and the image: a request whose video is already
  stored is answered at once (`cached: true`), and one already queued returns that job;
- the speed options (`SPEED`) trade exactness for time, as evaluate's do: a step cache
  (the service's `--step-cache`, or a request's `step_cache`) and FP8 linears (the
  service's `--fp8-linears`, for its whole pipeline). They are in a job's key when on, as
  in evaluate's keys, so an exact video is never the answer to a cached request, nor the
  reverse; a job re-queued by a restart that turned `--fp8-linears` on or off fails
  rather than store another pipeline's video under its key;
- jobs, results (`videos/<key>.mp4`) and LoRAs added through the API live in the service
  folder (`service_jobs.JobStore`); a restart re-queues what was queued or running;
- `POST /v1/loras` changes the pipeline's modules, so it waits for the video in flight.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogpipe import generate
from cogpipe.config import StepCache
from cogpipe.errors import UserError
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.service_adapters import Lora, RequestError, Resident, Slot, lora_layout
from cogpipe.service_jobs import JobStore
from cogpipe.templates import Template, TemplateError, render
from cogpipe.workspace import model_fingerprint, sha256_json

SLOT_RANK = 128  # a hot-swap slot's rank when no LoRA is given at the start
STREAK = 8  # at most this many jobs of one LoRA in a row while others wait
SAMPLER = ("steps", "guidance", "frames", "height", "width", "fps", "seed")
SPEED = ("step_cache", "step_cache_threshold", "fp8_linears")  # the service's speed flags
REQUESTED = (*SAMPLER, "step_cache", "step_cache_threshold")  # what a request may set
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a LoRA's name in requests and URLs
MAX_IMAGE = 32 << 20  # bytes of an image-to-video request's first frame
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


class ServiceError(UserError, RuntimeError):
    """The service cannot start: a port taken, a LoRA or templates file that does not load."""


class Stopping(Exception):
    """The process is stopping: the video in flight goes back to the queue."""


@dataclass(frozen=True)
class Limits:
    """The largest job the service takes, and how many may wait."""

    frames: int = 81
    pixels: int = 768 * 1360  # height x width of one frame
    steps: int = 100
    queue: int = 100


class VideoRequest(BaseModel):
    """POST /v1/videos: what to generate; settings not given are the service's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None, max_length=4000, description="The prompt; or give template and slots."
    )
    template: str | None = Field(None, description="A template's name (GET /v1/templates).")
    slots: dict[str, str] = Field(default_factory=dict, description="The template's slots.")
    lora: str | None = Field(None, description="A loaded LoRA's name (GET /v1/loras); none: base.")
    lora_scale: float = Field(1.0, description="1.0 applies the file's alpha/rank; 0 is off.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = None
    guidance: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int | None = None
    image: str | None = Field(None, description="Image-to-video: the first frame, base64 PNG/JPEG.")
    step_cache: StepCache | None = Field(
        None, description="Reuse work across steps (first_block, pab, faster); none: exact."
    )
    step_cache_threshold: float | None = Field(
        None, ge=0, description="first_block's threshold (0 never skips)."
    )


def sha256_file(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (a 5B rank-256 LoRA is ~1 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_order(queued: list[dict], current: str | None, streak: int) -> list[dict]:
    """The order the worker takes `queued` (in submission order) in: the oldest first, then
    the same LoRA's jobs back to back; after STREAK in a row, another LoRA's oldest job.

    Args:
        current: the LoRA of the job that ran last (None: the base model).
        streak: how many jobs of `current` ran in a row.
    """
    waiting, order = list(queued), []
    while waiting:
        if streak < STREAK:  # the same LoRA's next job, else the oldest
            preferred = [j for j in waiting if j["lora"] == current]
        else:  # its turn is over: the oldest job of any other
            preferred = [j for j in waiting if j["lora"] != current]
        job = preferred[0] if preferred else waiting[0]
        streak = streak + 1 if job["lora"] == current else 1
        current = job["lora"]
        waiting.remove(job)
        order.append(job)
    return order


class Service:
    """The pipeline, its LoRAs, the job store and the worker thread of one process."""

    def __init__(
        self,
        folder: Path,
        defaults: GenerateOptions,
        templates: dict[str, Template],
        limits: Limits = Limits(),
        paused: bool = False,
        max_rank: int | None = None,
        hotswap: bool | None = None,
    ) -> None:
        """`hotswap` (default: when the pipeline is compiled) keeps one LoRA slot of
        `max_rank` (default: the largest rank of the LoRAs the service starts with, else
        `SLOT_RANK`) instead of one adapter per LoRA (`service_adapters`)."""
        self.folder = Path(folder)
        self.hotswap = defaults.compile if hotswap is None else hotswap
        self.max_rank, self.adapters = max_rank, None
        self.store = JobStore(self.folder / "jobs.sqlite")
        self.defaults = defaults.model_copy(update={"lora": None, "image": None})
        self.traits = generate.model_traits(defaults.model)
        self.templates, self.limits = templates, limits
        self.loras: dict[str, Lora] = {}
        self.pipe, self.fingerprint = None, ""
        self.lock = threading.Lock()  # the pipeline: one video or one LoRA load at a time
        self.stop, self.wake = threading.Event(), threading.Event()
        self.paused = paused
        self.progress: dict[str, tuple[int, int]] = {}  # running job -> (steps done, steps)
        self.last: tuple[str | None, int] = ("", 0)  # (LoRA of the last job, run length);
        # "" before the first job: no LoRA's name (None is the base model's)
        self.worker = threading.Thread(target=self._work, name="cogpipe-gpu", daemon=True)

    # ----------------------------------------------------------------------- lifecycle

    def start(self, loras: dict[str, Path], on_line: Callable[[str], None] = print) -> None:
        """Load the pipeline and the LoRAs (those added before a restart, then `loras`),
        then start the worker.

        Raises:
            ServiceError: a LoRA given here does not load.
        """
        self.pipe = generate.load(self.defaults)
        stored = {
            row["name"]: row["path"] for row in self.store.loras() if row["name"] not in loras
        }
        self.adapters = self._adapters([*stored.values(), *loras.values()])
        dtype = str(self.pipe.transformer.dtype)
        self.fingerprint = sha256_json(
            [model_fingerprint(generate.resolve_model(self.defaults.model)), str(dtype)]
        )
        for name, path in stored.items():
            try:
                self.add_lora(name, path)
            except RequestError as e:  # its file moved or changed since: jobs naming it fail
                on_line(f"serve-api: LoRA {name} not reloaded: {e}")
        for name, path in loras.items():
            try:
                self.add_lora(name, str(path), replace=True)
            except RequestError as e:
                raise ServiceError(f"--lora {name}={path}: {e}") from None
        self.worker.start()

    def _adapters(self, paths: list) -> Resident | Slot:
        """How LoRAs live on the pipeline: one slot of the largest rank among `paths` (files
        that do not read count as nothing: `add_lora` says why) when hot-swapping."""
        if not self.hotswap:
            return Resident(self.pipe)
        if self.max_rank is None:
            ranks = []
            for path in paths:
                try:
                    ranks.append(lora_layout(generate.lora_file(str(path)))[0])
                except Exception:  # noqa: BLE001, S112 - reported when it is added
                    continue
            self.max_rank = max(ranks, default=SLOT_RANK)
        return Slot(self.pipe, self.max_rank)

    def shutdown(self) -> None:
        """Stop the worker; a video in flight goes back to the queue for the next start."""
        self.stop.set()
        self.wake.set()
        if self.worker.is_alive():
            self.worker.join(timeout=60)

    # ----------------------------------------------------------------------- LoRAs

    def add_lora(self, name: str, path: str, replace: bool = False) -> Lora:
        """Load a LoRA (a checkpoint folder or its file) as a named adapter, without reloading
        the base; the same file under the same name again is a no-op.

        Raises:
            RequestError: 422 when the path is not a plain LoRA of this model, 409 when the
                name is taken by another file (unless `replace`).
        """
        if not re.match(NAME, name):
            raise RequestError(422, f"LoRA name {name!r}: letters, digits, '_', '.', '-' only")
        try:
            file = generate.lora_file(path)
        except GenerateError as e:
            raise RequestError(422, str(e).removeprefix("--lora ")) from None
        mode = generate.trained_mode(file)
        if mode is not None and mode[0] != "lora":
            raise RequestError(
                422,
                f"{path}: trained in mode {mode[0]}, which needs a "
                "condition; the service serves plain LoRAs",
            )
        lora = Lora(name, file.resolve(), sha256_file(file))
        old = self.loras.get(name)
        if old is not None and old.sha256 != lora.sha256 and not replace:
            raise RequestError(409, f"LoRA {name!r} is already {old.path}; pick another name")
        with self.lock:
            self.adapters.add(lora)
        self.loras[name] = lora
        self.store.put_lora(name, str(lora.path), lora.sha256)
        return lora

    # ----------------------------------------------------------------------- requests

    def submit(self, req: VideoRequest) -> tuple[dict, int]:
        """A job for the request: (job, 202) queued, or (job, 200) a stored result.

        Raises:
            RequestError: 422 naming what is wrong with the request, 429 when the queue is full.
        """
        prompt = self._prompt(req)
        lora = self._lora(req.lora)
        options = self._options(req)
        key = self._key(prompt, options, lora)
        spec = {
            "prompt": prompt,
            "options": options.model_dump(mode="json"),
            "lora_sha256": lora.sha256 if lora else None,
        }
        name = lora.name if lora else None
        done = self.store.find(key, ("done",))
        if done is not None and (self.folder / done["result"]).is_file():
            return self.store.add(key, name, spec, done_as=done), 200
        pending = self.store.find(key, ("queued", "running"))
        if pending is not None:
            return pending, 202
        if self.store.counts()["queued"] >= self.limits.queue:
            raise RequestError(429, f"the queue is full ({self.limits.queue} jobs); retry later")
        job = self.store.add(key, name, spec)
        self.wake.set()
        return job, 202

    def _prompt(self, req: VideoRequest) -> str:
        """The request's prompt, or its template filled in (422 naming what is wrong)."""
        if (req.prompt is None) == (req.template is None):
            raise RequestError(422, "give prompt, or template and slots (exactly one of them)")
        if req.prompt is not None:
            if not req.prompt.strip():
                raise RequestError(422, "prompt: empty")
            return " ".join(req.prompt.split())
        try:
            return render(self.templates, req.template, req.slots)
        except TemplateError as e:
            raise RequestError(422, str(e)) from None

    def _lora(self, name: str | None) -> Lora | None:
        """The named resident LoRA (None: the base model), or a 422 listing the loaded ones."""
        if name is None:
            return None
        if name not in self.loras:
            known = ", ".join(sorted(self.loras)) or "none (POST /v1/loras adds one)"
            raise RequestError(422, f"unknown LoRA {name!r}; loaded: {known}")
        return self.loras[name]

    def _options(self, req: VideoRequest) -> GenerateOptions:
        """The request's settings over the defaults, checked against the model and the limits."""
        given = {k: getattr(req, k) for k in REQUESTED if getattr(req, k) is not None}
        values = self.defaults.model_dump() | given | {"lora_scale": req.lora_scale}
        if req.image is not None:
            values["image"] = self._save_image(req.image)
        try:
            options = generate.fit(GenerateOptions(**values), self.traits)
        except ValidationError as e:
            err = e.errors()[0]
            message = err["msg"].removeprefix("Value error, ")  # a check across options
            raise RequestError(  # names them itself (pab with the service's compile)
                422, f"{err['loc'][0]}: {message}" if err["loc"] else message
            ) from None
        except GenerateError as e:
            raise RequestError(422, str(e).replace("--", "")) from None
        self._check_limits(options)
        return options

    def _check_limits(self, options: GenerateOptions) -> None:
        """Refuse (422) frames, size or steps over the service's limits."""
        limits = self.limits
        if options.frames > limits.frames:
            raise RequestError(422, f"frames {options.frames}: at most {limits.frames}")
        if options.height * options.width > limits.pixels:
            raise RequestError(
                422,
                f"size {options.height}x{options.width}: at most {limits.pixels} pixels a frame",
            )
        if options.steps > limits.steps:
            raise RequestError(422, f"steps {options.steps}: at most {limits.steps}")

    def _save_image(self, data: str) -> str:
        """A base64 image, checked and stored by content under `images/`; its path."""
        from PIL import Image, UnidentifiedImageError

        if len(data) > MAX_IMAGE * 4 // 3 + 4:
            raise RequestError(422, f"image: larger than {MAX_IMAGE >> 20} MiB")
        try:
            raw = base64.b64decode(data, validate=True)
            with Image.open(io.BytesIO(raw)) as img:
                img.verify()
                suffix = IMAGE_FORMATS.get(img.format or "")
        except (binascii.Error, ValueError):
            raise RequestError(422, "image: not base64") from None
        except (OSError, UnidentifiedImageError) as e:
            raise RequestError(422, f"image: not a readable image ({e})") from None
        if suffix is None:
            raise RequestError(422, f"image: {img.format} is not PNG, JPEG, WebP or BMP")
        path = self.folder / "images" / f"{hashlib.sha256(raw).hexdigest()}{suffix}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(raw)
            tmp.replace(path)
        return str(path)

    def _key(self, prompt: str, options: GenerateOptions, lora: Lora | None) -> str:
        """The hash of everything the video depends on (the image by its content-named file)."""
        parts = {
            "model": self.fingerprint,
            "lora": lora.sha256 if lora else None,
            "scale": options.lora_scale if lora else None,
            "prompt": prompt,
            "settings": {k: getattr(options, k) for k in SAMPLER},
            "image": Path(options.image).stem if options.image else None,
        }
        speed = speed_key(options)
        if speed:  # only when on: exact jobs keep their keys
            parts["speed"] = speed
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def view(self, job: dict) -> dict:
        """A job as the API shows it: state, queue position, step progress, seconds."""
        names = ("id", "state", "lora", "cached", "error", "created", "started", "finished")
        out = {k: job[k] for k in names}
        out["prompt"] = job["spec"]["prompt"]
        out["position"] = None
        if job["state"] == "queued":
            order = [j["id"] for j in job_order(self.store.queued(), *self.last)]
            out["position"] = order.index(job["id"]) + 1 if job["id"] in order else None
        done, steps = self.progress.get(job["id"], (0, job["spec"]["options"]["steps"]))
        out["step"], out["steps"] = (steps if job["state"] == "done" else done), steps
        if job["state"] == "running":
            out["seconds"] = round(time.time() - job["started"], 3)
        else:
            out["seconds"] = job["seconds"]
        out["content"] = f"/v1/videos/{job['id']}/content" if job["state"] == "done" else None
        return out

    # ----------------------------------------------------------------------- the worker

    def _work(self) -> None:
        """Take jobs one at a time until stopped; a job that raises fails alone."""
        while not self.stop.is_set():
            order = [] if self.paused else job_order(self.store.queued(), *self.last)
            if not order:
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            try:
                self._run(order[0])
            except Exception as e:  # noqa: BLE001 - the store failed (disk full): keep serving
                print(f"serve-api: job {order[0]['id']}: {e}", file=sys.stderr, flush=True)
                self.stop.wait(timeout=5.0)

    def _run(self, job: dict) -> None:
        """One job: claimed, generated, written, recorded (done, failed, or queued again)."""
        if not self.store.claim(job["id"]):
            return  # cancelled meanwhile
        current, streak = self.last
        self.last = (job["lora"], streak + 1 if job["lora"] == current else 1)
        t0 = time.time()
        try:
            frames = self._generate(job)
            result = f"videos/{job['key']}.mp4"
            generate.write_video(self.folder / result, frames, job["spec"]["options"]["fps"])
            self.store.finish(job["id"], result, time.time() - t0)
        except Stopping:
            self.store.requeue(job["id"])
        except Exception as e:  # noqa: BLE001 - the job's failure, never the worker's
            self.store.fail(job["id"], f"{type(e).__name__}: {e}"[:500])
        finally:
            self.progress.pop(job["id"], None)

    def _generate(self, job: dict):
        """The job's frames, [F, H, W, 3] uint8, with its LoRA active (generate's sampling).

        Raises:
            RequestError: the job's LoRA is gone or its file changed since it was queued.
            Stopping: the service is stopping (checked at every step).
        """
        spec, job_id = job["spec"], job["id"]
        options = GenerateOptions(**spec["options"])
        lora = self.loras.get(job["lora"]) if job["lora"] else None
        if job["lora"] and (lora is None or lora.sha256 != spec["lora_sha256"]):
            raise RequestError(409, f"LoRA {job['lora']!r} is no longer the file it was")
        if options.fp8_linears != self.defaults.fp8_linears:  # queued before a restart
            raise RequestError(
                409,
                f"queued with fp8_linears {'on' if options.fp8_linears else 'off'}; the service"
                f" now runs with them {'on' if self.defaults.fp8_linears else 'off'}",
            )

        def on_step(done: int, steps: int) -> None:
            if self.stop.is_set():
                raise Stopping
            self.progress[job_id] = (done, steps)

        with self.lock:
            self.adapters.activate(lora, options.lora_scale)
            return generate.generate_one(self.pipe, spec["prompt"], options, on_step=on_step)


def speed_key(options: GenerateOptions) -> dict:
    """The speed options a job's key holds: those on, the threshold with first_block only
    (pab and faster do not read it), as `EvaluateConfig` keys them; {} for the exact path."""
    speed: dict = {"fp8_linears": True} if options.fp8_linears else {}
    if options.step_cache != "none":
        speed["step_cache"] = options.step_cache
    if options.step_cache == "first_block":
        speed["step_cache_threshold"] = options.step_cache_threshold
    return speed


# --------------------------------------------------------------------------- serving


def parse_loras(items: list[str]) -> dict[str, Path]:
    """`--lora NAME=PATH` flags as {name: path}.

    Raises:
        ServiceError: a flag without `=`, a bad or repeated name.
    """
    loras: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path or not re.match(NAME, name):
            raise ServiceError(f"--lora {item}: expected NAME=PATH (NAME: letters, digits, _.-)")
        if name in loras:
            raise ServiceError(f"--lora {item}: the name {name} is given twice")
        loras[name] = Path(path)
    return loras


def defaults_for(
    config: str | None,
    model: str | None,
    device: str | None,
    compile: bool = False,
    speed: dict | None = None,
) -> GenerateOptions:
    """The service's settings for requests that give none: a config's model and evaluation
    sampling (as `generate --config`: its speed options too), else generate's defaults;
    `model`, `device` and `speed` (flags given: {option in `SPEED`: value}) win.

    Raises:
        ServiceError: neither a config nor a model is given, or options that do not go
            together (pab with compile).
        GenerateError: options the device cannot honour (`generate.check_device`), before
            anything loads.
    """
    from cogpipe.config import load_config
    from cogpipe.generate_config import config_values
    from cogpipe.workspace import resolve_device

    values = config_values(load_config(config)) if config else {}
    values |= {k: v for k, v in (("model", model), ("device", device)) if v is not None}
    values |= speed or {}
    if "model" not in values:
        raise ServiceError("serve-api: give a CONFIG or --model (the base model to serve)")
    try:
        options = GenerateOptions(**values | {"compile": compile})
    except ValidationError as e:
        err = e.errors()[0]
        where = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""
        raise ServiceError(
            f"serve-api: {where}{err['msg'].removeprefix('Value error, ')}"
        ) from None
    generate.check_device(options, resolve_device(options.device))
    return options
