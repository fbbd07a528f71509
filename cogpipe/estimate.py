"""What a run will cost before it starts, and how far off the last estimate was.

Per stage: the work (files, clips, samples, steps, videos), the predicted wall time on N
GPUs, the GPU-hours and the disk its output needs. Time is modelled as fixed setup
seconds (imports, model loading, the merge) plus seconds per item, so a 6-clip demo and
a 3,000-clip run are both predicted from one measurement. The throughput comes from,
in this order:

1. a finished run of the same stage, on the same device, with the same cost-relevant
   settings (`shape`: model, frames, resolution, rank, batch...), recorded in a done
   marker of this workspace or of the workspaces given as `stats_from`;
2. the committed `bench/results/*.jsonl` of the same model and GPU;
3. nothing: the stage says "no measurement".

Every stage that `pipeline.run_stage` runs is timed (`StageClock`): its done marker gets
a `timing` block (device, wall and CPU seconds, items processed, setup vs per-item seconds,
the bytes it wrote, and what was predicted for it), which is what 1. reads. Times are
device seconds: wall time on a GPU; on a CPU, CPU time over the torch threads, since a
shared CPU stretches wall time by whatever else runs there. `cogpipe run` writes its
predictions to `<workspace>/.estimates/<stage>-<key>.json` as it starts, so each
finished stage records predicted against actual.

    est = estimate(cfg, gpus=8, gpu="h200")
    print(est.text())
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogpipe.config import STAGES, PipelineConfig
from cogpipe.stages import UPSTREAM, finished, stage_keys
from cogpipe.workspace import (
    SUCCESS,
    Progress,
    StageResult,
    Workspace,
    model_fingerprint,
    read_table,
    sha256_json,
    write_json,
)

log = logging.getLogger(__name__)

GPU_STAGES = ("caption", "recaption", "precompute", "train", "evaluate")
UNITS = {
    "ingest": "files",
    "check": "videos",
    "caption": "clips",
    "recaption": "clips",
    "filter": "captions",
    "precompute": "samples",
    "train": "steps",
    "evaluate": "videos",
}
ESTIMATES = ".estimates"  # <workspace>/.estimates/<stage>-<key>.json: what `run` predicted
STATS_FROM = "stats-from.json"  # <workspace>/.estimates/: other workspaces measured in
BENCH_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


# --------------------------------------------------------------------------- devices


def gpu_id(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100': the device part of a bench file's name."""
    m = re.search(r"\b([abhl]\d{2,3})", name.lower())
    return f"nvidia-{m[1]}" if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def this_device() -> str:
    """This process's device: its first GPU, or the CPU with its torch thread count (a
    CPU's speed depends on how many threads the stage uses)."""
    import torch

    if torch.cuda.is_available():
        return gpu_id(torch.cuda.get_device_name(0))
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def local_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


# --------------------------------------------------------------------------- cost shapes


def shape(cfg: PipelineConfig, stage: str) -> str:
    """A hash of the settings a stage's per-item cost depends on: a measurement is reused
    only for the same shape (a new caption prompt keeps it, 81 frames instead of 49 not)."""
    m = lambda name, revision=None: model_fingerprint(str(name), revision)  # noqa: E731
    c, p, t, e = cfg.caption, cfg.precompute, cfg.train, cfg.evaluate
    fields: dict[str, Any] = {
        "caption": {
            "model": m(c.model, c.revision),
            "frames": c.num_frames,
            "tokens": c.max_new_tokens,
            "batch": c.batch_size,
        },
        "recaption": {"model": m(c.model, c.revision), "tokens": c.max_new_tokens},
        "precompute": {"model": m(cfg.model), "size": [p.frames, p.height, p.width]},
        "train": {
            "model": m(cfg.model),
            "mode": t.mode,
            "rank": t.rank,
            "batch": [t.batch_size, t.gradient_accumulation_steps],
            "size": [p.frames, p.height, p.width],
            "ckpt": t.gradient_checkpointing,
            "precision": t.mixed_precision,
            "compile": t.compile,
        },
        "evaluate": {
            "model": m(cfg.model),
            "steps": e.steps,
            "size": [e.frames, e.height, e.width],
            "clip": m(e.clip_model),
        },
    }.get(stage, {})
    return sha256_json({"stage": stage, **fields})[:12]


def lanes(cfg: PipelineConfig, stage: str, gpus: int) -> int:
    """How many GPUs a stage keeps busy at once: caption and recaption shards, precompute
    parts, training processes (which split each step's micro-batches); evaluate uses one."""
    if stage in ("caption", "recaption"):
        return max(1, min(gpus, cfg.caption.shards))
    if stage == "precompute":
        return max(1, min(gpus, cfg.precompute.workers or 1))
    if stage == "train":
        accum = cfg.train.gradient_accumulation_steps
        return cfg.train.num_processes or max(d for d in range(1, gpus + 1) if accum % d == 0)
    return 1


def processed(stage: str, record: dict) -> int:
    """Items a finished stage actually worked on (not those it reused or resumed past)."""
    counts, stats = record.get("counts", {}), record.get("stats", {})
    if stage == "ingest":
        return int(counts.get("probed", counts.get("files", 0)))
    if stage == "caption":
        parts = counts.get("parts", 0)
        done = 1 - counts.get("parts_reused", 0) / parts if parts else 1
        return round(counts.get("model", counts.get("clips", 0)) * done)
    if stage == "precompute":
        return int(counts.get("encoded_videos", counts.get("samples", 0)))
    if stage == "train":
        return int(counts.get("steps", 0)) - int(stats.get("resumed_from_step") or 0)
    key = {
        "check": "videos",
        "recaption": "recaptioned",
        "filter": "captions",
        "evaluate": "videos",
    }[stage]
    return int(counts.get(key, 0))


# --------------------------------------------------------------------------- timing a run


class StageClock:
    """Times one stage run for its done marker (`Workspace.finish` calls it).

    Setup and per-item seconds are told apart from the progress calls: the slope between
    the first and the last committed unit is the per-item time, the rest (before the first
    unit: imports, model loading; after the last: the merge) is setup. Both are device
    seconds (`device_seconds`): wall time on a GPU, CPU time on a CPU.
    """

    def __init__(self, cfg: PipelineConfig, stage: str, progress: Progress):
        import torch

        self.cfg, self.stage, self.inner = cfg, stage, progress
        self.on_cpu, self.threads = not torch.cuda.is_available(), torch.get_num_threads()
        self.wall0, self.cpu0, self.t0 = time.time(), _cpu_seconds(), self.device_seconds()
        self.first: tuple[float, int] | None = None  # (device seconds since start, done)
        self.unit: tuple[float, int] | None = None  # the first report after a unit
        self.last: tuple[float, int] | None = None  # when the last `done` value was reached

    def device_seconds(self) -> float:
        """Wall seconds on a GPU (its worker holds it alone); on a CPU, the CPU seconds of
        this process and its finished children over the torch threads: what the stage
        would take with the CPU to itself. A shared CPU stretches wall time by whatever
        else runs, which no measurement of the stage can predict."""
        return _cpu_seconds() / self.threads if self.on_cpu else time.time()

    def progress(self, done: int, total: int, note: str = "") -> None:
        now = self.device_seconds() - self.t0
        if self.first is None:
            self.first = (now, done)
        elif self.unit is None and done != self.first[1]:
            self.unit = (now, done)
        if self.last is None or done != self.last[1]:
            self.last = (now, done)
        self.inner(done, total, note)

    def __call__(self, result: StageResult) -> dict[str, Any] | None:
        """The `timing` block of `result`'s done marker; None for another stage's finish."""
        if result.stage != self.stage:
            return None
        try:
            return self._timing(result)
        except Exception as e:  # timing must never fail the stage it describes
            log.warning("%s: no timing recorded (%s)", self.stage, e)
            return None

    def _timing(self, result: StageResult) -> dict[str, Any]:
        took = self.device_seconds() - self.t0
        items = processed(self.stage, result.to_dict())
        per_item = self._slope() if items > 1 else None
        if per_item is None or per_item * items > took:  # one unit, or overlapped units
            per_item = took / items if items else 0.0
        n = result.stats.get("processes") or lanes(self.cfg, self.stage, local_gpus())
        timing = {
            "device": this_device(),
            "shape": shape(self.cfg, self.stage),
            "lanes": n,
            "device_s": round(took, 3),
            "wall_s": round(time.time() - self.wall0, 3),
            "cpu_s": round(_cpu_seconds() - self.cpu0, 3),
            "items": items,
            "per_item_s": round(per_item, 6),
            "setup_s": round(max(took - per_item * items, 0.0), 3),
            "bytes": folder_bytes(Path(result.path)),
        }
        return timing | self._predicted(result)

    def _slope(self) -> float | None:
        if self.unit is None or self.last is None or self.last[1] <= self.unit[1]:
            return None
        return (self.last[0] - self.unit[0]) / (self.last[1] - self.unit[1])

    def _predicted(self, result: StageResult) -> dict[str, Any]:
        """What the run's estimate (`save_predictions`) said of this stage and key; None
        for a stage run on its own (`cogpipe caption CONFIG`), which nothing planned."""
        saved = Path(self.cfg.workspace) / ESTIMATES / f"{result.stage}-{result.key}.json"
        try:
            row = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError):
            return {"predicted_s": None}
        return {"predicted_s": row.get("seconds"), "predicted_from": row.get("source")}


def _cpu_seconds() -> float:
    t = os.times()  # children: those this process has waited for (stage worker pools)
    return t.user + t.system + t.children_user + t.children_system


def folder_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


# --------------------------------------------------------------------------- measurements


@dataclass
class Rate:
    """Seconds for one stage: setup + per item (one GPU), bytes per item, and where from."""

    setup_s: float
    per_item_s: float
    bytes_per_item: float | None
    source: str
    record: dict = field(default_factory=dict)  # the measured run's done marker, if any


def timed_records(roots: list[Path]) -> list[dict]:
    """Every done marker with a `timing` block under these workspaces: by workspace in the
    order given, newest first within each."""
    found = []
    for root in roots:  # in order: this workspace's runs before another's
        mine = []
        for path in [*root.glob(f"*/*/{SUCCESS}"), *root.glob(f"evaluate/*/*/{SUCCESS}")]:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(record.get("timing"), dict):
                mine.append(record | {"_root": str(root)})
        found += sorted(mine, key=lambda r: r.get("finished_at", ""), reverse=True)
    return found


def measured(
    records: list[dict], stage: str, device: str, shape_: str, home: Path | None = None
) -> Rate | None:
    """The first run of `stage` on `device` with this cost shape that did work itself (not
    a merge of parts other runs committed), as a Rate."""
    for r in records:
        t = r["timing"]
        if r.get("stage") != stage or not t.get("items"):
            continue
        if t.get("device") == device and t.get("shape") == shape_:
            n = max(int(t.get("lanes") or 1), 1)
            items = t.get("items") or 0
            when = (r.get("finished_at") or "")[:16].replace("T", " ")
            where = "this workspace" if home and r["_root"] == str(home) else r["_root"]
            return Rate(
                setup_s=float(t["setup_s"]),
                per_item_s=float(t["per_item_s"]) * n,  # one lane's seconds per item
                bytes_per_item=t["bytes"] / items if items and t.get("bytes") is not None else None,
                source=f"measured: {where}, run of {when}",
                record=r,
            )
    return None


# --------------------------------------------------------------------------- bench results


BENCH_MODELS = {  # transformer config -> the bench name; (num_layers, heads, patch_t, in_ch)
    (30, 30, None, 16): "cogvideox-2b",
    (42, 48, None, 16): "cogvideox-5b",
    (42, 48, None, 32): "cogvideox-5b-i2v",
    (42, 48, 2, 16): "cogvideox-1.5-5b",
    (42, 48, 2, 32): "cogvideox-1.5-5b-i2v",
}
LORA_SHAPES = {"cogvideox-2b": (30, 1920), "cogvideox-5b": (42, 3072)}  # layers, hidden


def bench_model(model: str) -> str | None:
    """The bench name of a CogVideoX model: from a local folder's transformer config, or a
    hub id's name (THUDM/CogVideoX-5b -> cogvideox-5b); None for anything else."""
    path = Path(model).expanduser() / "transformer" / "config.json"
    if path.is_file():
        c = json.loads(path.read_text())
        k = (
            c.get("num_layers"),
            c.get("num_attention_heads"),
            c.get("patch_size_t"),
            c.get("in_channels"),
        )
        return BENCH_MODELS.get(k)
    name = model.rsplit("/", 1)[-1].lower()
    return name if name in BENCH_MODELS.values() else None


def bench_lines(kind: str, device: str) -> list[tuple[str, dict]]:
    """(file name, result) of `bench/results/<kind>-<device>-<date>.jsonl`, newest file first."""
    out = []
    files = sorted(BENCH_RESULTS.glob(f"{kind}-{device}-2*.jsonl"), reverse=True)
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                out.append((path.name, json.loads(line)))
    return out


def _pick(
    lines: list[tuple[str, dict]], prefix: str, metric: str, prefer: str = ""
) -> tuple[str, dict] | None:
    hits = [
        (f, r)
        for f, r in lines
        if r["case"].startswith(prefix) and r["metric"] == metric and r.get("value")
    ]
    best = [h for h in hits if prefer and h[1]["case"].endswith(prefer)]
    return (best or hits or [None])[0]


def bench_rate(cfg: PipelineConfig, stage: str, device: str) -> Rate | None:
    """A Rate from the committed bench results of this model on this GPU, scaled to the
    config's size (pixels x frames, sampler steps, new tokens); None when there is none."""
    fn = {
        "caption": _bench_caption,
        "precompute": _bench_precompute,
        "train": _bench_train,
        "evaluate": _bench_evaluate,
    }.get(stage)
    return fn(cfg, device) if fn else None


def _volume(frames: int, height: int, width: int, case: str) -> float:
    """The config's frames x pixels over the bench case's (`49x480x720`)."""
    m = re.search(r"(\d+)x(\d+)x(\d+)", case)
    return frames * height * width / math.prod(int(x) for x in m.groups()) if m else 1.0


def _bench_caption(cfg: PipelineConfig, device: str) -> Rate | None:
    name = Path(str(cfg.caption.model)).name.lower()
    size = next((s for s in ("34b", "7b") if s in name), None)
    if size is None:
        return None
    found = _pick(
        bench_lines("caption", device),
        f"llava-next-video-{size} 8f",
        "model_clips_per_hour",
        prefer=f"bs{cfg.caption.batch_size}",
    )
    if found is None:
        return None
    f, r = found
    scale = cfg.caption.max_new_tokens / r.get("new_tokens", cfg.caption.max_new_tokens)
    return Rate(0.0, 3600 / r["value"] * scale, 2000.0, f"bench/results/{f}: {r['case']}")


def _bench_precompute(cfg: PipelineConfig, device: str) -> Rate | None:
    tag, p = bench_model(cfg.model), cfg.precompute
    found = tag and _pick(bench_lines("precompute", device), f"{tag} vae+t5", "clips_per_s", "bs1")
    if not found:
        return None
    f, r = found
    latent = 16 * ((p.frames - 1) // 4 + 1) * (p.height // 8) * (p.width // 8) * 2  # bf16
    text = 226 * 4096 * 2  # T5 embedding, bf16
    per = _volume(p.frames, p.height, p.width, r["case"]) / r["value"]
    return Rate(0.0, per, float(latent + text), f"bench/results/{f}: {r['case']}")


def _bench_train(cfg: PipelineConfig, device: str) -> Rate | None:
    tag, t, p = bench_model(cfg.model), cfg.train, cfg.precompute
    prefer = f"{'compile' if t.compile else 'eager'}-{t.gradient_checkpointing}"
    if t.gradient_checkpointing == "full" and not t.compile:
        prefer = "naive-ckpt"
    found = tag and _pick(bench_lines("train_step", device), f"{tag} lora r", "s_per_step", prefer)
    if not found or t.mode == "full":
        return None
    f, r = found
    micro = t.batch_size * t.gradient_accumulation_steps
    per = r["value"] * micro * _volume(p.frames, p.height, p.width, r["case"])
    layers, hidden = LORA_SHAPES.get(tag.replace("-i2v", "").replace("-1.5", ""), (0, 0))
    lora = len(t.target_modules) * t.rank * 2 * hidden * layers * 4  # fp32 A and B
    n = max(t.max_steps // t.checkpoint_every, 1)  # checkpoints; the last `keep_states` of
    run = n * lora + min(t.keep_states, n) * 3 * lora  # them hold a state: weights + Adam's 2
    disk = run / t.max_steps if lora else None  # per step, as the measured runs' bytes are
    return Rate(r.get("warmup_s", 0.0), per, disk, f"bench/results/{f}: {r['case']}")


def _bench_evaluate(cfg: PipelineConfig, device: str) -> Rate | None:
    tag, e = bench_model(cfg.model), cfg.evaluate
    found = tag and _pick(
        bench_lines("generate", device), f"{tag} 50 steps", "s_per_video", "plain"
    )
    if not found:
        return None
    f, r = found
    per = r["value"] * e.steps / 50 * _volume(e.frames, e.height, e.width, r["case"])
    return Rate(0.0, per, None, f"bench/results/{f}: {r['case']}")


# --------------------------------------------------------------------------- work


@dataclass
class Counts:
    """The work counts known so far in a planned run: exact where the stage that decides
    them is done here, else carried forward with the measured runs' ratios."""

    cfg: PipelineConfig
    ws: Workspace
    keys: dict[str, str]
    done: dict[str, dict]  # stage -> its done marker, for the stages done for this config
    rates: dict[str, Rate | None]

    def table(self, stage: str, name: str):
        return read_table(self.ws.stage_dir(stage, self.keys[stage]) / name)

    def ratio(self, stage: str, out: str, of: str) -> float | None:
        """out / of in the counts of the run `stage`'s throughput was measured on."""
        rate = self.rates.get(stage)
        counts = rate.record.get("counts", {}) if rate else {}
        return counts[out] / counts[of] if counts.get(of) and out in counts else None

    def carried(
        self, upstream: int, stage: str, out: str, of: str, share: str, unmeasured: str
    ) -> tuple[int, str]:
        """`upstream` (the count `stage` reads) times `stage`'s measured out / of, and why:
        "the measured run's share of `share`"; `upstream` and `unmeasured` without a run."""
        r = self.ratio(stage, out, of)
        if r is None:
            return upstream, unmeasured
        return round(upstream * r), f"the measured run's share of {share}"


def _files(c: Counts) -> tuple[int, str]:
    from cogpipe.sources import list_source

    return len(list_source(c.cfg)), ""


def _videos(c: Counts) -> tuple[int, str]:
    if "ingest" in c.done:
        return int((c.table("ingest", "videos.parquet").status == "ok").sum()), ""
    files, _ = _files(c)
    return c.carried(files, "ingest", "ok", "files", "readable files", "every file readable")


def _clips(c: Counts) -> tuple[int, str]:
    if "check" in c.done:
        return int(c.table("check", "clips.parquet").keep.astype(bool).sum()), ""
    videos, _ = _videos(c)
    return c.carried(videos, "check", "kept", "videos", "kept clips", "one clip per video")


def _recaptioned(c: Counts) -> tuple[int, str]:
    clips, _ = _clips(c)
    r = c.ratio("recaption", "recaptioned", "clips")
    if r is None:
        return 0, "unknown: only rejected captions are rewritten"
    return round(clips * r), "the measured run's share of rewritten captions"


def _samples(c: Counts) -> tuple[int, str]:
    if "filter" in c.done and "check" in c.done:
        curated, clips = c.table("filter", "curated.parquet"), c.table("check", "clips.parquet")
        picked = clips[clips.keep.astype(bool) & clips.split.isin(c.cfg.precompute.splits)]
        chosen = curated.clip_id[curated.selected.astype(bool)]
        return int(picked.clip_id.isin(chosen).sum()), ""
    clips, _ = _clips(c)
    sel = c.ratio("filter", "selected", "captions")
    rate = c.rates.get("precompute")
    split = None
    if rate and rate.record.get("counts", {}).get("samples") is not None and c.rates.get("filter"):
        selected = c.rates["filter"].record.get("counts", {}).get("selected")
        split = rate.record["counts"]["samples"] / selected if selected else None
    if sel is None:
        return clips, "every clip selected"
    return round(clips * sel * (split or 1)), "the measured run's share of selected clips"


def _steps(c: Counts) -> tuple[int, str]:
    return c.cfg.train.max_steps, ""


def _generated(c: Counts) -> tuple[int, str]:
    t, e = c.cfg.train, c.cfg.evaluate
    checkpoints = t.max_steps // t.checkpoint_every + (t.max_steps % t.checkpoint_every > 0)
    prompts = e.heldout_clips if e.prompts == "heldout" else len(e.prompts)
    return (1 + checkpoints) * prompts * len(e.seeds), ""


WORK = {
    "ingest": _files,
    "check": _videos,
    "caption": _clips,
    "recaption": _recaptioned,
    "filter": _clips,
    "precompute": _samples,
    "train": _steps,
    "evaluate": _generated,
}


# --------------------------------------------------------------------------- the estimate


@dataclass
class Row:
    """One stage of an estimate. `seconds`: wall time on the estimate's GPUs (device
    seconds, see `StageClock.device_seconds`)."""

    stage: str
    key: str
    work: int | None
    unit: str
    work_note: str = ""
    reused: bool = False
    lanes: int = 1
    seconds: float | None = None
    gpu_hours: float | None = None
    disk_bytes: float | None = None
    source: str = ""
    last: str = ""  # how far off the measured run's own prediction was


@dataclass
class Estimate:
    device: str
    gpus: int
    rows: list[Row]

    def total(self, attr: str) -> float:
        return sum(getattr(r, attr) or 0.0 for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "seconds": self.total("seconds"),
            "gpu_hours": self.total("gpu_hours"),
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Column names and one row of text per stage, and the total."""
        cols = [
            "stage",
            "work",
            f"wall ({self.gpus} GPU{'s' * (self.gpus > 1)})",
            "GPU-h",
            "disk",
            "from",
        ]
        rows = [
            [
                r.stage,
                _work(r),
                _duration(r.seconds),
                _hours(r),
                _size(r.disk_bytes),
                r.source + (f"; {r.last}" if r.last else ""),
            ]
            for r in self.rows
        ]
        known = ">= " if any(r.seconds is None for r in self.rows) else ""  # a lower bound
        total = [
            "total",
            "",
            known + _duration(self.total("seconds")),
            f"{known}{self.total('gpu_hours'):.2f}",
            known + _size(self.total("disk_bytes")),
            "",
        ]
        return cols, [*rows, total]

    def text(self) -> str:
        cols, rows = self.table()
        widths = [max(len(x) for x in col) for col in zip(cols, *rows, strict=True)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        head = f"estimate on {self.gpus} x {self.device} (time = setup + items x seconds per item)"
        return "\n".join([head, line(cols), *[line(r) for r in rows]])

    def markdown(self) -> str:
        cols, rows = self.table()
        out = [
            f"# Estimate: {self.gpus} x {self.device}",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + " --- |" * len(cols),
        ]
        out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        return "\n".join(out)


def _work(r: Row) -> str:
    if r.work is None:
        return r.work_note or "unknown"
    text = f"{r.work} {r.unit}"
    return f"~{text} ({r.work_note})" if r.work_note else text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _hours(r: Row) -> str:
    return (
        "?"
        if r.gpu_hours is None and r.stage in GPU_STAGES and not r.reused
        else f"{r.gpu_hours or 0:.2f}"
    )


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def resolve_device(gpu: str | None, records: list[dict]) -> str:
    """The device to estimate for: `--gpu h100|h200`; else this machine's GPU; else, on a
    machine without one (a CPU worker planning for GPU workers), the device of the newest
    run recorded; else this CPU."""
    if gpu:
        return gpu if gpu.startswith("nvidia-") else f"nvidia-{gpu.lower()}"
    here = this_device()
    if here.startswith("cpu-") and records:
        return records[0]["timing"]["device"]
    return here


def estimate(
    cfg: PipelineConfig,
    gpus: int | None = None,
    gpu: str | None = None,
    stats_from: list[Path] | None = None,
    stages: list[str] | None = None,
) -> Estimate:
    """Predict every stage of `cfg` (or `stages`) on `gpus` GPUs of kind `gpu`.

    Args:
        cfg: the pipeline config; its workspace says what is done (reused: 0 s).
        gpus: GPUs to spread over (default: this machine's, at least 1).
        gpu: 'h100', 'h200' (default: `resolve_device`).
        stats_from: more workspaces whose recorded runs count as measurements, after
            this one's (e.g. a pilot run's workspace).
        stages: only these stages (default: all).
    """
    ws = Workspace(cfg.workspace)
    keys = stage_keys(cfg)
    others = [Path(p).resolve() for p in [*(stats_from or []), *remembered_stats_from(ws)]]
    records = timed_records([ws.root, *dict.fromkeys(others)])
    device = resolve_device(gpu, records)
    gpus = gpus or local_gpus()
    done = {}
    for stage in STAGES:
        res = finished(ws, cfg, stage, keys[stage], {u: keys[u] for u in UPSTREAM[stage]})
        if res is not None:
            done[stage] = ws.read_success(Path(res.path)) or {}
    rates = {
        s: measured(records, s, device, shape(cfg, s), ws.root) or bench_rate(cfg, s, device)
        for s in STAGES
    }
    counts = Counts(cfg, ws, keys, done, rates)
    rows = [_row(counts, s, gpus) for s in (stages or STAGES)]
    return Estimate(device, gpus, rows)


def _row(c: Counts, stage: str, gpus: int) -> Row:
    row = Row(stage, c.keys[stage], None, UNITS[stage])
    if stage in c.done:
        row.work, row.reused = processed(stage, c.done[stage]), True
        row.seconds, row.gpu_hours, row.source = 0.0, 0.0, "reused: done in this workspace"
        return row
    try:
        row.work, row.work_note = WORK[stage](c)
    except (OSError, ValueError, KeyError) as e:  # no source yet, an unreadable table
        row.work_note = f"unknown: {e}"
    rate = c.rates[stage]
    if row.work == 0:
        row.seconds, row.gpu_hours, row.disk_bytes = 0.0, 0.0, 0.0
        row.source = "nothing to do" + (f"; {rate.source}" if rate else "")
        return row
    if rate is None:
        row.source = "no measurement: unknown"
        return row
    row.source, row.lanes = rate.source, lanes(c.cfg, stage, gpus)
    if row.work is not None:
        row.seconds = rate.setup_s + row.work * rate.per_item_s / row.lanes
        row.gpu_hours = row.seconds * row.lanes / 3600 if stage in GPU_STAGES else 0.0
        row.disk_bytes = rate.bytes_per_item * row.work if rate.bytes_per_item is not None else None
    row.last = _last(rate.record.get("timing", {}))
    return row


def _last(timing: dict) -> str:
    """'last run: predicted 3.1 s, took 2.9 s (+7%)' for a measured run that was predicted."""
    predicted, actual = timing.get("predicted_s"), timing.get("device_s")
    if not predicted or not actual:
        return ""
    off = (predicted - actual) / actual * 100
    return f"last run: predicted {_duration(predicted)}, took {_duration(actual)} ({off:+.0f}%)"


def remembered_stats_from(ws: Workspace) -> list[Path]:
    """The workspaces `cogpipe plan --stats-from` named for this one (read by every later
    plan and run of it)."""
    path = ws.root / ESTIMATES / STATS_FROM
    return [Path(p) for p in json.loads(path.read_text())] if path.is_file() else []


def remember_stats_from(cfg: PipelineConfig, paths: list[Path]) -> None:
    """Record `paths` as this workspace's other sources of measurements, so the `cogpipe
    run` that follows a `cogpipe plan --stats-from` predicts from the same runs."""
    ws = Workspace(cfg.workspace)
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--stats-from {p}: no such workspace folder")
    known = [str(p) for p in remembered_stats_from(ws)]
    merged = list(dict.fromkeys([*known, *(str(Path(p).resolve()) for p in paths)]))
    write_json(ws.root / ESTIMATES / STATS_FROM, merged)


def save_predictions(cfg: PipelineConfig, est: Estimate) -> None:
    """Write each stage's prediction where its run's done marker will pick it up
    (`StageClock`): `<workspace>/.estimates/<stage>-<key>.json`."""
    folder = Path(cfg.workspace) / ESTIMATES
    for row in est.rows:
        if not row.reused:
            write_json(folder / f"{row.stage}-{row.key}.json", asdict(row) | {"device": est.device})
