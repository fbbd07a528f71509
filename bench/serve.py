"""The inference service against `cogpipe generate` started per request: a stream of videos
over 3 LoRAs and the base model, full-size random-weight CogVideoX-2b and -5b (49x480x720).

Per model, in one run:

1. a random-weight pipeline (bench/generate.py's components) is saved in diffusers layout
   with 3 random rank-64 LoRAs (alpha 64, B drawn so each changes the video), since
   both the service and the CLI load a model folder from disk;
2. switch, per mode: in this process, the pipeline with the 3 LoRAs as the service holds
   them (`cogpipe.service_adapters`): eager, resident adapters switched by `set_adapters`;
   compile, the blocks compiled and one hot-swap slot the LoRAs are copied into. The
   seconds of a switch (the base model is in the cycle) against loading the LoRA from its
   file per request; a 2-step 9-frame video right after each switch against the same video
   again; and the graphs torch.compile made after a warm-up round (0: no switch recompiled);
3. service, per mode: `cogpipe serve-api` (with `--compile` in compile mode) started as its
   own process with the 3 LoRAs; N requests posted at once over HTTP, cycling LoRA 0, 1, 2,
   base, each a shipped prompt template (cogpipe/prompts/templates.yaml) and its own seed
   (no request repeats, so none is served from the store); polled until each is done (the
   service runs queued jobs of one LoRA back to back, so it switches once per LoRA);
4. reference: `cogpipe generate` run once per request (a process that loads the model,
   makes one video, exits) on the same N requests, one after another, eager (compiling
   for one video costs more than it saves).

Lines (`ratio` > 1: the service is better): `lora_switch_s` and `s_per_video_after_switch`
(medians, step 2; a switch costs `value - reference` of the latter); `first_video_s`
(process start to the first finished video), `p50_s_per_video` (service: median gap
between finished videos after the first; CLI: median seconds of one process),
`videos_per_hour` (N over the wall time, the service's start and compilation included)
and `videos_per_hour_warm` (3600 over the p50: a service starts once, then runs for days).
Stream lines carry `outputs_equal` (the service's mp4s byte-identical to the CLI's for the
same request) and `min_psnr_db` (the lowest PSNR between the two: compiled kernels round
apart from eager ones).

    python bench/serve.py [--models 2b,5b] [--modes eager,compile] [--videos 8] [--steps 50]
    python bench/serve.py --models 2b --videos 4 --steps 25 --switch-rounds 1   # shorter
    python bench/serve.py --dry   # tiny 2B on the CPU, eager, 4 videos of 2 steps

Goals (issue 22): a switch under 1 s without recompilation; videos per hour at least 1.3x
the per-request CLI at 2B.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Bench, commit, device_name  # noqa: E402 - after the paths above

from cogpipe.net import free_port  # noqa: E402

RANK = 64  # the smallest rank the user's plan allows
SWITCH_FRAMES = 9  # the switch's short videos: 2 steps of 9 frames at the model's size
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
        body = {
            "template": scene,
            "slots": SLOTS,
            "lora": cycle[i % len(cycle)],
            "seed": 42 + i,
            "steps": options.steps,
            "guidance": options.guidance,
            "frames": options.frames,
            "height": options.height,
            "width": options.width,
        }
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


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def switch_times(model_dir: Path, loras: dict[str, Path], options, compile: bool, args) -> dict:
    """Median seconds, in this process, of: a switch between the LoRAs (the service's own
    `service_adapters`: `Resident`'s `set_adapters` eager, `Slot`'s in-place hot-swap
    compiled; the base model in the cycle); loading the LoRA from its file per request
    instead (the reference); a short video right after a switch and the same video again;
    and the graphs compiled after the warm-up round (0: no switch recompiled)."""
    import torch

    from cogpipe.generate import generate_one, load, lora_file
    from cogpipe.models.cogvideox import LORA_FILE
    from cogpipe.service import sha256_file
    from cogpipe.service_adapters import Lora, Resident, Slot

    pipe = load(options.model_copy(update={"model": str(model_dir), "compile": compile}))
    now = synced(args.device)
    adapters = Slot(pipe, RANK if not args.dry else 4) if compile else Resident(pipe)
    resident = []
    for name, path in loras.items():
        file = lora_file(str(path))
        resident.append(Lora(name, file, sha256_file(file)))
        adapters.add(resident[-1])
    short = options.model_copy(
        update={"steps": 2, "frames": SWITCH_FRAMES if not args.dry else options.frames}
    )
    times: dict[str, list[float]] = {"switch": [], "after": [], "again": [], "reload": []}
    graphs = 0
    for round_ in range(args.switch_rounds + 1):  # round 0 warms up (compiles) every variant
        graphs = graphs_compiled()
        for lora in [*resident, None]:
            t0 = now()
            adapters.activate(lora, 1.0)
            t1 = now()
            generate_one(pipe, PROMPT, short)
            t2 = now()
            generate_one(pipe, PROMPT, short)
            if round_:
                times["switch"].append(t1 - t0)
                times["after"].append(t2 - t1)
                times["again"].append(now() - t2)
    graphs = graphs_compiled() - graphs  # in the last round, after the warm-up
    for _ in range(args.switch_rounds):
        for name, path in loras.items():
            t0 = now()
            pipe.load_lora_weights(str(path), weight_name=LORA_FILE, adapter_name=name)
            pipe.delete_adapters([name])  # a per-request load unloads after the video
            times["reload"].append(now() - t0)
    del pipe, adapters
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {k: statistics.median(v) for k, v in times.items()} | {"graphs": graphs}


# --------------------------------------------------------------------------- service


def cogpipe_command() -> list[str]:
    """The `cogpipe` console script of this interpreter's environment (how a user runs it)."""
    script = shutil.which("cogpipe", path=str(Path(sys.executable).parent))
    return (
        [script]
        if script
        else [sys.executable, "-c", "import sys; from cogpipe.cli import main; sys.exit(main())"]
    )


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


def service_run(
    model_dir: Path, loras: dict, bodies: list[dict], work: Path, mode: str, args
) -> dict:
    """Start the service, post every request, wait for all: finish times from the start,
    and the mp4 of each request.

    Raises:
        RuntimeError: the service failed to start or a job failed.
    """
    import httpx

    port = free_port()
    command = [
        *cogpipe_command(),
        "serve-api",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--folder",
        str(work / "api"),
    ]
    command += [f"--lora={name}={path}" for name, path in loras.items()]
    command += ["--device", args.device] + (["--compile"] if mode == "compile" else [])
    work.mkdir(parents=True, exist_ok=True)
    headers = (
        {"Authorization": f"Bearer {os.environ['COGPIPE_API_KEY']}"}
        if os.environ.get("COGPIPE_API_KEY")
        else {}
    )
    log = open(work / "service.log", "w")  # noqa: SIM115 (closed in finally)
    started = time.time()  # the service's job times are time.time() too
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            wait_ready(c, process, args.start_timeout)
            ids = []
            for body in bodies:
                posted = c.post(
                    "/v1/videos",
                    json={k: v for k, v in body.items() if k != "prompt_text" and v is not None},
                )
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
        command = [
            *cogpipe_command(),
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            body["prompt_text"],
            "--output",
            str(out),
        ]
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
    return {
        "bench": "serve",
        "case": case,
        "metric": metric,
        "value": round(value, 4),
        "reference": round(reference, 4),
        "ratio": round(ratio, 3),
    }


def psnr(a: bytes, b: bytes) -> float:
    """PSNR in dB of two mp4s' frames (inf: equal)."""
    import numpy as np

    from cogpipe.sweep import read_video

    with tempfile.TemporaryDirectory() as tmp:
        frames = []
        for name, data in (("a.mp4", a), ("b.mp4", b)):
            (Path(tmp) / name).write_bytes(data)
            frames.append(read_video(Path(tmp) / name).astype(np.float64))
    mse = float(np.mean((frames[0] - frames[1]) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def agreement(served: list[bytes], cli: list[bytes]) -> dict:
    """How the service's videos compare with the CLI's: equal count, and the lowest PSNR."""
    equal = sum(a == b for a, b in zip(served, cli, strict=True))
    low = min(psnr(a, b) for a, b in zip(served, cli, strict=True))
    return {
        "outputs_equal": f"{equal}/{len(cli)}",
        "min_psnr_db": None if low == float("inf") else round(low, 2),
    }  # None: all equal


def switch_lines(case: str, switch: dict) -> list[dict]:
    """The switch against loading per request; a short video after a switch against again."""
    graphs = {"graphs_compiled_after_warmup": switch["graphs"]}
    return [
        line(
            f"{case} switch vs load per request",
            "lora_switch_s",
            switch["switch"],
            switch["reload"],
        )
        | graphs,
        line(
            f"{case} {SWITCH_FRAMES}-frame 2-step video after a switch vs again",
            "s_per_video_after_switch",
            switch["after"],
            switch["again"],
        )
        | graphs,
    ]


def stream_lines(case: str, done: list[float], cli_seconds: list[float]) -> list[dict]:
    """First video, median gap, and videos per hour with the service's start and without
    (its rate once warm: a service starts once and then runs for days)."""
    n, gaps = len(done), [b - a for a, b in zip(done, done[1:], strict=False)]
    p50, cli_p50 = statistics.median(gaps or done), statistics.median(cli_seconds)
    return [
        line(case, "first_video_s", done[0], cli_seconds[0]),
        line(case, "p50_s_per_video", p50, cli_p50),
        line(
            case,
            "videos_per_hour",
            3600 * n / done[-1],
            3600 * n / sum(cli_seconds),
            lower_is_better=False,
        ),
        line(case, "videos_per_hour_warm", 3600 / p50, 3600 / cli_p50, lower_is_better=False),
    ]


def model_lines(model: str, args):
    """Every line of one model, yielded as each is measured: per mode the switch, then the
    stream of each mode against the per-request CLI (run once, eager)."""
    from generate import video_size

    from cogpipe.generate import GenerateOptions

    options = GenerateOptions(steps=args.steps, device=args.device, **video_size(model, args.dry))
    size = f"{options.frames}x{options.height}x{options.width}"
    case = f"cogvideox-{model} {options.steps} steps {size} 3 loras r{4 if args.dry else RANK}"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        model_dir, loras = write_model(work, model, args.dry)
        for mode in args.modes:
            switch = switch_times(model_dir, loras, options, mode == "compile", args)
            yield from switch_lines(f"{case} {mode}", switch)
        bodies, streams = requests(args.videos, options), {}
        stream = f"{len(bodies)} videos service vs generate per request"
        for mode in args.modes:
            streams[mode] = service_run(model_dir, loras, bodies, work / mode, mode, args)
            if mode == args.modes[0]:
                cli = cli_run(model_dir, loras, bodies, work, args)
            for x in stream_lines(f"{case} {mode} {stream}", streams[mode]["done"], cli["seconds"]):
                yield x | agreement(streams[mode]["videos"], cli["videos"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--videos", type=int, default=8, help="requests in the stream")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--switch-rounds", type=int, default=3, help="after a warm-up round")
    parser.add_argument(
        "--modes",
        default="eager,compile",
        help="the service's modes: eager (resident adapters), compile (hot-swap)",
    )
    parser.add_argument("--start-timeout", type=float, default=900.0, help="service start, s")
    parser.add_argument("--workdir", help="where model folders go (default: the temp folder)")
    parser.add_argument("--dry", action="store_true", help="tiny 2B on the CPU, 4 videos")
    args = parser.parse_args()
    models, args.modes = args.models.split(","), args.modes.split(",")
    if unknown := [m for m in models if m not in ("2b", "5b")]:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: 2b, 5b")
    if unknown := [m for m in args.modes if m not in ("eager", "compile")]:
        parser.error(f"--modes: unknown {', '.join(unknown)}; known: eager, compile")
    if args.dry:  # compiling needs a GPU
        models, args.videos, args.steps, args.modes = ["2b"], min(args.videos, 4), 2, ["eager"]
    args.device = "cpu" if args.dry else "cuda"

    bench = Bench("serve", device_name(args.dry), commit())
    for model in models:
        bench.print_lines(model_lines(model, args))


if __name__ == "__main__":
    main()
