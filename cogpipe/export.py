"""Export: a trained LoRA in the layout each consumer loads, or merged into the base weights.

    cogpipe export train/run/checkpoint-004000 --format sat --out slap-sat.safetensors
    cogpipe export train/run/checkpoint-004000 --format comfyui --out slap-comfyui.safetensors
    cogpipe export train/run/checkpoint-004000 --format merged --model 2b --out slap-transformer/
    cogpipe export train/run/checkpoint-004000 --format sat-merged --model 1.5-5b --out slap-sat/
    cogpipe export slap-sat.safetensors --format diffusers --out back/      # and back again

    lora = read_lora("train/run/checkpoint-004000")    # any of the three layouts below
    sat = to_sat(lora.modules, 42, lora.source)         # {SAT key: tensor}, 42 x 8 = 336 keys

Every layout holds the same tensors under other names: A [r, in] and B [out, r] per adapted
Linear, the update being (alpha / r) * B @ A. Reading any layout and writing another one
moves tensors without touching them, so round trips give back equal tensors. Every format
works for every generation (2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V): the layouts follow the
model's layer count and module shapes, never its name.

- **diffusers** (default): what the trainer writes and `CogVideoXPipeline.load_lora_weights`
  reads: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, rank and alpha in the
  safetensors metadata (`lora_adapter_metadata`). A file without that metadata has
  alpha = rank, as diffusers assumes.
- **sat**: CogVideo's SwissArmyTransformer LoRA (`sat.model.finetune.lora2.LoraMixin`):
  per transformer layer i, `model.diffusion_model.transformer.layers.{i}.attention.`
  `query_key_value.matrix_A.{0,1,2}` and `matrix_B.{0,1,2}` (q, k, v) and `attention.dense.`
  `matrix_A.0` / `matrix_B.0` (to_out.0): 8 keys per layer, so num_layers x 8 (240 for
  CogVideoX-2B, 336 for 5B), num_layers read from the model's config or, without a model,
  from the LoRA. SAT adapts exactly to_q, to_k, to_v and to_out.0 of every layer; any
  other LoRA is refused. SAT scales by `lora_alpha / r` with `lora_alpha` from its YAML
  (`lora_config.params`, default 1): set `r` and `lora_alpha` there to the values this
  export records (safetensors metadata, or `lora_config` beside `module` in the .pt). A SAT
  file without them is read with alpha 1, SAT's default. Sources:
  https://github.com/THUDM/SwissArmyTransformer/blob/main/sat/model/finetune/lora2.py
  (matrix_A [r, in], matrix_B [out / partition, r], scaling), and the SAT -> diffusers
  key map of https://github.com/THUDM/CogVideo/blob/main/tools/export_sat_lora_weight.py
  (which hard-codes 2B's 240 keys, so it reads back 2B LoRAs only).
- **comfyui**: what ComfyUI's own LoRA loader applies to its native CogVideoX
  (`comfy/ldm/cogvideo/model.py`): `diffusion_model.<ComfyUI module>.lora_down.weight` (A),
  `.lora_up.weight` (B) and `.alpha` (a scalar; ComfyUI scales by alpha / rank). ComfyUI
  names the modules its own way (`blocks.{i}.q`, `.k`, `.v`, `.attn_out`, `.ff_proj`,
  `.ff_out` for diffusers' `transformer_blocks.{i}.attn1.to_q`, ..., `ff.net.2`), and
  `model_lora_keys_unet` in `comfy/lora.py` accepts `diffusion_model.<module>` for every
  weight of the model. Sources:
  https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/ldm/cogvideo/model.py,
  https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/lora.py and
  https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/weight_adapter/lora.py. kijai's
  ComfyUI-CogVideoXWrapper loads LoRAs of plain CogVideoX with diffusers'
  `load_lora_weights` (https://github.com/kijai/ComfyUI-CogVideoXWrapper/blob/main/model_loading.py):
  give it the diffusers export.
- **merged**: base + (alpha / r) * B @ A per adapted Linear, computed in fp32 and stored in
  the base weights' own dtype: a diffusers transformer folder (`--out DIR`, the base's
  files with merged tensors, for `CogVideoXTransformer3DModel.from_pretrained(DIR)`) or one
  safetensors file of the whole transformer (`--out FILE.safetensors`).
- **sat-merged**: the merged transformer in the SAT model's names and layout (`to_sat_model`,
  the inverse of CogVideo's tools/convert_weight_sat2hf.py: q/k/v stacked into
  query_key_value, norm1/norm2.linear interleaved into adaLN_modulations, the rest renamed),
  as the checkpoint folder sat/sample_video.py loads (`load: DIR` in its inference.yaml),
  with a README.txt naming the sat/configs yaml and the CogVideo version (tag v1.0 for the
  1.0 models, whose patch embedding is a Conv2d; main for 1.5). SAT's own computed tables
  (RoPE frequencies, 2B's sincos positions) and the rotary models' unused
  `transformer.position_embeddings` are not weights of the diffusers model and are not
  written; SAT builds them (inference.yaml's `force_inference: True` lets them, and T5 and
  the VAE, load from elsewhere). Checked by hand on tiny models of all four generations:
  CogVideo's own DiffusionTransformer loads it with no unexpected key and its forward equals
  diffusers' on the merged weights to 5e-5.

An output path ending in `.safetensors` gets one file; any other path a folder (diffusers:
`DIR/pytorch_lora_weights.safetensors`; sat: SAT's checkpoint layout, `DIR/latest` naming
`DIR/1/mp_rank_00_model_states.pt` = {"module": keys}; sat-merged: that folder only). SAT
itself saves a LoRA inside the full model checkpoint (the adapted Linears' base weights
under `.original.weight`); the sat export holds the LoRA keys alone, and reading a full SAT
checkpoint takes its LoRA keys.
Outputs are written under a temporary name and renamed. SAT's key names, renames and
checkpoint folder are in `cogpipe.export_sat`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

from cogpipe.export_sat import (  # noqa: F401  (ExportError, to_sat, to_sat_model re-exported)
    BLOCK,
    SAT_CHECKPOINT,
    ExportError,
    from_sat,
    sat_readme,
    to_sat,
    to_sat_model,
    write_checkpoint,
)
from cogpipe.models.cogvideox import LORA_FILE, hub_id, lora_metadata
from cogpipe.workspace import atomic_path

Format = Literal["diffusers", "sat", "comfyui", "merged", "sat-merged"]
FORMATS: tuple[str, ...] = get_args(Format)

COMFY_PREFIX = "diffusion_model."
COMFY_BLOCK = {  # diffusers module in transformer_blocks.{i} -> ComfyUI's in blocks.{i}
    "attn1.to_q": "q",
    "attn1.to_k": "k",
    "attn1.to_v": "v",
    "attn1.to_out.0": "attn_out",
    "ff.net.0.proj": "ff_proj",
    "ff.net.2": "ff_out",
    "norm1.linear": "norm1.linear",
    "norm2.linear": "norm2.linear",
}
COMFY_TOP = {  # the Linears outside the blocks; the others keep diffusers' names
    "time_embedding.linear_1": "time_embedding_linear_1",
    "time_embedding.linear_2": "time_embedding_linear_2",
    "ofs_embedding.linear_1": "ofs_embedding_linear_1",
    "ofs_embedding.linear_2": "ofs_embedding_linear_2",
}
COMFY_KEEP = ("patch_embed.proj", "patch_embed.text_proj", "norm_out.linear", "proj_out")


@dataclass
class Lora:
    """A LoRA on the CogVideoX transformer, in the transformer's module names.

    `modules` maps a Linear (`transformer_blocks.0.attn1.to_q`) to (A [r, in], B [out, r]);
    its update is (alpha / rank) * B @ A.
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    source: Path  # the file read
    layout: Literal["diffusers", "sat", "comfyui"]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def num_layers(self) -> int:
        """Transformer blocks up to the last one with an adapter."""
        blocks = [int(m.group(1)) for name in self.modules if (m := BLOCK.fullmatch(name))]
        return max(blocks) + 1 if blocks else 0


# --------------------------------------------------------------------------- reading


def _load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(tensors, metadata, file) of a LoRA file, cogpipe checkpoint or SAT checkpoint folder."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            path = path / LORA_FILE
        elif (path / "latest").is_file():  # SAT: latest names the iteration folder
            path = path / (path / "latest").read_text().strip() / SAT_CHECKPOINT
        else:
            raise ExportError(f"{path}: the folder holds no {LORA_FILE} and no SAT `latest`")
    if not path.is_file():
        raise ExportError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}, path
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors have no common base
        raise ExportError(f"{path}: not a .safetensors file or torch checkpoint ({e})") from None
    if not isinstance(saved, dict):
        raise ExportError(f"{path}: not a LoRA: holds a {type(saved).__name__}, not tensors")
    state = saved
    for wrapper in ("module", "model", "state_dict"):  # SAT / DeepSpeed nesting
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state, saved.get("lora_config", {}), path


def _pairs(state: dict, a_key: str, b_key: str, path: Path) -> dict[str, tuple]:
    """{module: (A, B)} of the keys `<module><a_key>` and `<module><b_key>`."""
    modules = {}
    for key in state:
        if key.endswith(a_key):
            name = key[: -len(a_key)]
            if name + b_key not in state:
                raise ExportError(f"{path}: not a complete LoRA: {key} has no {name + b_key}")
            modules[name] = (state[key], state[name + b_key])
    return modules


def _from_diffusers(state: dict, metadata: dict, path: Path) -> tuple[dict, float | None]:
    modules = _pairs(state, ".lora_A.weight", ".lora_B.weight", path)
    modules = {k.removeprefix("transformer."): v for k, v in modules.items()}
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ExportError(f"{path}: per-module alpha or rank (alpha_pattern) is not supported")
    alpha = config.get("lora_alpha")
    return modules, None if alpha is None else float(alpha)


def _from_comfyui(state: dict, path: Path) -> tuple[dict, float | None]:
    pairs = _pairs(state, ".lora_down.weight", ".lora_up.weight", path)
    modules, alphas = {}, set()
    for key, pair in pairs.items():
        modules[_diffusers_name(key, path)] = pair
        if key + ".alpha" in state:
            alphas.add(float(state[key + ".alpha"]))
    if len(alphas) > 1:
        raise ExportError(f"{path}: modules have different alphas {sorted(alphas)}")
    return modules, alphas.pop() if alphas else None


def read_lora(path: str | Path) -> Lora:
    """Read a LoRA in any of the layouts: diffusers, SAT or ComfyUI (see the module docstring).

    Args:
        path: a LoRA file (.safetensors, or a SAT .pt), a checkpoint folder holding
            `pytorch_lora_weights.safetensors`, or a SAT checkpoint folder (`latest`).

    Raises:
        ExportError: no such file, not a LoRA, mixed ranks, or an unknown module name.
    """
    state, metadata, file = _load_state(Path(path))
    if any(k.endswith(".lora_A.weight") for k in state):
        layout, (modules, alpha) = "diffusers", _from_diffusers(state, metadata, file)
    elif any(".matrix_A." in k for k in state):
        layout, (modules, alpha) = "sat", from_sat(state, metadata, file)
    elif any(k.endswith(".lora_down.weight") for k in state):
        layout, (modules, alpha) = "comfyui", _from_comfyui(state, file)
    else:
        sample = ", ".join(list(state)[:3]) or "none"
        raise ExportError(
            f"{file}: not a LoRA: no lora_A/lora_B, matrix_A/matrix_B or lora_down/lora_up "
            f"keys (keys: {sample})"
        )
    if not modules:
        raise ExportError(f"{file}: not a LoRA of a CogVideoX transformer: no {layout} module keys")
    ranks = {a.shape[0] for a, _ in modules.values()} | {b.shape[1] for _, b in modules.values()}
    if len(ranks) != 1:
        raise ExportError(f"{file}: modules have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    return Lora(modules, rank, rank if alpha is None else alpha, file, layout)


# --------------------------------------------------------------------------- the model


@lru_cache(maxsize=8)
def _linear_shapes(config_json: str) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of every Linear of a transformer built on the meta device (no memory)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel.from_config(json.loads(config_json))
    linears = model.named_modules()
    return {n: tuple(m.weight.shape) for n, m in linears if isinstance(m, torch.nn.Linear)}


def _comfy_name(name: str, path: Path) -> str:
    """`transformer_blocks.0.attn1.to_q` -> `diffusion_model.blocks.0.q` (ComfyUI's CogVideoX)."""
    if (m := BLOCK.fullmatch(name)) and m.group(2) in COMFY_BLOCK:
        return f"{COMFY_PREFIX}blocks.{m.group(1)}.{COMFY_BLOCK[m.group(2)]}"
    if name in COMFY_TOP or name in COMFY_KEEP:
        return COMFY_PREFIX + COMFY_TOP.get(name, name)
    raise ExportError(f"{path}: {name} has no counterpart in ComfyUI's CogVideoX")


def _diffusers_name(key: str, path: Path) -> str:
    """The inverse of `_comfy_name`."""
    native = key.removeprefix(COMFY_PREFIX)
    block = {v: k for k, v in COMFY_BLOCK.items()}
    top = {v: k for k, v in COMFY_TOP.items()} | {k: k for k in COMFY_KEEP}
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", native)
    if key.startswith(COMFY_PREFIX) and m and m.group(2) in block:
        return f"transformer_blocks.{m.group(1)}.{block[m.group(2)]}"
    if key.startswith(COMFY_PREFIX) and native in top:
        return top[native]
    raise ExportError(f"{path}: {key} names no module of ComfyUI's CogVideoX")


def transformer_dir(model: str, weights: bool = False) -> Path:
    """The local transformer folder of a model: a diffusers model folder, its transformer
    folder, a short name (`2b`, `1.5-5b-i2v`, ...) or a hub id (fetched through the Hugging
    Face cache).

    Raises:
        ExportError: not a CogVideoX model folder, or a hub id that cannot be fetched.
    """
    model = hub_id(model)
    path = Path(model).expanduser()
    if not path.exists() and not model.startswith(("/", ".", "~")) and model.count("/") == 1:
        from huggingface_hub import snapshot_download

        patterns = ["transformer/*"] if weights else ["transformer/config.json"]
        try:
            path = Path(snapshot_download(model, allow_patterns=patterns))
        except Exception as e:  # offline, gated, no such repo: hub errors share no base
            raise ExportError(f"--model {model}: cannot fetch from the hub ({e})") from None
    if not path.is_dir():
        raise ExportError(f"--model {model}: no such folder (a hub id is owner/name)")
    for folder in (path / "transformer", path):
        config = folder / "config.json"
        name = json.loads(config.read_text()).get("_class_name", "") if config.is_file() else ""
        if name.startswith("CogVideoX"):
            return folder
    raise ExportError(f"--model {model}: not a CogVideoX model (no transformer/config.json)")


def check_fits(lora: Lora, model: str) -> dict[str, Any]:
    """The model's transformer config, once every module of the LoRA fits one of its Linears.

    Raises:
        ExportError: naming the LoRA file, the module and why (absent, or another shape).
    """
    config = json.loads((transformer_dir(model) / "config.json").read_text())
    shapes = _linear_shapes(json.dumps(config, sort_keys=True))
    if absent := [name for name in lora.modules if name not in shapes]:
        raise ExportError(
            f"{lora.source}: does not fit {model}: {len(absent)} of the LoRA's modules are not "
            f"in it, e.g. {absent[0]} ({config.get('num_layers')} transformer blocks)"
        )
    for name, (a, b) in lora.modules.items():
        if (b.shape[0], a.shape[1]) != shapes[name]:
            raise ExportError(
                f"{lora.source}: does not fit {model}: {name} is {list(shapes[name])} there, "
                f"the LoRA's B @ A is [{b.shape[0]}, {a.shape[1]}]"
            )
    return config


# --------------------------------------------------------------------------- layouts


def to_diffusers(lora: Lora) -> dict[str, torch.Tensor]:
    """{`transformer.<module>.lora_A.weight`: A, `...lora_B.weight`: B}."""
    out = {}
    for name, (a, b) in lora.modules.items():
        out[f"transformer.{name}.lora_A.weight"] = a
        out[f"transformer.{name}.lora_B.weight"] = b
    return out


def to_comfyui(lora: Lora) -> dict[str, torch.Tensor]:
    """{`diffusion_model.<ComfyUI module>.lora_down.weight`: A, `.lora_up.weight`: B, `.alpha`}.

    Raises:
        ExportError: a module ComfyUI's CogVideoX does not have.
    """
    import torch

    out = {}
    for name, (a, b) in lora.modules.items():
        key = _comfy_name(name, lora.source)
        out[f"{key}.lora_down.weight"] = a
        out[f"{key}.lora_up.weight"] = b
        out[f"{key}.alpha"] = torch.tensor(float(lora.alpha))
    return out


def _targets(lora: Lora) -> list[str]:
    """peft target_modules that select exactly the LoRA's modules (suffixes within a block)."""
    return sorted({m.group(2) if (m := BLOCK.fullmatch(n)) else n for n in lora.modules})


def delta(lora: Lora, name: str) -> torch.Tensor:
    """(alpha / r) * B @ A of one module, fp32 [out, in], in the order peft fuses it."""
    a, b = lora.modules[name]
    return (b.float() @ a.float()) * lora.scale


# --------------------------------------------------------------------------- writing


def _save_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_diffusers(lora: Lora, out: Path) -> Path:
    """A diffusers LoRA file (`out` ends in .safetensors) or folder; a diffusers source is copied."""
    file = out if out.suffix == ".safetensors" else out / LORA_FILE
    if lora.layout == "diffusers" and lora.source.suffix == ".safetensors":
        with atomic_path(file) as tmp:  # the trainer's file as it is: validated, not rewritten
            shutil.copyfile(lora.source, tmp)
        return file
    from diffusers import CogVideoXPipeline

    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp, tempfile.TemporaryDirectory(dir=file.parent) as folder:
        CogVideoXPipeline.save_lora_weights(
            folder,
            transformer_lora_layers={
                k.removeprefix("transformer."): v for k, v in to_diffusers(lora).items()
            },
            transformer_lora_adapter_metadata=lora_metadata(lora.rank, lora.alpha, _targets(lora)),
        )
        shutil.move(Path(folder) / LORA_FILE, tmp)
    return file


def write_sat(lora: Lora, out: Path, num_layers: int) -> Path:
    """SAT keys in one safetensors file, or in SAT's checkpoint layout (`out/latest`, `out/1/...`)."""
    state = to_sat(lora.modules, num_layers, lora.source)
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "num_layers": num_layers}
    if out.suffix == ".safetensors":
        _save_safetensors(out, state, {k: str(v) for k, v in config.items()} | {"format": "pt"})
        return out
    return write_checkpoint(out, {"module": state, "lora_config": config})


def write_comfyui(lora: Lora, out: Path) -> Path:
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: ComfyUI loads one file; name it NAME.safetensors")
    _save_safetensors(out, to_comfyui(lora), {"format": "pt"})
    return out


def _merged_shards(lora: Lora, src: Path) -> Iterator[tuple[Path, dict, dict[str, str]]]:
    """(file, tensors, metadata) of every safetensors shard of the transformer folder `src`,
    each adapted Linear's weight replaced by base + (alpha / r) * B @ A in the base's dtype.

    Raises:
        ExportError: after the last shard, when some module of the LoRA had no weight.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    merged = set()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        state = load_file(f)
        for key, weight in state.items():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in lora.modules:
                state[key] = (weight.float() + delta(lora, name)).to(weight.dtype)
                merged.add(name)
        yield f, state, metadata
    if missing := sorted(set(lora.modules) - merged):
        raise ExportError(f"{lora.source}: {src} holds no weight of {missing[:3]}")


def write_merged(lora: Lora, model: str, out: Path) -> Path:
    """Base weights + (alpha / r) * B @ A, in the base's dtype: its transformer folder with merged
    tensors, or one .safetensors file of the whole transformer.

    Raises:
        ExportError: the LoRA does not fit the model.
    """
    from safetensors.torch import save_file

    check_fits(lora, model)
    src = transformer_dir(model, weights=True)
    everything = {}
    with atomic_path(out) as tmp:
        if out.suffix != ".safetensors":
            tmp.mkdir()
            for f in sorted(src.iterdir()):  # config.json, the shard index
                if f.is_file() and f.suffix != ".safetensors":
                    shutil.copyfile(f, tmp / f.name)
        for f, state, metadata in _merged_shards(lora, src):
            if out.suffix == ".safetensors":
                everything |= state
            else:
                save_file(state, str(tmp / f.name), metadata=metadata)
        if out.suffix == ".safetensors":
            save_file(everything, str(tmp), metadata={"format": "pt"})
    return out


def write_sat_merged(lora: Lora, model: str, out: Path) -> Path:
    """The base transformer with the LoRA merged in, in the SAT model's names and layout
    (`to_sat_model`), as the checkpoint folder CogVideo's sat/sample_video.py loads (`--load`
    / `load:`), with a README.txt saying how. It holds the whole transformer in memory, and
    the stacked q/k/v and adaLN tensors once more (about a third more for the 5B models).

    Raises:
        ExportError: the LoRA does not fit the model, or `out` names a file.
    """
    if out.suffix in (".safetensors", ".pt", ".pth"):
        raise ExportError(f"--out {out}: SAT loads a checkpoint folder (load: DIR); give a folder")
    config = check_fits(lora, model)
    state = {}
    for _, shard, _ in _merged_shards(lora, transformer_dir(model, weights=True)):
        state |= shard
    sat = to_sat_model(state)
    del state  # the renamed tensors live on in `sat`; the fused parts are copies
    merged = (
        f"{hub_id(model)} with the LoRA {lora.source} merged in: W + (alpha / r) * B @ A, "
        f"rank {lora.rank}, alpha {lora.alpha:g}."
    )
    return write_checkpoint(out, {"module": sat}, sat_readme(merged, config, out, sat))


def run_export(
    source: str | Path, out: str | Path, format: Format = "diffusers", model: str | None = None
) -> tuple[Path, Lora]:
    """Read the LoRA at `source` and write it to `out` in `format`.

    Args:
        source: a checkpoint folder, a LoRA file or a SAT checkpoint (see `read_lora`).
        out: the file or folder to write (see the module docstring).
        format: diffusers, sat, comfyui, merged or sat-merged (both need `model`).
        model: the base model (hub id, folder, or a short name: `2b`, `5b`, `5b-i2v`,
            `1.5-5b`, `1.5-5b-i2v`). The LoRA must fit it; for sat, its config gives
            num_layers (without it, the LoRA's last adapted block does).

    Returns:
        (the path written, the LoRA read).

    Raises:
        ExportError: a bad source, output path, model, or a LoRA the format cannot hold.
    """
    if format not in FORMATS:
        raise ExportError(f"--format {format}: one of {', '.join(FORMATS)}")
    lora, out = read_lora(source), Path(out).expanduser()
    if format in ("merged", "sat-merged"):
        if model is None:
            raise ExportError(f"--format {format} needs --model: the base weights to merge into")
        write = write_merged if format == "merged" else write_sat_merged
        return write(lora, model, out), lora
    config = check_fits(lora, model) if model is not None else {}
    if format == "sat":
        return write_sat(lora, out, config.get("num_layers") or lora.num_layers()), lora
    if format == "comfyui":
        return write_comfyui(lora, out), lora
    return write_diffusers(lora, out), lora
