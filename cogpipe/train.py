"""Train: a LoRA on the CogVideoX transformer from precomputed latents, resumable to the step.

One linear loop, the objective of the diffusers CogVideoX LoRA example: v-prediction
through `CogVideoXDPMScheduler`, the prediction turned back into clean latents with
`get_velocity`, and the squared error weighted by 1 / (1 - alphas_cumprod[t]).

What makes a resumed run identical to an uninterrupted one:
- batch composition is a pure function of the index and the config: samples of one
  bucket per batch, epoch e ordered by a generator seeded with (seed, e);
- every random draw of step s (timesteps, noise) comes from a generator seeded with
  (seed, s), so no RNG stream needs saving;
- a checkpoint holds the LoRA weights (fp32), the optimizer, the LR schedule and the
  grad scaler; resuming loads them and continues at step + 1.

The run folder is `train/<name>/` (the config's `name`, defaulting to the key):

    run.json                       key and the resolved config
    losses.jsonl                   one line per step: step, loss, lr, grad_norm, seconds
    logs/                          TensorBoard scalars
    checkpoint-{step:06d}/         pytorch_lora_weights.safetensors (rank and alpha in its
                                   metadata), state.json, training_state.pt (last K only)
    _SUCCESS.json

    cogpipe train configs/demo.yaml
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from cogpipe.config import PipelineConfig, TrainConfig
from cogpipe.workspace import (
    SUCCESS,
    Progress,
    StageResult,
    Workspace,
    atomic_path,
    clean_stale_tmp,
    model_fingerprint,
    no_progress,
    read_table,
    resolve_device,
    sha256_json,
    stage_key,
    write_json,
)

VERSION = 1
STATE_FILE = "training_state.pt"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


class RunFolderTaken(RuntimeError):
    """The run folder belongs to a training run with another key."""


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    config = cfg.train.key_fields() | {"seed": cfg.seed, "model_fp": model_fingerprint(cfg.model)}
    return stage_key("train", VERSION, config, inputs)


def output_dir(ws: Workspace, cfg: PipelineConfig, key: str, inputs: dict | None = None) -> Path:
    """`train/<name>/`, or `train/<key>/` when the config has no name (`inputs` unused)."""
    return ws.root / "train" / (cfg.name or key)


def claim(out: Path, key: str) -> None:
    """Refuse a run folder whose done marker or run.json records another key.

    Raises:
        RunFolderTaken: naming the folder, both keys and the way out.
    """
    for name in (SUCCESS, "run.json"):
        try:
            recorded = json.loads((out / name).read_text()).get("key")
        except (OSError, json.JSONDecodeError):
            continue
        if recorded != key:
            raise RunFolderTaken(
                f"{out} holds training run {recorded} ({name}), but this config's train key is "
                f"{key}; pick another `name` in the config or delete the folder"
            )


def generator(*parts: Any):
    """A CPU torch.Generator seeded by a hash of `parts`, e.g. ("step", seed, step)."""
    import torch

    return torch.Generator().manual_seed(int(sha256_json(parts)[:15], 16))


def epoch_batches(buckets: list[tuple], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sample positions for one epoch; every batch holds one bucket.

    Samples are shuffled, grouped by bucket in that order, cut into batches (a bucket's
    last batch may be smaller), and the batches shuffled again.
    """
    import torch

    g = generator("epoch", seed, epoch)
    by_bucket: dict[tuple, list[int]] = {}
    for i in torch.randperm(len(buckets), generator=g).tolist():
        by_bucket.setdefault(buckets[i], []).append(i)
    batches = [
        rows[j : j + batch_size]
        for rows in by_bucket.values()
        for j in range(0, len(rows), batch_size)
    ]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def micro_batch(buckets: list[tuple], batch_size: int, seed: int, m: int) -> list[int]:
    """Sample positions of the m-th micro-batch of the run (0-based), across epochs."""
    per_epoch = len(epoch_batches(buckets, batch_size, seed, 0))  # the same for every epoch
    return epoch_batches(buckets, batch_size, seed, m // per_epoch)[m % per_epoch]


def load_samples(precompute_dir: Path) -> pd.DataFrame:
    """The usable samples of a precompute output (status ok), in index order.

    Raises:
        ValueError: no sample is usable.
    """
    index = read_table(precompute_dir / "index.parquet")
    samples = index[index.status == "ok"].reset_index(drop=True)
    if samples.empty:
        raise ValueError(
            f"{precompute_dir}/index.parquet has no usable samples ({len(index)} rows)"
        )
    return samples


def load_batch(precompute_dir: Path, samples: pd.DataFrame, rows: list[int]):
    """(latents [B, F', C, h, w], prompt_embeds [B, L, D]) of the given sample positions."""
    import torch
    from safetensors import safe_open

    latents, embeds = [], []
    for r in samples.iloc[rows].itertuples():
        with safe_open(str(precompute_dir / r.shard), "pt") as f:
            latents.append(f.get_tensor(r.latents_key))
            embeds.append(f.get_tensor(r.embeds_key))
    return torch.stack(latents), torch.stack(embeds)


def diffusion_loss(transformer, scheduler, latents, prompt_embeds, rotary, g):
    """The CogVideoX LoRA example's objective for one micro-batch.

    Args:
        latents: clean scaled latents [B, F', C, h, w] in the weights' dtype.
        prompt_embeds: [B, L, D] in the weights' dtype.
        rotary: (cos, sin) for 5B-type models, else None.
        g: the CPU generator of this step; timesteps and noise are drawn from it.

    Returns:
        mean over the batch of the 1 / (1 - alphas_cumprod[t])-weighted squared error
        between the predicted and the clean latents (a 0-d fp32 tensor).
    """
    import torch

    b, device = latents.shape[0], latents.device
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=timesteps,
                    image_rotary_emb=rotary, return_dict=False)[0]  # fmt: skip
    pred = scheduler.get_velocity(v, noisy, timesteps)  # v-prediction -> clean latents
    alphas_cumprod = scheduler.alphas_cumprod.to(device)[timesteps]  # [B]
    weights = (1 / (1 - alphas_cumprod)).view(b, 1, 1, 1, 1)
    return (weights * (pred.float() - latents.float()) ** 2).reshape(b, -1).mean(1).mean()


def make_optimizer(params: list, t: TrainConfig, cuda: bool):
    """Adam or AdamW (fused on GPU: one kernel, and no host sync under fp16 grad scaling),
    or bitsandbytes' 8-bit AdamW (GPU only).

    Raises:
        ValueError: adamw8bit without a GPU or without bitsandbytes installed.
    """
    import torch

    kwargs = dict(lr=t.learning_rate, betas=t.betas, weight_decay=t.weight_decay, eps=t.epsilon)
    if t.optimizer == "adamw8bit":
        if not cuda:
            raise ValueError("train.optimizer adamw8bit needs a CUDA GPU; use adamw on the CPU")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError(
                "train.optimizer adamw8bit needs bitsandbytes: pip install 'cogpipe[gpu]'"
            ) from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    adam = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return adam(params, fused=cuda or None, **kwargs)


class Queued(NamedTuple):
    """A step whose loss and gradient norm are still device tensors."""

    step: int
    loss: Any
    grad_norm: Any
    lr: float
    rows: list[list[int]]  # sample positions of its micro-batches


@dataclass
class Trainer:
    """The model, optimizer and schedules of a run, and its optimizer step.

    `step` queues the GPU work and returns the loss and gradient norm as device tensors
    without reading them, so Python runs ahead of the GPU; the caller reads them later.
    """

    accelerator: Any
    transformer: Any
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    params: list
    config: TrainConfig
    seed: int
    dtype: Any
    rotary: dict = field(default_factory=dict)  # (height, width, latent frames) -> (cos, sin)

    @property
    def device(self):
        return self.accelerator.device

    def _to_device(self, x):
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, self.dtype, non_blocking=True)
        return x.to(self.device, self.dtype)

    def step(self, step: int, micro_batches: list[tuple]):
        """One optimizer step over `(latents, prompt_embeds, bucket)` micro-batches on the CPU.

        Returns:
            (mean loss, gradient norm before clipping, learning rate used): two 0-d device
            tensors and a float.
        """
        import torch

        from cogpipe.models import cogvideox, speed

        t, tconfig = self.config, self.accelerator.unwrap_model(self.transformer).config
        g = generator("step", self.seed, step)  # every random draw of this step
        total = torch.zeros((), device=self.device)
        for latents, prompt_embeds, bucket in micro_batches:
            if bucket not in self.rotary:
                self.rotary[bucket] = cogvideox.rotary_embeddings(tconfig, *bucket, self.device)
            # Backward runs under the same kernel choice: a checkpointed block recomputes
            # its forward there and must get the same attention outputs.
            with speed.attention_kernel(t.attention_backend):
                loss = diffusion_loss(self.transformer, self.noise_scheduler,
                                      self._to_device(latents), self._to_device(prompt_embeds),
                                      self.rotary[bucket], g)  # fmt: skip
                self.accelerator.backward(loss / len(micro_batches))
            total += loss.detach() / len(micro_batches)
        grad_norm = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()  # the grad scaler skips it after an fp16 overflow
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm, lr


def build_trainer(transformer, noise_scheduler, t: TrainConfig, seed: int, device) -> Trainer:
    """Give a loaded transformer its LoRA, recomputation, compiled blocks and optimizer.

    Args:
        transformer: a CogVideoX transformer on `device` with frozen weights in the
            weight dtype (see cogvideox.load_transformer).
        noise_scheduler: the training noise schedule (CogVideoXDPMScheduler).
        t: the train section.
        seed: seeds the LoRA's initial A matrices (and, in `step`, each step's draws).
        device: "cpu" or "cuda".
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    from cogpipe.models import cogvideox, speed

    dtype = next(transformer.parameters()).dtype
    # Accelerate's state is a process-wide singleton that refuses a second precision; a
    # worker process runs many trainings, so each one starts from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    mixed = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=str(device) == "cpu")
    cuda = accelerator.device.type == "cuda"
    params = cogvideox.add_lora(transformer, t.rank, t.alpha, t.target_modules, seed=seed)
    speed.set_checkpointing(transformer, t.gradient_checkpointing, t.checkpointed_blocks)
    if t.compile and cuda:
        speed.compile_blocks(transformer)
    optimizer = make_optimizer(params, t, cuda)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps, num_cycles=t.lr_num_cycles)  # fmt: skip
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    transformer.train()
    return Trainer(accelerator, transformer, noise_scheduler, optimizer, lr_scheduler, params, t,
                   seed, dtype)  # fmt: skip


def checkpoints(out: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit())


def save_checkpoint(
    folder: Path, accelerator, transformer, optimizer, lr_scheduler, cfg, state: dict
) -> None:
    """Commit `checkpoint-{step:06d}/`: LoRA weights, training state, state.json."""
    import torch

    from cogpipe.models import cogvideox

    t = cfg.train
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    training_state = {"step": state["step"], "micro_batch": state["micro_batch"],
                      "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                      "scaler": scaler, "rng": rng}  # fmt: skip
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        lora = accelerator.unwrap_model(transformer)
        cogvideox.save_lora(tmp, lora, t.rank, t.alpha)
        torch.save(training_state, tmp / STATE_FILE)
        write_json(tmp / "state.json", state)


def _truncate_losses(path: Path, step: int) -> None:
    """Drop loss lines past `step` (written by the run that crashed after that checkpoint)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def run_train(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Train the LoRA to `max_steps`, resuming from the run folder's latest training state.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `model`, `seed`, `name` and `train`).
        upstream: {"precompute": StageResult}.
        progress: called after every step as (step, max_steps, "loss 0.1234").

    Returns:
        The stage result; counts hold steps, checkpoints and samples, stats the final
        loss, seconds per step and peak GPU memory.

    Raises:
        RunFolderTaken: the run folder belongs to another key.
        TrainingDiverged: a non-finite loss or gradient norm; checkpoints stay intact.
    """
    started = time.time()
    t = cfg.train
    pre = Path(upstream["precompute"].path)
    key = key_of(cfg, {"precompute": upstream["precompute"].key})
    out = output_dir(ws, cfg, key)
    claim(out, key)
    if ws.done(out):
        return ws.result("train", out)  # before the heavy imports: a reused run takes ms
    clean_stale_tmp(out)

    import torch
    from torch.utils.tensorboard import SummaryWriter

    from cogpipe import validation as validate
    from cogpipe.models import cogvideox

    run = {
        "key": key,
        "inputs": {"precompute": upstream["precompute"].key},
        "config": cfg.model_dump(mode="json"),
    }
    write_json(out / "run.json", run)

    # Model: frozen base in weight_dtype, LoRA in fp32, autocast and grad scaling by accelerate.
    device = resolve_device(t.device)
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"train.device {device!r}: use auto, cpu or cuda (a visible GPU; "
                         f"choose which with CUDA_VISIBLE_DEVICES)")  # fmt: skip
    dtype = cogvideox.weight_dtype(
        t.mixed_precision, cogvideox.transformer_config(cfg.model), device
    )
    validation = validate.prepare(cfg, device, dtype) if t.validation_every else None
    trainer = build_trainer(cogvideox.load_transformer(cfg.model, device, dtype),
                            cogvideox.load_scheduler(cfg.model), t, cfg.seed, device)  # fmt: skip
    accelerator, cuda = trainer.accelerator, trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # Data: the usable samples, each with its bucket (height and width in pixels, latent frames).
    samples = load_samples(pre)
    buckets = list(zip(samples.height, samples.width, samples.latent_frames, strict=True))
    accum = t.gradient_accumulation_steps

    # Resume from the newest checkpoint that still has its training state.
    start, micro, losses = 0, 0, []
    resumable = [c for c in checkpoints(out) if (c / STATE_FILE).is_file()]
    if resumable:
        cogvideox.load_lora(accelerator.unwrap_model(trainer.transformer), resumable[-1])
        saved = torch.load(resumable[-1] / STATE_FILE, map_location="cpu", weights_only=True)
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if accelerator.scaler is not None and saved["scaler"] is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        rng = saved.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if cuda and "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        start = saved["step"]
        micro = saved.get("micro_batch", start * accum)  # data position
        losses = json.loads((resumable[-1] / "state.json").read_text())["losses"]
    _truncate_losses(out / "losses.jsonl", start)

    writer = SummaryWriter(str(out / "logs"), purge_step=start + 1)
    log = open(out / "losses.jsonl", "a")
    step_seconds: list[float] = []
    last_read = time.perf_counter()

    def read(q: Queued) -> None:
        """Read a queued step's numbers (waits for its GPU work) and log them.

        Raises:
            TrainingDiverged: a non-finite loss, or gradient norm without a grad scaler.
        """
        nonlocal last_read
        loss, grad_norm = q.loss.item(), q.grad_norm.item()
        last = checkpoints(out)[-1].name if checkpoints(out) else "none yet"
        if not math.isfinite(loss):
            clips = list(samples.clip_id.iloc[[i for rows in q.rows for i in rows]])
            raise TrainingDiverged(
                f"loss is {loss} at step {q.step} (clips {clips}); last checkpoint: {last}. "
                f"Lower train.learning_rate or look for non-finite values in the precompute shards"
            )
        if not math.isfinite(grad_norm) and accelerator.scaler is None:
            raise TrainingDiverged(
                f"gradient norm is {grad_norm} at step {q.step}; last checkpoint: {last}"
            )
        now = time.perf_counter()
        seconds, last_read = now - last_read, now  # the GPU's time for this step, once warm
        step_seconds.append(seconds)
        losses.append(loss)
        record = {"step": q.step, "loss": loss, "lr": q.lr, "grad_norm": grad_norm,
                  "seconds": round(seconds, 4)}  # fmt: skip
        log.write(json.dumps(record) + "\n")
        log.flush()
        for name in ("loss", "lr", "grad_norm", "seconds"):
            writer.add_scalar(f"train/{name}", record[name], q.step)
        if cuda:
            writer.add_scalar(
                "train/peak_memory_gb", torch.cuda.max_memory_allocated() / 2**30, q.step
            )

    queued: list[Queued] = []  # steps whose numbers are still on the GPU
    try:
        for step in range(start + 1, t.max_steps + 1):
            rows = [micro_batch(buckets, t.batch_size, cfg.seed, micro + m) for m in range(accum)]
            micro += accum
            # [B, F', C, h, w] and [B, L, D], all of one bucket
            batches = [(*load_batch(pre, samples, r), buckets[r[0]]) for r in rows]
            queued.append(Queued(step, *trainer.step(step, batches), rows))
            # A step's numbers are read once the next step is queued, so the GPU never waits
            # for Python; a checkpoint or a validation reads its own step first.
            for q in queued[:-1]:
                read(q)
                progress(q.step, t.max_steps, f"loss {losses[-1]:.4f}")
            queued = queued[-1:]
            checkpoint = step % t.checkpoint_every == 0 or step == t.max_steps
            validating = validation is not None and step % t.validation_every == 0
            if not (checkpoint or validating):
                continue
            read(queued.pop())
            if checkpoint:
                state = {"key": key, "step": step, "micro_batch": micro, "losses": losses}
                save_checkpoint(out / f"checkpoint-{step:06d}", accelerator, trainer.transformer,
                                trainer.optimizer, trainer.lr_scheduler, cfg, state)  # fmt: skip
                with_state = [c for c in checkpoints(out) if (c / STATE_FILE).is_file()]
                for old in with_state[: -t.keep_states]:
                    (old / STATE_FILE).unlink()  # its LoRA stays; only the full state goes
            if validating:
                report = validate.run(
                    validation, accelerator.unwrap_model(trainer.transformer), out, step
                )
                writer.add_scalar("validation/seconds", report["seconds"], step)
                last_read = time.perf_counter()  # the next step's time is its own
            progress(step, t.max_steps, f"loss {losses[-1]:.4f}")
    finally:
        log.close()
        writer.close()
        accelerator.free_memory()  # a worker process goes on to other runs

    stats = {
        "final_loss": losses[-1],
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "resumed_from_step": start,
        "seconds_per_step": sum(step_seconds) / len(step_seconds) if step_seconds else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainable_params": sum(p.numel() for p in trainer.params),
        "lora_scale": t.alpha / t.rank,
        "weight_dtype": str(dtype).removeprefix("torch."),
    }
    counts = {"steps": t.max_steps, "checkpoints": len(checkpoints(out)), "samples": len(samples)}
    if validation is not None:
        counts["validations"] = t.max_steps // t.validation_every
    return ws.finish(StageResult("train", key, str(out), counts, stats=stats), started)
