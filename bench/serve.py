"""The inference service against `cogpipe generate` started per request: a stream of videos
over 3 LoRAs and the base model, full-size random-weight CogVideoX-2b and -5b (49x480x720).

Per model, in one run:

1. a random-weight pipeline (bench/generate.py's components) is saved in diffusers layout
   with 3 random rank-64 LoRAs (alpha 64, B drawn so each changes the video), since
   both the service and the CLI load a model folder from disk;
2. switch: in this process, the pipeline with the 3 LoRAs resident as named adapters;
   the seconds of a switch (`cogpipe.service.activate`: `set_adapters`, or `disable_lora`
   for the base) against loading the LoRA from its file per request (`load_lora_weights`
   + `delete_adapters`); and a 2-step video right after each switch against the same
   video again, which shows a recompilation when the transformer is compiled;
3. service: `cogpipe serve-api` started as its own process with the 3 LoRAs; N requests
   posted at once over HTTP, cycling LoRA 0, 1, 2, base, each a shipped prompt template
   (cogpipe/prompts/templates.yaml) and its own seed (no request repeats, so none is served
   from the store); polled until each is done (the service runs queued jobs of one LoRA
   back to back, so it switches once per LoRA, not once per request);
4. reference: `cogpipe generate` run once per request (a process that loads the model,
   makes one video, exits) on the same N requests, one after another; never compiled
   (compiling for one video costs more than it saves), whatever `--compile` says.

Lines (`ratio` > 1: the service is better): `first_video_s` (process start to the first
finished video), `p50_s_per_video` (service: median gap between finished videos after the
first; CLI: median seconds of one process), `videos_per_hour` (N over the wall time, the
service's start included), `lora_switch_s` and `s_per_video_after_switch` (medians,
step 2; a switch costs `value - reference` of the latter). `outputs_equal` counts the
service's mp4s that are byte-identical to the CLI's for the same request.

    python bench/serve.py [--models 2b,5b] [--videos 8] [--steps 50] [--compile]
    python bench/serve.py --models 2b --videos 4 --steps 25 --switch-rounds 1   # shorter
    python bench/serve.py --dry   # tiny 2B on the CPU, 4 videos of 2 steps, to try the script

Goals (issue 22): a switch under 1 s without recompilation; videos per hour at least 1.3x
the per-request CLI at 2B.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANK = 64  # the smallest rank the user's plan allows
LORAS = ("slap-a", "slap-b", "slap-c")
SCENES = ("strike", "defensive_absorb", "referee_stop", "knockout")
SLOTS = {"striker": "a bald fighter in black shorts", "receiver": "a bearded man in red shorts"}
TARGETS = ["to_k", "to_out.0", "to_q", "to_v"]
PROMPT = "A bald fighter in black shorts slaps his opponent as the referee watches."


# --------------------------------------------------------------------------- model on disk


def randomise_lora(transformer, seed: int, std: float) -> None:
    """Draw the adapter's B weights (zero after `add_lora`) seeded, with `std`: 0.01 moves a
    full-size layer's output by an estimated tenth (far from fp16 overflow); the tiny model
    needs 0.05 to change its video by more than rounding."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * std)


def write_model(folder: Path, model: str, dry: bool) -> tuple[Path, dict[str, Path]]:
    """A random-weight model folder and 3 LoRA checkpoint folders under `folder`."""
    import torch
    from generate import build_pipeline

    from cogpipe.models import cogvideox

    pipe, _ = build_pipeline(model, dry)
    pipe.save_pretrained(folder / "model")
    rank = 4 if dry else RANK
    loras = {}
    for seed, name in enumerate(LORAS):
        cogvideox.add_lora(pipe.transformer, rank, rank, TARGETS, seed=seed)
        randomise_lora(pipe.transformer, seed, 0.05 if dry else 0.01)
        loras[name] = folder / name / "checkpoint-000100"
        cogvideox.save_lora(loras[name], pipe.transformer, rank, rank)
        pipe.transformer.delete_adapters("default")
    del pipe
    if not dry:
        torch.cuda.empty_cache()
    return folder / "model", loras


def requests(n: int, options) -> list[dict]:
    """N request bodies cycling the 3 LoRAs and the base, each a template and its own seed."""
    from cogpipe.templates import load_templates, render

    templates = load_templates()
    cycle = [*LORAS, None]
    out = []
    for i in range(n):
        scene = SCENES[i % len(SCENES)]
        body = {"template": scene, "slots": SLOTS, "lora": cycle[i % len(cycle)],
                "seed": 42 + i, "steps": options.steps, "guidance": options.guidance,
                "frames": options.frames, "height": options.height, "width": options.width}  # fmt: skip
        out.append(body | {"prompt_text": render(templates, scene, SLOTS)})
    return out


# --------------------------------------------------------------------------- LoRA switch


def synced(device: str):
    """A clock that waits for the GPU first, so a switch's queued kernels are counted."""
    import torch

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def switch_times(model_dir: Path, loras: dict[str, Path], options, args) -> dict:
    """Median seconds, in this process, of: a switch between resident adapters (the
    service's `activate`); loading the LoRA from its file per request instead (the
    reference); a 2-step video right after a switch and the same video again (with
    `--compile`, a switch that recompiles shows as the gap between the two)."""
    import torch

    from cogpipe.generate import generate_one, load
    from cogpipe.models.cogvideox import LORA_FILE
    from cogpipe.service import activate

    pipe = load(options.model_copy(update={"model": str(model_dir), "compile": args.compile}))
    now = synced(args.device)
    for name, path in loras.items():
        pipe.load_lora_weights(str(path), weight_name=LORA_FILE, adapter_name=name)
    short = options.model_copy(update={"steps": 2})
    times: dict[str, list[float]] = {"switch": [], "after": [], "again": [], "reload": []}
    for round_ in range(args.switch_rounds + 1):  # round 0 warms up (compiles) every adapter
        for name in [*loras, None]:
            t0 = now()
            activate(pipe, name, 1.0)
            t1 = now()
            generate_one(pipe, PROMPT, short)
            t2 = now()
            generate_one(pipe, PROMPT, short)
            if round_:
                times["switch"].append(t1 - t0)
                times["after"].append(t2 - t1)
                times["again"].append(now() - t2)
    pipe.delete_adapters(list(loras))
    for _ in range(args.switch_rounds):
        for name, path in loras.items():
            t0 = now()
            pipe.load_lora_weights(str(path), weight_name=LORA_FILE, adapter_name=name)
            pipe.delete_adapters([name])  # a per-request load unloads after the video
            times["reload"].append(now() - t0)
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- service


def free_port() -> int:
    """A port free now, so the bench knows where the service listens without reading its log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cogpipe_command() -> list[str]:
    """The `cogpipe` console script of this interpreter's environment (how a user runs it)."""
    script = shutil.which("cogpipe", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "import sys; from cogpipe.cli import "
                                    "main; sys.exit(main())"]  # fmt: skip


def wait_ready(client, process, timeout: float) -> None:
    """Poll until the service answers (it loads the model before serving).

    Raises:
        RuntimeError: the process exited, or no answer within `timeout` seconds.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cogpipe serve-api exited with {process.returncode}")
        try:  # the port listens from the start; /health answers once the model is loaded
            if client.get("/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"cogpipe serve-api did not answer within {timeout:.0f} s")


def service_run(model_dir: Path, loras: dict, bodies: list[dict], work: Path, args) -> dict:
    """Start the service, post every request, wait for all: finish times from the start,
    and the mp4 of each request.

    Raises:
        RuntimeError: the service failed to start or a job failed.
    """
    import httpx

    port = free_port()
    command = [*cogpipe_command(), "serve-api", "--model", str(model_dir), "--port", str(port),
               "--folder", str(work / "api")]  # fmt: skip
    command += [f"--lora={name}={path}" for name, path in loras.items()]
    command += ["--device", args.device] + (["--compile"] if args.compile else [])
    headers = {"Authorization": f"Bearer {os.environ['COGPIPE_API_KEY']}"} if os.environ.get(
        "COGPIPE_API_KEY") else {}  # fmt: skip
    log = open(work / "service.log", "w")  # noqa: SIM115 (closed in finally)
    started = time.time()  # the service's job times are time.time() too
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            wait_ready(c, process, args.start_timeout)
            ids = []
            for body in bodies:
                posted = c.post("/v1/videos", json={k: v for k, v in body.items()
                                                    if k != "prompt_text" and v is not None})  # fmt: skip
                if posted.status_code not in (200, 202):  # 200: a stored result
                    raise RuntimeError(f"POST /v1/videos: {posted.status_code} {posted.text}")
                ids.append(posted.json()["id"])
            done = wait_jobs(c, ids, started)
            videos = [c.get(f"/v1/videos/{i}/content").content for i in ids]
    except RuntimeError as e:  # the service's own words say why
        log.flush()
        tail = " | ".join((work / "service.log").read_text().strip().splitlines()[-5:])
        raise RuntimeError(f"{e}; service log: {tail}") from None
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    return {"done": done, "videos": videos}


def wait_jobs(client, ids: list[str], started: float) -> list[float]:
    """Seconds from `started` (a `time.time()`) at which each job finished, in finishing
    order: the service's own `finished` time (same host), not when a poll saw it.

    Raises:
        RuntimeError: a job failed or was cancelled.
    """
    finished: dict[str, float] = {}
    while len(finished) < len(ids):
        for i in ids:
            if i in finished:
                continue
            state = client.get(f"/v1/videos/{i}").json()
            if state["state"] == "done":
                finished[i] = state["finished"] - started
            elif state["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {i}: {state['state']}: {state.get('error')}")
        time.sleep(0.1)
    return sorted(finished.values())


# --------------------------------------------------------------------------- reference


def cli_run(model_dir: Path, loras: dict, bodies: list[dict], work: Path, args) -> dict:
    """`cogpipe generate` once per request: seconds of each process, and each mp4.

    Raises:
        RuntimeError: a process failed (its last output lines in the message).
    """
    seconds, videos = [], []
    for k, body in enumerate(bodies):
        out = work / "cli" / f"{k:03d}.mp4"
        command = [*cogpipe_command(), "generate", "--model", str(model_dir),
                   "--prompt", body["prompt_text"], "--output", str(out)]  # fmt: skip
        for flag in ("seed", "steps", "guidance", "frames", "height", "width"):
            command += [f"--{flag}", str(body[flag])]
        command += ["--lora", str(loras[body["lora"]])] if body["lora"] else []
        command += ["--device", args.device]  # eager: compiling for one video costs more
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds.append(time.perf_counter() - t0)
        if done.returncode:
            raise RuntimeError(f"cogpipe generate: {(done.stderr or done.stdout)[-600:]}")
        videos.append(out.read_bytes())
    return {"seconds": seconds, "videos": videos}


# --------------------------------------------------------------------------- results


def line(case: str, metric: str, value: float, reference: float, lower_is_better=True) -> dict:
    """One result line; `ratio` > 1 when the value beats the reference."""
    ratio = reference / value if lower_is_better else value / reference
    return {"bench": "serve", "case": case, "metric": metric, "value": round(value, 4),
            "reference": round(reference, 4), "ratio": round(ratio, 3)}  # fmt: skip


def model_lines(model: str, args) -> list[dict]:
    """Every line of one model: the switch, then the stream against the per-request CLI."""
    from generate import video_size

    from cogpipe.generate import GenerateOptions

    options = GenerateOptions(steps=args.steps, device=args.device, **video_size(model, args.dry))
    size = f"{options.frames}x{options.height}x{options.width}"
    case = f"cogvideox-{model} {options.steps} steps {size} 3 loras r{4 if args.dry else RANK}"
    case += " compile" if args.compile else ""
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        model_dir, loras = write_model(work, model, args.dry)
        switch = switch_times(model_dir, loras, options, args)
        lines = [
            line(f"{case} set_adapters vs load per request", "lora_switch_s",
                 switch["switch"], switch["reload"]),
            line(f"{case} 2-step video after a switch vs again", "s_per_video_after_switch",
                 switch["after"], switch["again"]),
        ]  # fmt: skip
        bodies = requests(args.videos, options)
        served = service_run(model_dir, loras, bodies, work, args)
        cli = cli_run(model_dir, loras, bodies, work, args)
    stream = f"{case} {len(bodies)} videos service vs generate per request"
    gaps = [b - a for a, b in zip(served["done"], served["done"][1:], strict=False)]
    n, cli_wall = len(bodies), sum(cli["seconds"])
    lines += [
        line(stream, "first_video_s", served["done"][0], cli["seconds"][0]),
        line(
            stream,
            "p50_s_per_video",
            statistics.median(gaps or served["done"]),
            statistics.median(cli["seconds"]),
        ),  # fmt: skip
        line(
            stream,
            "videos_per_hour",
            3600 * n / served["done"][-1],
            3600 * n / cli_wall,
            lower_is_better=False,
        ),  # fmt: skip
    ]
    equal = sum(a == b for a, b in zip(served["videos"], cli["videos"], strict=True))
    return [x | {"outputs_equal": f"{equal}/{n}"} for x in lines]


def main() -> None:
    from train_step import commit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--videos", type=int, default=8, help="requests in the stream")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--switch-rounds", type=int, default=3, help="after a warm-up round")
    parser.add_argument("--compile", action="store_true", help="both sides compile (GPU)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="service start, s")
    parser.add_argument("--workdir", help="where model folders go (default: the temp folder)")
    parser.add_argument("--dry", action="store_true", help="tiny 2B on the CPU, 4 videos")
    args = parser.parse_args()
    models = args.models.split(",")
    if unknown := [m for m in models if m not in ("2b", "5b")]:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: 2b, 5b")
    if args.dry:
        models, args.videos, args.steps, args.compile = ["2b"], min(args.videos, 4), 2, False
    args.device = "cpu" if args.dry else "cuda"

    import torch

    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    common = {"device": device, "date": datetime.date.today().isoformat(), "commit": commit()}
    for model in models:
        for result in model_lines(model, args):
            print(json.dumps(result | common), flush=True)


if __name__ == "__main__":
    main()
