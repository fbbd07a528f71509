"""Train: a LoRA or the whole CogVideoX transformer from precomputed latents, resumable exactly.

One linear loop, the objective of the diffusers CogVideoX LoRA example: v-prediction
through `CogVideoXDPMScheduler`, the prediction turned back into clean latents with
`get_velocity`, and the squared error weighted by 1 / (1 - alphas_cumprod[t]).

Modes (`train.mode`), all on that objective:
- `lora`: a LoRA adapter (fp32) on the frozen transformer;
- `full`: every transformer weight, fp32 under fp16/bf16 autocast or pure bf16
  (`master_weights`). Memory per parameter: bf16 weights 2 bytes to run, fp32 master
  weights 4 + gradients 4 + AdamW states 8 (adamw8bit: 2); with
  `master_weights: bf16`, 2 + 2 + 4 (adamw8bit: 2). 5B with fp32 weights and AdamW needs
  ~90 GB before activations: use adamw8bit and `gradient_checkpointing: attention` or
  `full` on one GPU, or shard it over several;
- `ic-lora`: a LoRA conditioned on a reference video per sample (precompute's
  `reference`): the clean reference latents [B, F', C, h, w] go before the noised
  target along frames, [B, 2F', C, h, w], and the loss covers the target frames only;
- `tic-ft`: temporal in-context fine-tuning (arXiv 2506.00996) with a LoRA: each sample
  is one sequence of clean condition frames, buffer frames whose noise rises with their
  position (`buffer_timesteps`) and target frames at the sampled timestep; the model is
  told the target's timestep, and the loss covers the target frames only.

The model's generation (`cogvideox.Shape`, read from its configs) adds, as CogVideo's own
trainers do (`diffusion_loss`): CogVideoX 1.5 (temporal patch 2) gets its 21 latent frames
padded to 22 with a copy of the first in front, and the loss covers all 22; a model with
an `ofs` embedding (1.5-I2V) gets ofs = 2.0; an image-to-video model (5B-I2V, 1.5-I2V)
gets each sample's first-frame latents (precompute's `image_latents`), noised by
exp(N(-3, 0.5)), in the first latent frame and zeros after, along channels. Modes: lora
and full for every model; ic-lora and tic-ft for text-to-video ones (`cogvideox.check_fits`).

`train.init_from` starts a new run from existing weights instead of the base model (a
LoRA file, a checkpoint, a run's last checkpoint, a training sweep's best; mode full: a
folder holding transformer/) with a fresh optimizer, schedule and step count. The
weights' content is in the key (`init_source`, `init_fingerprint`); another rank, alpha,
targets or architecture fails before the model loads (`check_init`); once the run has
checkpoints of its own, it resumes from those.

What makes a resumed run identical to an uninterrupted one:
- batch composition is a pure function of the index and the config: samples of one
  bucket per batch, epoch e ordered by a generator seeded with (seed, e);
- every random draw of step s (timesteps, noise) comes from a generator seeded with
  (seed, s), so no RNG stream needs saving;
- a checkpoint holds the LoRA weights (fp32), the optimizer, the LR schedule and the
  grad scaler; resuming loads them and continues at step + 1. The global RNG states it
  also saves start from the seed, so a resumed run's checkpoints are byte-equal too.

One process trains a run folder at a time (`Workspace.hold`, freed when it dies): a second
`cogpipe train` of the run, or a Prefect retry while the first still runs, waits (and
logs who holds it), then finds the run done or resumes it. The training states of all
but the last `keep_states` checkpoints are pruned after each checkpoint and when a run
starts (a kill may fall between the two). A write that fails on a full disk names the
file and the space left (`cogpipe.errors.writing`).

Several GPUs (`train.strategy`, `train.num_processes`; see `cogpipe.distributed`): the
stage spawns one process per GPU, which split each step's micro-batches (the global batch
stays batch_size x gradient_accumulation_steps) and draw for each the numbers one process
would; rank 0 writes the run folder, the same files a single process writes.

The run folder is `train/<name>/` (the config's `name`, defaulting to the key):

    run.json                       key and the resolved config
    losses.jsonl                   one line per step: step, loss, lr, grad_norm, seconds
    logs/                          TensorBoard scalars
    checkpoint-{step:06d}/         pytorch_lora_weights.safetensors (rank and alpha in its
                                   metadata), state.json, training_state.pt (last K only);
                                   mode full: transformer/ (diffusers layout, the trained
                                   weights' dtype, every checkpoint) instead of the LoRA
    _SUCCESS.json

    cogpipe train demo/demo.yaml
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from cogpipe.config import LORA_MODES, ConfigError, PipelineConfig, TicFtConfig, TrainConfig
from cogpipe.errors import writing
from cogpipe.tic_ft import buffer_timesteps as buffer_timesteps  # still read as train.<name>
from cogpipe.tic_ft import tic_ft_sequence
from cogpipe.workspace import (
    SUCCESS,
    Progress,
    StageResult,
    Workspace,
    atomic_path,
    clean_stale_tmp,
    fault_point,
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
log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


class RunFolderTaken(RuntimeError):
    """The run folder belongs to a training run with another key."""


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    """The train key; `init_from` enters it by the content of the weights it resolves to,
    never by path: the same weights anywhere give the same key, new weights in the same
    place another one."""
    t = cfg.train
    config = t.key_fields() | {"seed": cfg.seed, "model_fp": model_fingerprint(cfg.model)}
    if t.init_from is not None:
        config["init_from"] = init_fingerprint(init_source(t.init_from, t.mode))
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


# --------------------------------------------------------------------------- init_from


class InitSource(NamedTuple):
    """The weights `train.init_from` names, resolved: what a new run starts from."""

    kind: str  # "lora": a LoRA file; "full": a folder whose transformer/ holds the weights
    weights: Path  # the LoRA file, or the folder holding transformer/
    chosen: str  # which weights and why, for the log and run.json


def init_source(path: Path, mode: str) -> InitSource:
    """Resolve `train.init_from`: a LoRA file, a checkpoint, a run folder (its last
    checkpoint: runs record no best one), a training sweep's folder (its first-ranked
    cell's best checkpoint), a folder holding transformer/, or a transformer/ folder.

    Raises:
        ConfigError: nothing usable there, or weights of the other kind than `mode` trains.
    """
    from cogpipe.models import cogvideox

    path = Path(path).expanduser()
    if (path / "results.parquet").is_file():
        best = _sweep_best(path)
        chosen = f"{best} (the best checkpoint of sweep {path.name}'s first-ranked cell)"
        return init_source(best, mode)._replace(chosen=chosen)
    if path.is_dir() and checkpoints(path):
        last = checkpoints(path)[-1]
        chosen = f"{last} (the last checkpoint of run {path.name})"
        return init_source(last, mode)._replace(chosen=chosen)
    if path.is_file() and path.suffix == ".safetensors":
        found = InitSource("lora", path, f"{path} (a LoRA file)")
    elif (path / cogvideox.LORA_FILE).is_file():
        found = InitSource("lora", path / cogvideox.LORA_FILE, f"{path} (a LoRA checkpoint)")
    elif (path / cogvideox.FULL_FOLDER / "config.json").is_file():
        found = InitSource("full", path, f"{path / cogvideox.FULL_FOLDER} (a full transformer)")
    elif path.name == cogvideox.FULL_FOLDER and (path / "config.json").is_file():
        found = InitSource("full", path.parent, f"{path} (a full transformer)")
    elif not path.exists():
        raise ConfigError(f"train.init_from: {path} does not exist")
    elif (path / "run.json").is_file():
        raise ConfigError(f"train.init_from: run {path} has no checkpoint yet")
    else:
        raise ConfigError(
            f"train.init_from: {path} is not a LoRA .safetensors file, a checkpoint, a run, a"
            f" training sweep or a folder holding transformer/ (diffusers layout)"
        )
    return _checked_kind(found, mode)


def _checked_kind(found: InitSource, mode: str) -> InitSource:
    """Refuse a LoRA for a full fine-tune, or full weights for a LoRA mode."""
    if found.kind == "lora" and mode == "full":
        raise ConfigError(
            f"train.init_from: {found.weights} is a LoRA, but train.mode full starts from a whole"
            f" transformer (a full run's checkpoint or a folder holding transformer/)"
        )
    if found.kind == "full" and mode in LORA_MODES:
        raise ConfigError(
            f"train.init_from: {found.weights} holds a whole transformer, but train.mode {mode}"
            f" starts from a LoRA (a LoRA run's checkpoint or its .safetensors file)"
        )
    return found


def _sweep_best(folder: Path) -> Path:
    """A training sweep's report folder (`<workspace>/sweeps/train/<sweep>/`): the best
    checkpoint of its first-ranked cell (`train_sweep.results` ranks them), a run folder
    of the same workspace."""
    table = read_table(folder / "results.parquet")
    if not {"run", "checkpoint"} <= set(table.columns) or len(folder.resolve().parents) < 3:
        raise ConfigError(
            f"train.init_from: {folder} is not a training sweep's report folder"
            f" (<workspace>/sweeps/train/<sweep>, whose results.parquet names runs and checkpoints)"
        )
    if table.empty or pd.isna(table.checkpoint.iloc[0]):
        raise ConfigError(
            f"train.init_from: sweep {folder} has no evaluated cell yet (results.parquet)"
        )
    best = table.iloc[0]
    ckpt = folder.resolve().parents[2] / "train" / best.run / best.checkpoint
    if not ckpt.is_dir():
        raise ConfigError(
            f"train.init_from: sweep {folder} ranks {best.run}/{best.checkpoint} first, but"
            f" {ckpt} does not exist"
        )
    return ckpt


def init_fingerprint(source: InitSource) -> str:
    """The content of the weights (not where they are): the key's `init_from`."""
    from cogpipe.config import file_fingerprint
    from cogpipe.models import cogvideox

    if source.kind == "lora":
        return file_fingerprint(source.weights, "train.init_from")
    return sha256_json(model_fingerprint(str(source.weights / cogvideox.FULL_FOLDER)))[:16]


def check_init(source: InitSource, cfg: PipelineConfig) -> None:
    """Refuse weights the configured adapter or model cannot take, before anything loads:
    a LoRA of another rank, alpha or targets (from its metadata), a transformer of another
    architecture (its config.json against the model's).

    Raises:
        ConfigError: one line naming the file, the field and both values.
    """
    from cogpipe.models import cogvideox

    t = cfg.train
    if source.kind == "full":
        config = source.weights / cogvideox.FULL_FOLDER / "config.json"
        theirs = _architecture(json.loads(config.read_text()))
        ours = _architecture(cogvideox.transformer_config(cfg.model))
        for name, value in ours.items():
            if theirs[name] != value:
                raise ConfigError(
                    f"train.init_from: {config} has {name} {theirs[name]}, the model"
                    f" ({cfg.model}) {value}: another architecture"
                )
        return
    found = lora_settings(source.weights)
    if "alpha" not in found:
        log.warning(
            "train.init_from: %s records no alpha (no adapter metadata); taking train.alpha %g",
            source.weights,
            t.alpha,
        )
    wanted = {"rank": t.rank, "alpha": t.alpha, "target_modules": sorted(t.target_modules)}
    for name, value in wanted.items():
        if name in found and found[name] != value:
            raise ConfigError(
                f"train.init_from: {source.weights} is a LoRA with {name} {found[name]},"
                f" train.{name} is {value}"
            )


def _architecture(config: dict) -> dict[str, Any]:
    """A transformer config.json's constructor arguments, defaults filled in: configs
    written by different diffusers releases list different keys for the same model."""
    import inspect

    from diffusers import CogVideoXTransformer3DModel

    params = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    filled = {n: config.get(n, p.default) for n, p in params.items() if n != "self"}
    return json.loads(json.dumps(filled))  # tuples as lists, as the file has them


def lora_settings(file: Path) -> dict[str, Any]:
    """A LoRA file's rank, alpha and targets from its safetensors header (no tensor read):
    its adapter metadata, else the rank from a lora_A shape (alpha and targets unknown)."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header.get("__metadata__", {}).get("lora_adapter_metadata", "{}"))
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    if "r" in meta:
        return {
            "rank": meta["r"],
            "alpha": meta["lora_alpha"],
            "target_modules": sorted(meta["target_modules"]),
        }
    shapes = [v["shape"] for k, v in header.items() if k.endswith("lora_A.weight")]
    return {"rank": shapes[0][0]} if shapes else {}


def load_init(transformer, source: InitSource) -> None:
    """Load a new run's starting weights into its adapter (LoRA modes) or transformer."""
    from cogpipe.models import cogvideox

    try:
        if source.kind == "full":
            cogvideox.load_full(transformer, source.weights)
        else:
            cogvideox.load_lora_checked(transformer, source.weights)
    except ValueError as e:
        raise ConfigError(f"train.init_from: {e}") from e


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
            f"{precompute_dir}/index.parquet has no usable samples ({len(index)} rows): no clip"
            " reached training; `cogpipe status CONFIG` shows where they were rejected, and"
            " each stage's report.md why"
        )
    return samples


def check_samples(
    precompute_dir: Path, samples: pd.DataFrame, t: TrainConfig, image: bool = False
) -> None:
    """Refuse samples the training mode (and with `image`, an image-to-video model) cannot use.

    Raises:
        ValueError: ic-lora without reference latents in the index; tic-ft samples whose
            latent frames are not the layout's condition + buffer + target; an
            image-to-video model without image latents in the index.
    """
    index = precompute_dir / "index.parquet"
    if image and ("image_key" not in samples or samples.image_key.isna().any()):
        raise ValueError(
            f"{index} has no image latents: the model is image-to-video and this precompute"
            f" output was made without them (by an older cogpipe); delete {precompute_dir}"
            f" and run precompute again"
        )
    if t.mode == "ic-lora" and (
        "reference_key" not in samples or samples.reference_key.isna().any()
    ):
        raise ValueError(
            f"{index} has no reference latents: train.mode ic-lora needs a precompute run with "
            f"precompute.reference set (e.g. cogpipe.condition:canny)"
        )
    if t.mode == "tic-ft":
        c = t.tic_ft
        wrong = samples[samples.latent_frames != c.latent_frames]
        if len(wrong):
            raise ValueError(
                f"{index}: sample {wrong.clip_id.iloc[0]} has {wrong.latent_frames.iloc[0]} latent "
                f"frames, but train.tic_ft asks for {c.condition_frames} condition + "
                f"{c.buffer_frames} buffer + {c.target_frames} target = {c.latent_frames} "
                f"(precompute.frames {c.video_frames})"
            )


def load_batch(
    precompute_dir: Path,
    samples: pd.DataFrame,
    rows: list[int],
    reference: bool = False,
    image: bool = False,
):
    """(latents [B, F', C, h, w], prompt_embeds [B, L, D]) of the given sample positions,
    and third with `reference` their reference latents [B, F', C, h, w], with `image`
    their first frames' latents [B, 1, C, h, w] (image-to-video)."""
    import torch
    from safetensors import safe_open

    extra = "reference_key" if reference else "image_key" if image else None
    latents, embeds, extras = [], [], []
    for r in samples.iloc[rows].itertuples():
        with safe_open(str(precompute_dir / r.shard), "pt") as f:
            latents.append(f.get_tensor(r.latents_key))
            embeds.append(f.get_tensor(r.embeds_key))
            if extra:
                extras.append(f.get_tensor(getattr(r, extra)))
    if extra:
        return torch.stack(latents), torch.stack(embeds), torch.stack(extras)
    return torch.stack(latents), torch.stack(embeds)


def draws(g, shape: tuple[int, ...], num_train_timesteps: int, image: bool = False):
    """A micro-batch's random draws from its step's generator, in this order: timesteps
    int64 [B], then noise of the latents' shape as fed [B, F', C, h, w] (after
    `cogvideox.pad_frames`), and with `image` (image-to-video) the image latents' noise
    level sigma [1] = exp(N(-3, 0.5)) and their noise [B, 1, C, h, w]; fp32, on the CPU.

    A rank of a multi-process run makes, and drops, the draws of the step's micro-batches
    before its own, so every micro-batch gets the numbers one process would give it.
    """
    import torch

    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=g)
    noise = torch.randn(shape, generator=g)
    if not image:
        return timesteps, noise
    sigma = torch.normal(-3.0, 0.5, (1,), generator=g).exp()
    return timesteps, noise, sigma, torch.randn((shape[0], 1, *shape[2:]), generator=g)


def skip_draws(g, skipped: list[tuple], shape, num_train_timesteps: int) -> None:
    """Make, and drop, the draws `diffusion_loss` makes for micro-batches of latents of the
    `skipped` shapes [B, F', C, h, w] (as stored: a 1.5 model's padded as it pads them), so
    a rank's own micro-batches get the numbers one process would give them.

    Args:
        shape: the model's `cogvideox.Shape` (temporal patch; image latents or not).
    """
    for b, frames, *rest in skipped:
        padded = frames + -frames % shape.temporal_patch
        draws(g, (b, padded, *rest), num_train_timesteps, shape.image_to_video)


def diffusion_loss(
    transformer,
    scheduler,
    latents,
    prompt_embeds,
    rotary,
    g,
    reference=None,
    tic_ft: TicFtConfig | None = None,
    image=None,
    shape=None,
    autocast=None,
):
    """The CogVideoX LoRA example's objective for one micro-batch, with the CogVideo 1.5
    and image-to-video trainers' inputs.

    A model with a temporal patch of 2 (CogVideoX 1.5) gets its latents (and references)
    padded to an even frame count with copies of the first latent frame in front
    (`cogvideox.pad_frames`, 21 -> 22), and, as in CogVideo's trainers, the noise, the
    model's input and the loss cover the whole padded sequence (the copy included).
    A model with an `ofs` embedding (1.5-I2V) is given ofs = 2.0, as diffusers' I2V
    pipeline and CogVideo's trainer give it.

    Args:
        latents: clean scaled latents [B, F', C, h, w] in the weights' dtype.
        prompt_embeds: [B, L, D] in the weights' dtype.
        rotary: (cos, sin) for 5B-type models (for the frames fed, padded: 2x with
            `reference`), else None.
        g: the CPU generator of this step; timesteps and noise are drawn from it.
        reference: ic-lora: clean reference latents [B, F', C, h, w], fed before the noised
            target; their outputs are dropped, so the loss covers the target only.
        tic_ft: tic-ft: the layout of `latents`; its condition and buffer frames are fed as
            `tic_ft_sequence` makes them and the loss covers the target frames only (a
            padding copy counts as one more condition frame).
        image: image-to-video: the first frames' latents [B, 1, C, h, w], noised and fed
            along channels (`image_input`).
        shape: the model's `cogvideox.Shape` (None: read from the transformer's config).
        autocast: mixed precision: the forward runs under torch.autocast to this dtype
            and its output is taken in fp32; None: as the weights are.

    Returns:
        mean over the batch of the 1 / (1 - alphas_cumprod[t])-weighted squared error
        between the predicted and the clean latents (a 0-d fp32 tensor).
    """
    import torch

    from cogpipe.models import cogvideox

    shape = shape or cogvideox.model_shape(getattr(transformer, "module", transformer).config)
    if shape.image_to_video != (image is not None):
        raise ValueError(
            "diffusion_loss: an image-to-video transformer takes the first frames' latents"
            " (`image`) and only it does; got "
            f"{'none' if image is None else 'image latents for a text-to-video model'}"
        )
    pad = -latents.shape[1] % shape.temporal_patch  # first-frame copies in front
    latents = cogvideox.pad_frames(latents, shape.temporal_patch)  # [B, F' + pad, C, h, w]
    b, device = latents.shape[0], latents.device
    timesteps, noise, *augment = draws(
        g, latents.shape, scheduler.config.num_train_timesteps, image is not None
    )
    timesteps, noise = timesteps.to(device), noise.to(device, latents.dtype)
    noisy, first = noised(scheduler, latents, noise, timesteps, tic_ft, pad)
    hidden = noisy if image is None else image_input(noisy, image, *augment)
    if reference is not None:
        reference = cogvideox.pad_frames(reference, shape.temporal_patch)
        hidden = torch.cat([reference, hidden], dim=1)  # [B, 2F', C, h, w]
    v = _predict(transformer, hidden, prompt_embeds, timesteps, rotary, shape.ofs, autocast)
    v = v[:, hidden.shape[1] - latents.shape[1] :]  # the target's outputs ([B, F', C, h, w])
    pred = scheduler.get_velocity(v, noisy, timesteps)  # v-prediction -> clean latents
    alphas_cumprod = scheduler.alphas_cumprod.to(device)[timesteps]  # [B]
    weights = (1 / (1 - alphas_cumprod)).view(b, 1, 1, 1, 1)
    error = (pred.float() - latents.float()) ** 2
    return (weights * error[:, first:]).reshape(b, -1).mean(1).mean()


def _predict(transformer, hidden, prompt_embeds, timesteps, rotary, ofs: bool, autocast):
    """The transformer's output for `hidden` (fp32 under `autocast`, as a mixed-precision
    forward hands it back); a model with an `ofs` embedding gets ofs = 2.0."""
    extra = {"ofs": hidden.new_full((1,), 2.0)} if ofs else {}
    with _autocast(hidden.device, autocast):
        v = transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds,
            timestep=timesteps,
            image_rotary_emb=rotary,
            return_dict=False,
            **extra,
        )[0]
    return v.float() if autocast is not None else v


def noised(scheduler, latents, noise, timesteps, tic_ft: TicFtConfig | None, pad: int):
    """(noised latents [B, F', C, h, w], the first latent frame the loss covers): every
    frame at `timesteps`, or with `tic_ft` its sequence (`tic_ft_sequence`, `pad` padding
    copies counted as condition frames) and the target frames only."""
    if tic_ft is None:
        return scheduler.add_noise(latents, noise, timesteps), 0
    layout = tic_ft.model_copy(update={"condition_frames": tic_ft.condition_frames + pad})
    noisy = tic_ft_sequence(scheduler, latents, noise, timesteps, layout)
    return noisy, layout.condition_frames + layout.buffer_frames


def image_input(noisy, image, sigma, image_noise):
    """An image-to-video model's input [B, F', 2C, h, w]: the noised latents, then along
    channels the first frames' latents [B, 1, C, h, w] in frame 0 and zeros after.

    The image latents get the reference trainers' noise augmentation, noise * sigma with
    sigma = exp(N(-3, 0.5)) per micro-batch, drawn from the step's generator (`draws`: a
    resumed run draws the same); the reference adds it to the pixels before an in-loop
    VAE encode, cogpipe precomputes, so it is added to the latents.
    """
    import torch

    from cogpipe.models import cogvideox

    sigma, image_noise = (x.to(noisy.device, image.dtype) for x in (sigma, image_noise))
    image = image + image_noise * sigma  # [B, 1, C, h, w]
    condition = cogvideox.image_condition(image, noisy.shape[1])  # [B, F', C, h, w]
    return torch.cat([noisy, condition], dim=2)


def _autocast(device, dtype):
    """torch.autocast to `dtype` on `device`'s type; None: no autocast."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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

    `step` queues the device work and returns the loss and gradient norm as device tensors
    without reading them, so Python runs ahead of the GPU; the caller reads them later.
    Mixed precision is torch AMP: the forward under autocast to `autocast`, the loss
    scaled by `scaler` (fp16 on a GPU).
    """

    transformer: Any  # what the forward runs: the model, in DDP or sharded
    model: Any  # the transformer itself: its config, weights and checkpoints
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    params: list
    config: TrainConfig
    seed: int
    dtype: Any  # of the inputs
    device: Any  # torch.device
    autocast: Any = None  # the forward's autocast dtype (None: none)
    scaler: Any = None  # torch.amp.GradScaler (None: no loss scaling)
    rank: int = 0
    processes: int = 1
    rotary: dict = field(default_factory=dict)  # (height, width, latent frames) -> (cos, sin)

    def _to_device(self, x):
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, self.dtype, non_blocking=True)
        return x.to(self.device, self.dtype)

    def step(self, step: int, micro_batches: list[tuple], skipped: list[tuple] = ()):
        """One optimizer step over `(latents, prompt_embeds, bucket)` micro-batches on the CPU
        (ic-lora: `(latents, prompt_embeds, bucket, reference latents)`; an image-to-video
        model: `(latents, prompt_embeds, bucket, image latents [B, 1, C, h, w])`). Latents
        are [B, F', C, h, w] as precompute stores them: a 1.5 model's are padded here.

        Args:
            skipped: in a multi-process run, the latent shapes [B, F', C, h, w] (as stored,
                C the latent channels) of the step's micro-batches that lower ranks take;
                their draws come first from the step's generator.

        Returns:
            (mean loss over every process's micro-batches, gradient norm before clipping,
            learning rate used): two 0-d device tensors and a float.
        """
        import torch

        from cogpipe.models import cogvideox

        shape = cogvideox.model_shape(self.model.config)
        g = generator("step", self.seed, step)  # every random draw of this step
        skip_draws(g, skipped, shape, self.noise_scheduler.config.num_train_timesteps)
        total, n = torch.zeros((), device=self.device), len(micro_batches)
        for k, batch in enumerate(micro_batches):
            total += self._micro_step(batch, g, shape, last=k == n - 1, count=n) / n
        if self.processes > 1:
            torch.distributed.all_reduce(total)  # the mean of the processes' means
            total /= self.processes
        grad_norm = self._clip_gradients()
        lr = self.lr_scheduler.get_last_lr()[0]
        self._update(step)
        return total, grad_norm, lr

    def _micro_step(self, batch: tuple, g, shape, last: bool, count: int):
        """Forward and backward of one of a step's `count` micro-batches; its loss, detached.
        DDP averages the gradients over the processes at the `last` one only."""
        from cogpipe.models import cogvideox, speed

        t = self.config
        latents, prompt_embeds, bucket, *extra = batch
        extra = self._to_device(extra[0]) if extra else None
        reference, image = (None, extra) if shape.image_to_video else (extra, None)
        frames = bucket[2] + -bucket[2] % shape.temporal_patch  # latent frames fed, padded
        fed = (*bucket[:2], frames * (2 if reference is not None else 1))
        if fed not in self.rotary:
            self.rotary[fed] = cogvideox.rotary_embeddings(self.model.config, *fed, self.device)
        no_sync = getattr(self.transformer, "no_sync", None)  # DDP's
        sync = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        # Backward runs under the same kernel choice: a checkpointed block recomputes
        # its forward there and must get the same attention outputs.
        with sync, speed.attention_kernel(t.attention_backend):
            loss = diffusion_loss(
                self.transformer,
                self.noise_scheduler,
                self._to_device(latents),
                self._to_device(prompt_embeds),
                self.rotary[fed],
                g,
                reference=reference,
                tic_ft=t.tic_ft if t.mode == "tic-ft" else None,
                image=image,
                shape=shape,
                autocast=self.autocast,
            )
            scaled = loss / count
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _clip_gradients(self):
        """Clip the gradients (unscaled first) to `max_grad_norm`; their norm before, a
        plain tensor (of a sharded model's too: gathered)."""
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor of partial norms
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(self.params, self.config.max_grad_norm, norm)
        return norm

    def _update(self, step: int) -> None:
        """The optimizer's update (the grad scaler skips it after an fp16 overflow), then
        the LR schedule's step and the gradients cleared.

        Raises:
            TrainingDiverged: the learning rate overflows the update.
        """
        t = self.config
        try:
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        except RuntimeError as e:  # "value cannot be converted to type float without overflow"
            if "overflow" not in str(e):
                raise
            raise TrainingDiverged(
                f"train.learning_rate {t.learning_rate:g} overflows the optimizer's update at"
                f" step {step} ({e}); use a learning rate of about 1e-4..1e-3"
            ) from e
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def trainable(transformer, t: TrainConfig, seed: int) -> list:
    """The parameters a mode trains: a new LoRA's (fp32), or every weight of the
    transformer (mode full: cast to fp32 or bf16 as `master_weights` says)."""
    import torch

    from cogpipe.models import cogvideox

    if t.mode in LORA_MODES:
        return cogvideox.add_lora(transformer, t.rank, t.alpha, t.target_modules, seed=seed)
    transformer.to({"fp32": torch.float32, "bf16": torch.bfloat16}[t.master_weights])
    return [p.requires_grad_(True) for p in transformer.parameters()]


def build_trainer(
    transformer,
    noise_scheduler,
    t: TrainConfig,
    seed: int,
    device,
    strategy: str = "single",
    weights: Path | None = None,
    init: InitSource | None = None,
) -> Trainer:
    """Give a loaded transformer its LoRA (or trainable weights), recomputation, compiled
    blocks and optimizer, and spread it over the processes of the run.

    Args:
        transformer: a CogVideoX transformer on `device` with frozen weights in the
            weight dtype (see cogvideox.load_transformer).
        noise_scheduler: the training noise schedule (CogVideoXDPMScheduler).
        t: the train section.
        seed: seeds the LoRA's initial A matrices (and, in `step`, each step's draws).
        device: "cpu", "cuda" or this rank's "cuda:N".
        strategy: single, or (in a process `distributed.launch` started: its process
            group is joined here) ddp or fsdp.
        weights: a checkpoint whose LoRA (mode full: transformer) to start from; loaded
            before the model is wrapped or sharded.
        init: without `weights`, a new run's starting weights (`train.init_from`).
    """
    import torch
    from diffusers.optimization import get_scheduler

    from cogpipe import distributed
    from cogpipe.models import speed

    if strategy == "single":
        device, (rank, processes) = torch.device(device), (0, 1)
    else:
        device, (rank, processes) = distributed.init_group(device), distributed.world()
    dtype = next(transformer.parameters()).dtype  # of the inputs; fp32 on the CPU
    if t.mode == "full" and t.master_weights == "bf16":
        dtype = torch.bfloat16  # bf16 weights: bf16 inputs and autocast
    params = trainable(transformer, t, seed)
    _load_start(transformer, t, weights, init)
    if t.fp8_base:  # under the LoRA, before compiling: the casts fuse into the blocks
        speed.fp8_training(transformer)
    speed.set_checkpointing(transformer, t.gradient_checkpointing, t.checkpointed_blocks)
    if t.compile and device.type == "cuda":
        speed.compile_blocks(transformer)
    wrapped = transformer
    if strategy == "fsdp":
        distributed.shard(transformer, speed.blocks(transformer))
        params = [p for p in transformer.parameters() if p.requires_grad]  # now sharded
    elif processes > 1:
        wrapped = distributed.wrap_ddp(transformer, device)
    optimizer = make_optimizer(params, t, device.type == "cuda")
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.lr_warmup_steps,
        num_training_steps=t.max_steps,
        num_cycles=t.lr_num_cycles,
    )
    wrapped.train()
    autocast, scaler = mixed_precision(dtype, device)
    parts = dict(transformer=wrapped, model=transformer, noise_scheduler=noise_scheduler)
    return Trainer(
        **parts,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        params=params,
        config=t,
        seed=seed,
        dtype=dtype,
        device=device,
        autocast=autocast,
        scaler=scaler,
        rank=rank,
        processes=processes,
    )


def _load_start(transformer, t: TrainConfig, weights: Path | None, init: InitSource | None):
    """Load the weights a run continues from: its checkpoint's, else `init`'s, else none."""
    from cogpipe.models import cogvideox

    if weights is not None:
        load = cogvideox.load_full if t.mode == "full" else cogvideox.load_lora
        load(transformer, weights)
    elif init is not None:
        load_init(transformer, init)


def mixed_precision(dtype, device) -> tuple[Any, Any]:
    """(autocast dtype, grad scaler) for inputs of `dtype` on `device`: fp16 and bf16 run
    the forward under autocast, fp16 on a GPU scales the loss too; fp32, and fp16 on the
    CPU (no autocast there), run as the weights are."""
    import torch

    if dtype == torch.bfloat16:
        return torch.bfloat16, None
    if dtype == torch.float16 and device.type == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return None, None


def checkpoints(out: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit())


def save_checkpoint(folder: Path, trainer: Trainer, cfg: PipelineConfig, state: dict) -> None:
    """Commit `checkpoint-{step:06d}/`: LoRA weights (mode full: `transformer/`), training
    state, state.json. Every rank calls it (a sharded model's weights and optimizer states
    are gathered on rank 0, each rank's RNG too); rank 0 writes."""
    import torch

    from cogpipe import distributed

    model, optimizer = trainer.model, trainer.optimizer
    sharded = trainer.processes > 1 and distributed.is_sharded(model)
    weights = distributed.full_weights(model) if sharded else None
    if cfg.train.mode == "full":  # keyed by parameter name: loads whatever the processes
        optimizer_state = distributed.full_optimizer_state(model, optimizer)
    else:
        optimizer_state = optimizer.state_dict()
    rng, ranks = rng_state(trainer), None
    if trainer.processes > 1:
        ranks = [None] * trainer.processes if trainer.rank == 0 else None
        torch.distributed.gather_object(rng, ranks, dst=0)
    if trainer.rank != 0:
        return
    scaler = trainer.scaler.state_dict() if trainer.scaler is not None else None
    training_state = {
        "step": state["step"],
        "micro_batch": state["micro_batch"],
        "optimizer": optimizer_state,
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "scaler": scaler,
        "rng": rng,
        "rng_ranks": ranks,
    }
    _write_checkpoint(folder, model, cfg.train, weights, training_state, state)


def _write_checkpoint(folder: Path, model, t: TrainConfig, weights, training: dict, state: dict):
    """Write a checkpoint's files into a temporary folder, then commit it as `folder`."""
    import torch

    from cogpipe.models import cogvideox

    weights_name = cogvideox.FULL_FOLDER if t.mode == "full" else cogvideox.LORA_FILE
    with atomic_path(folder) as tmp:  # a failed write leaves no temporary behind
        tmp.mkdir()
        with writing(folder / weights_name):
            if t.mode == "full":
                cogvideox.save_full(tmp, model, weights)
            else:
                cogvideox.save_lora(tmp, model, t.rank, t.alpha)
        with writing(folder / STATE_FILE):
            torch.save(training, tmp / STATE_FILE)
        with writing(folder / "state.json"):
            write_json(tmp / "state.json", state)


def prune_states(out: Path, keep: int) -> None:
    """Delete the training states of all but the newest `keep` checkpoints (their LoRA or
    weights stay). Run after every checkpoint and when a run starts, so a kill between a
    checkpoint and its pruning never leaves a state too many behind."""
    with_state = [c for c in checkpoints(out) if (c / STATE_FILE).is_file()]
    for old in with_state[:-keep]:
        fault_point("prune", old / STATE_FILE)
        (old / STATE_FILE).unlink(missing_ok=True)


def rng_state(trainer: Trainer) -> dict:
    """This process's global RNG states: the CPU's and (one process: every visible GPU's;
    a rank: its own GPU's). Training draws nothing from them (see `generator`)."""
    import torch

    rng = {"torch": torch.get_rng_state()}
    if trainer.processes == 1 and torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    elif trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    return rng


def restore_rng(saved: dict, trainer: Trainer) -> None:
    """Set this rank's RNG states from a training state: its own when the checkpoint was
    written by as many processes, else the CPU state of rank 0 (or the single process)."""
    import torch

    ranks, n = saved.get("rng_ranks"), trainer.processes
    rng = ranks[trainer.rank] if ranks and len(ranks) == n else saved.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is None or trainer.device.type != "cuda":
        return
    if isinstance(cuda, list):
        if n == 1:
            torch.cuda.set_rng_state_all(cuda)
    else:
        torch.cuda.set_rng_state(cuda, trainer.device)


def _interned(state):
    """A loaded training state with its dict keys interned, as the optimizer's and the
    scheduler's own are: pickle writes a string once per object, so a resumed run's next
    checkpoint is then byte-equal to an uninterrupted run's, not only equal in value."""
    if isinstance(state, dict):
        return {sys.intern(k) if isinstance(k, str) else k: _interned(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_interned(v) for v in state)
    return state


def _truncate_losses(path: Path, step: int) -> None:
    """Drop loss lines past `step` (written by the run that crashed after that checkpoint),
    and a torn last line (a kill in the middle of writing it)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if _step_of(line) <= step]
    with writing(path), atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """The step of a losses.jsonl line; infinity for a line that is not whole."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def run_train(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Train to `max_steps` in `train.mode`, resuming from the run folder's latest training state.

    With several processes (`train.num_processes`, `train.strategy`; see
    `cogpipe.distributed`), the run is spawned here, one process per GPU; rank 0 writes
    the logs and checkpoints and reports progress through this process.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `model`, `seed`, `name` and `train`).
        upstream: {"precompute": StageResult}.
        progress: called after every step as (step, max_steps, "loss 0.1234").

    Returns:
        The stage result; counts hold steps, checkpoints and samples, stats the final
        loss, seconds per step, peak GPU memory (the most of any process), strategy and
        processes.

    Raises:
        RunFolderTaken: the run folder belongs to another key.
        TrainingDiverged: a non-finite loss or gradient norm, or a learning rate whose
            update overflows (the message names train.learning_rate); checkpoints stay intact.
        OSError: ENOSPC naming the file being written when the disk is full.
        ValueError: samples the mode cannot use (see `check_samples`).
        distributed.RankFailed: a process of a multi-process run raised or died (named).
    """
    started = time.time()
    key = key_of(cfg, {"precompute": upstream["precompute"].key})
    out = output_dir(ws, cfg, key)
    claim(out, key)
    if ws.done(out):
        return ws.result("train", out)  # before the heavy imports: a reused run takes ms
    # One run per folder: a second process (another `cogpipe train`, a Prefect retry while
    # the first still runs) waits, then finds the run done or resumes it.
    with ws.hold(f"train-{out.name}", on_wait=_waiting(out)):
        claim(out, key)
        if ws.done(out):
            return ws.result("train", out)
        return _train(ws, cfg, upstream, progress, key, out, started)


def _waiting(out: Path):
    """The message of a run that waits for the process holding its run folder."""

    def say(holder: str) -> None:
        log.warning(
            "train: waiting for %s, held by %s; this run goes on when that one ends (it"
            " resumes from the last checkpoint or finds the run done)",
            out,
            holder,
        )

    return say


def _train(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress,
    key: str,
    out: Path,
    started: float,
) -> StageResult:
    """run_train's work, with the run folder held by this process."""
    t = cfg.train
    pre = Path(upstream["precompute"].path)
    clean_stale_tmp(out)
    prune_states(out, t.keep_states)  # a kill between a checkpoint and its pruning

    import torch

    from cogpipe import distributed
    from cogpipe.models import cogvideox

    device = resolve_device(t.device)
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(
            f"train.device {device!r}: use auto, cpu or cuda (a visible GPU; "
            f"choose which with CUDA_VISIBLE_DEVICES)"
        )
    samples = load_samples(pre)
    shape = cogvideox.shape_of(cfg.model)
    cogvideox.check_fits(cfg, shape)  # a mode the model cannot take, as precompute refuses it
    check_samples(pre, samples, t, shape.image_to_video)
    strategy, processes = distributed.parallelism(t, device)
    run = {
        "key": key,
        "inputs": {"precompute": upstream["precompute"].key},
        "config": cfg.model_dump(mode="json"),
    } | _starting_weights(cfg, out)
    with writing(out / "run.json"):
        write_json(out / "run.json", run)
    job = RankJob(cfg, pre, key, out, device, strategy)
    if processes == 1:
        stats = _train_rank(0, progress, job)
    else:
        raises = (TrainingDiverged, RunFolderTaken, ValueError)  # as a single process raises
        stats = distributed.launch(_train_rank, (job,), processes, progress, raises)[0]

    counts = {"steps": t.max_steps, "checkpoints": len(checkpoints(out)), "samples": len(samples)}
    if t.validation_every:
        counts["validations"] = t.max_steps // t.validation_every
    return ws.finish(StageResult("train", key, str(out), counts, stats=stats), started)


def _starting_weights(cfg: PipelineConfig, out: Path) -> dict:
    """run.json's `init_from` (the weights a run started from, and which), checked against
    the config before anything loads; logged, with a note when the run resumes instead."""
    if cfg.train.init_from is None:
        return {}
    source = init_source(cfg.train.init_from, cfg.train.mode)
    check_init(source, cfg)
    if any((c / STATE_FILE).is_file() for c in checkpoints(out)):
        log.info(
            "train: %s resumes from its own checkpoints; it started from %s",
            out.name,
            source.chosen,
        )
    else:
        log.info(
            "train: %s starts from %s, with a new optimizer at step 0", out.name, source.chosen
        )
    return {
        "init_from": {
            "given": str(cfg.train.init_from),
            "weights": str(source.weights),
            "kind": source.kind,
            "chosen": source.chosen,
        }
    }


@dataclass(frozen=True)
class RankJob:
    """What each process of a run trains: the arguments of `_train_rank`, picklable, as
    `distributed.launch` hands them to spawned ranks."""

    cfg: PipelineConfig
    precompute: Path  # the precompute output the samples come from
    key: str
    out: Path  # the run folder
    device: str  # "cpu" or "cuda"
    strategy: str  # single, ddp or fsdp (`distributed.parallelism`)


@dataclass
class Data:
    """A run's usable samples and how a step's micro-batches are read from them."""

    precompute: Path
    samples: pd.DataFrame
    buckets: list[tuple]  # per sample: height and width in pixels, latent frames
    cfg: PipelineConfig
    channels: int  # the latents' channels
    image: bool  # an image-to-video model: image latents in every batch

    def rows(self, micro: int, count: int) -> list[list[int]]:
        """Sample positions of micro-batches micro .. micro + count - 1 of the run."""
        t = self.cfg.train
        return [
            micro_batch(self.buckets, t.batch_size, self.cfg.seed, micro + m) for m in range(count)
        ]

    def shapes(self, rows: list[list[int]]) -> list[tuple]:
        """Latent shapes [B, F', C, h, w] of micro-batches (lower ranks': for their draws)."""
        from cogpipe.models.cogvideox import VAE_SCALE_SPATIAL as scale

        first = [self.buckets[r[0]] for r in rows]
        return [
            (len(r), f, self.channels, h // scale, w // scale)
            for r, (h, w, f) in zip(rows, first, strict=True)
        ]

    def load(self, rows: list[list[int]]) -> list[tuple]:
        """Micro-batches as `Trainer.step` takes them: latents [B, F', C, h, w], embeddings
        [B, L, D], the bucket, and the reference or image latents where the run has them."""
        reference = self.cfg.train.mode == "ic-lora"
        batches = []
        for r in rows:
            loaded = load_batch(self.precompute, self.samples, r, reference, self.image)
            batches.append((*loaded[:2], self.buckets[r[0]], *loaded[2:]))
        return batches


class StepLog:
    """Each step's numbers once its device work is done: a diverged run stopped naming the
    step, the step timed, the loss kept (checkpoints record them); rank 0 writes
    losses.jsonl and TensorBoard scalars."""

    def __init__(self, out: Path, start: int, losses: list[float], trainer: Trainer, clips):
        self.out, self.losses, self.clips = out, losses, clips
        self.learning_rate = trainer.config.learning_rate
        self.scaled, self.cuda = trainer.scaler is not None, trainer.device.type == "cuda"
        self.seconds: list[float] = []
        self.writer = self.file = None
        if trainer.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            _truncate_losses(out / "losses.jsonl", start)
            self.writer = SummaryWriter(str(out / "logs"), purge_step=start + 1)
            self.file = open(out / "losses.jsonl", "a")
        self.restart_clock()

    def restart_clock(self) -> None:
        """The next step's time starts now (not before a validation, say)."""
        self.last_read = time.perf_counter()

    def read(self, q: Queued) -> float:
        """Read a queued step's numbers (waits for its device work), log them; its loss.

        Raises:
            TrainingDiverged: a non-finite loss, or gradient norm without a grad scaler.
        """
        loss, grad_norm = q.loss.item(), q.grad_norm.item()
        self._check(q, loss, grad_norm)
        now = time.perf_counter()
        seconds, self.last_read = now - self.last_read, now  # the GPU's time, once warm
        self.seconds.append(seconds)
        self.losses.append(loss)
        if self.file is not None:
            record = {
                "step": q.step,
                "loss": loss,
                "lr": q.lr,
                "grad_norm": grad_norm,
                "seconds": round(seconds, 4),
            }
            self._write(record)
        return loss

    def _check(self, q: Queued, loss: float, grad_norm: float) -> None:
        last = checkpoints(self.out)[-1].name if checkpoints(self.out) else "none yet"
        if not math.isfinite(loss):
            clips = list(self.clips[[i for rows in q.rows for i in rows]])
            raise TrainingDiverged(
                f"loss is {loss} at step {q.step} (clips {clips}); last checkpoint: {last}. "
                f"Lower train.learning_rate (now {self.learning_rate:g}) or look for non-finite"
                f" values in the precompute shards"
            )
        if not math.isfinite(grad_norm) and not self.scaled:  # a scaler skips the step
            raise TrainingDiverged(
                f"gradient norm is {grad_norm} at step {q.step}; last checkpoint: {last}. "
                f"Lower train.learning_rate (now {self.learning_rate:g})"
            )

    def _write(self, record: dict) -> None:
        import torch

        with writing(self.out / "losses.jsonl"):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for name in ("loss", "lr", "grad_norm", "seconds"):
            self.scalar(f"train/{name}", record[name], record["step"])
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.scalar("train/peak_memory_gb", peak, record["step"])

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a failed flush: its error is on its way
                self.file.close()
            self.writer.close()


@dataclass
class Run:
    """One process's training run, set up (`set_up`) for `train_loop`: what the loop calls
    besides the trainer's step."""

    job: RankJob
    trainer: Trainer
    data: Data
    log: StepLog
    validation: Any  # rank 0 of a validating run: `validation.prepare`'s; else None
    start: int  # the step resumed from (0: a new run)
    micro: int  # micro-batches taken before step start + 1
    mine: range  # this rank's positions among a step's micro-batches
    weight_dtype: Any

    def validate(self, step: int) -> None:
        from cogpipe import validation

        report = validation.run(self.validation, self.trainer.model, self.job.out, step)
        self.log.scalar("validation/seconds", report["seconds"], step)
        self.log.restart_clock()  # the next step's time is its own

    def checkpoint(self, step: int, micro: int) -> None:
        job = self.job
        state = {"key": job.key, "step": step, "micro_batch": micro, "losses": self.log.losses}
        save_checkpoint(job.out / f"checkpoint-{step:06d}", self.trainer, job.cfg, state)
        if self.trainer.rank == 0:
            prune_states(job.out, job.cfg.train.keep_states)

    def stats(self) -> dict:
        """The run's stats (peak memory: every process's, gathered; a collective)."""
        import torch

        t, trainer, losses, seconds = (
            self.job.cfg.train,
            self.trainer,
            self.log.losses,
            self.log.seconds,
        )
        cuda, processes = trainer.device.type == "cuda", trainer.processes
        peaks = [torch.cuda.max_memory_allocated() / 2**30 if cuda else None]
        if processes > 1:
            peaks = [None] * processes
            torch.distributed.all_gather_object(
                peaks, torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            )
        return {
            "final_loss": losses[-1],
            "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
            "resumed_from_step": self.start,
            "seconds_per_step": sum(seconds) / len(seconds) if seconds else None,
            "peak_memory_gb": max(peaks) if cuda else None,
            "peak_memory_gb_per_process": peaks if cuda and processes > 1 else None,
            "trainable_params": sum(p.numel() for p in trainer.params),
            "lora_scale": t.alpha / t.rank if t.mode in LORA_MODES else None,
            "mode": t.mode,
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
            "strategy": self.job.strategy,
            "processes": processes,
        }


def _train_rank(rank: int, progress: Progress, job: RankJob) -> dict:
    """The training run of one process (rank 0 of 1 in-process); returns the run's stats.

    Every rank loads its own micro-batches, steps and reads the numbers; rank 0 alone
    writes losses, logs, checkpoints and validation videos and calls `progress`.
    """
    try:
        run = set_up(rank, job, progress)
        try:
            train_loop(run, progress)
        finally:
            run.log.close()
        return run.stats()
    finally:
        _release_memory(job.device)  # a worker process goes on to other runs


def train_loop(run: Run, progress: Progress) -> None:
    """Steps start + 1 .. max_steps: each queues its micro-batches' device work, reads the
    step before meanwhile, then validates and checkpoints where due."""
    t, trainer, data, log = run.job.cfg.train, run.trainer, run.data, run.log
    accum, micro = t.gradient_accumulation_steps, run.micro
    queued: list[Queued] = []  # steps whose numbers are still on the device
    for step in range(run.start + 1, t.max_steps + 1):
        rows = data.rows(micro, accum)
        micro += accum
        skipped = data.shapes(rows[: run.mine.start])  # lower ranks': only for their draws
        batches = data.load([rows[m] for m in run.mine])  # [B, F', C, h, w], one bucket each
        queued.append(Queued(step, *trainer.step(step, batches, skipped), rows))
        # A step's numbers are read once the next step is queued, so the GPU never waits
        # for Python; a checkpoint or a validation reads its own step first.
        for q in queued[:-1]:
            progress(q.step, t.max_steps, f"loss {log.read(q):.4f}")
        queued = queued[-1:]
        checkpoint = step % t.checkpoint_every == 0 or step == t.max_steps
        validating = run.validation is not None and step % t.validation_every == 0
        if not (checkpoint or validating):
            continue
        loss = log.read(queued.pop())
        # Validation first: a run killed before its checkpoint redoes this step and so its
        # validation; killed after, it has both.
        if validating:
            run.validate(step)
        if checkpoint:
            run.checkpoint(step, micro)
        progress(step, t.max_steps, f"loss {loss:.4f}")


def set_up(rank: int, job: RankJob, progress: Progress) -> Run:
    """Everything the loop needs, in the order memory asks for: samples, validation (its
    text encoder comes and goes before the transformer loads), the model and trainer from
    the newest resumable checkpoint or `init_from`, the training state, the log."""
    import torch

    from cogpipe import distributed
    from cogpipe.models import cogvideox

    cfg, t, device = job.cfg, job.cfg.train, job.device
    if device == "cuda" and job.strategy != "single":
        device = f"cuda:{rank}"  # this rank's GPU among the launching process's
        torch.cuda.set_device(device)
    # frozen base weights in this dtype; a LoRA in fp32
    dtype = cogvideox.weight_dtype(
        t.mixed_precision, cogvideox.transformer_config(cfg.model), device
    )
    samples = load_samples(job.precompute)
    validation = _validation(job, samples, device, dtype) if rank == 0 else None
    resumable = [c for c in checkpoints(job.out) if (c / STATE_FILE).is_file()]
    resume = resumable[-1] if resumable else None
    init = init_source(t.init_from, t.mode) if t.init_from and resume is None else None
    transformer = cogvideox.load_transformer(cfg.model, device, dtype)
    scheduler = cogvideox.load_scheduler(cfg.model)
    trainer = build_trainer(transformer, scheduler, t, cfg.seed, device, job.strategy, resume, init)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, micro, losses = resume_state(trainer, resume)
    if rank == 0 and resume is not None:
        progress(start, t.max_steps, f"resuming from {resume.name}")
    buckets = list(zip(samples.height, samples.width, samples.latent_frames, strict=True))
    image = cogvideox.shape_of(cfg.model).image_to_video
    data = Data(job.precompute, samples, buckets, cfg, trainer.model.config.out_channels, image)
    log = StepLog(job.out, start, losses, trainer, samples.clip_id)
    mine = distributed.share(t.gradient_accumulation_steps, rank, trainer.processes)
    return Run(job, trainer, data, log, validation, start, micro, mine, dtype)


def _validation(job: RankJob, samples: pd.DataFrame, device: str, dtype):
    """What a validating run's rank 0 samples with (`validation.prepare`); None without
    validation. ic-lora and tic-ft condition prompt i on sample i: ic-lora on its
    reference, tic-ft on its own latents."""
    t = job.cfg.train
    if not t.validation_every:
        return None
    from cogpipe import validation

    conditions = None
    if t.mode in ("ic-lora", "tic-ft"):
        reference = t.mode == "ic-lora"
        prompts = t.validation_settings(job.cfg.evaluate).prompts
        rows = [[i % len(samples)] for i in range(len(prompts))]
        part = 2 if reference else 0
        conditions = [load_batch(job.precompute, samples, r, reference)[part][0] for r in rows]
    return validation.prepare(job.cfg, device, dtype, conditions)


def resume_state(trainer: Trainer, checkpoint: Path | None) -> tuple[int, int, list[float]]:
    """Load `checkpoint`'s training state into `trainer`: (its step, the micro-batches taken,
    the losses so far). None: a new run, (0, 0, []), with the global RNG states seeded as a
    checkpoint saves them: the same whatever the process did before."""
    import torch

    from cogpipe import distributed

    if checkpoint is None:
        torch.manual_seed(int(sha256_json(("global", trainer.seed, trainer.rank))[:15], 16))
        return 0, 0, []
    # mmap: a rank reads only what it uses (not rank 0's gathered optimizer states)
    saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    saved = _interned(saved)
    if trainer.config.mode == "full":
        names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        distributed.load_optimizer_state(
            trainer.model, trainer.optimizer, saved["optimizer"], names
        )
    else:
        trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if trainer.scaler is not None and saved["scaler"] is not None:
        trainer.scaler.load_state_dict(saved["scaler"])
    restore_rng(saved, trainer)
    micro = saved.get("micro_batch", saved["step"] * trainer.config.gradient_accumulation_steps)
    losses = json.loads((checkpoint / "state.json").read_text())["losses"]
    return saved["step"], micro, losses


def _release_memory(device: str) -> None:
    """Collect the finished run's objects and hand their GPU memory back."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
