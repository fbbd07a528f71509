"""CogVideo SAT's names and layouts: the LoRA keys of its LoraMixin and the full model's.

The lower layer of `cogpipe.export` (which reads every format, merges, and writes each
one): here are only SAT's key names, the renames and fusions between diffusers' modules
and SAT's, and SAT's checkpoint folder. It also holds `ExportError`, the one error of
every export, so that `export` imports this module and never the other way round.

    modules, alpha = from_sat(state, metadata, path)     # SAT keys -> {module: (A, B)}
    state = to_sat(modules, num_layers=42, source=path)  # 42 x 8 = 336 SAT keys
    sat = to_sat_model(transformer_state)                # a merged transformer in SAT's names

See `cogpipe.export`'s docstring for the formats and their sources.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogpipe.workspace import atomic_path

if TYPE_CHECKING:
    import torch

BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")  # a module in a diffusers block

SAT_PREFIX = "model.diffusion_model.transformer.layers"
SAT_MODULES = {  # diffusers module in block i -> (SAT linear, partition index)
    "attn1.to_q": ("attention.query_key_value", 0),
    "attn1.to_k": ("attention.query_key_value", 1),
    "attn1.to_v": ("attention.query_key_value", 2),
    "attn1.to_out.0": ("attention.dense", 0),
}
SAT_CHECKPOINT = "mp_rank_00_model_states.pt"  # SAT's file name for model-parallel rank 0
SAT_ALPHA = 1.0  # LoraMixin's default lora_alpha
# The SAT model's own names for the diffusers modules (sat/dit_video_concat.py), the inverse of
# CogVideo's tools/convert_weight_sat2hf.py; every key is under SAT_MODEL.
SAT_MODEL = "model.diffusion_model."
SAT_TOP = {  # diffusers module outside the blocks -> SAT module
    "patch_embed.proj": "mixins.patch_embed.proj",  # 1.0: Conv2d [D, C, p, p]; 1.5: Linear
    "patch_embed.text_proj": "mixins.patch_embed.text_proj",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "ofs_embedding.linear_1": "ofs_embed.0",  # 1.5-I2V
    "ofs_embedding.linear_2": "ofs_embed.2",
    "norm_final": "transformer.final_layernorm",
    "norm_out.norm": "mixins.final_layer.norm_final",
    "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
    "proj_out": "mixins.final_layer.linear",
}
SAT_BLOCK = {  # diffusers module in transformer_blocks.{i} -> SAT module of layer {i}
    "norm1.norm": "transformer.layers.{i}.input_layernorm",
    "norm2.norm": "transformer.layers.{i}.post_attention_layernorm",
    "attn1.to_out.0": "transformer.layers.{i}.attention.dense",
    "ff.net.0.proj": "transformer.layers.{i}.mlp.dense_h_to_4h",
    "ff.net.2": "transformer.layers.{i}.mlp.dense_4h_to_h",
    "attn1.norm_q": "mixins.adaln_layer.query_layernorm_list.{i}",
    "attn1.norm_k": "mixins.adaln_layer.key_layernorm_list.{i}",
}
SAT_FUSED = {  # diffusers module in block {i} -> (the one SAT module it is part of, part index)
    "attn1.to_q": ("transformer.layers.{i}.attention.query_key_value", 0),
    "attn1.to_k": ("transformer.layers.{i}.attention.query_key_value", 1),
    "attn1.to_v": ("transformer.layers.{i}.attention.query_key_value", 2),
    "norm1.linear": ("mixins.adaln_layer.adaLN_modulations.{i}.1", 0),
    "norm2.linear": ("mixins.adaln_layer.adaLN_modulations.{i}.1", 1),
}
SAT_POS_EMBEDDING = ("patch_embed.pos_embedding", "mixins.pos_embed.pos_embedding")  # 5B-I2V
SAT_README = "README.txt"


class ExportError(ValueError):
    """A LoRA that cannot be read or exported: no such file, not a LoRA, the wrong model."""


# --------------------------------------------------------------------------- LoRA keys


def from_sat(state: dict, metadata: dict, path: Path) -> tuple[dict, float | None]:
    """({module: (A, B)}, alpha) of SAT LoRA keys (other keys of a full SAT checkpoint are
    skipped); alpha is the file's `lora_alpha`, else SAT's default 1.

    Raises:
        ExportError: a matrix_A key of no CogVideoX SAT LoRA module, or without its B.
    """
    modules = {}
    pattern = re.compile(re.escape(SAT_PREFIX) + r"\.(\d+)\.(.+)\.matrix_A\.(\d+)")
    for key in state:
        if not (m := pattern.fullmatch(key)):
            continue
        layer, linear, part = int(m.group(1)), m.group(2), int(m.group(3))
        name = next((d for d, s in SAT_MODULES.items() if s == (linear, part)), None)
        b_key = key.replace(".matrix_A.", ".matrix_B.")
        if name is None or b_key not in state:
            raise ExportError(f"{path}: {key} is not a CogVideoX SAT LoRA key or lacks its B")
        modules[f"transformer_blocks.{layer}.{name}"] = (state[key], state[b_key])
    alpha = metadata.get("lora_alpha")
    return modules, SAT_ALPHA if alpha is None else float(alpha)


def to_sat(modules: dict[str, tuple], num_layers: int, source: Path) -> dict[str, torch.Tensor]:
    """SAT keys for every layer of a LoRA's {module: (A, B)}: num_layers x 8 tensors.

    Raises:
        ExportError: the LoRA does not adapt exactly to_q, to_k, to_v and to_out.0 of each of
            the `num_layers` blocks (SAT's LoraMixin adapts those and nothing else).
    """
    wanted = {f"transformer_blocks.{i}.{m}" for i in range(num_layers) for m in SAT_MODULES}
    missing, extra = sorted(wanted - set(modules)), sorted(set(modules) - wanted)
    if missing or extra:
        raise ExportError(
            f"{source}: SAT adapts to_q, to_k, to_v and to_out.0 of all {num_layers} "
            f"layers; the LoRA lacks {len(missing)} of those {missing[:2]} and has "
            f"{len(extra)} others {extra[:2]}"
        )
    out = {}
    for i in range(num_layers):
        for name, (linear, part) in SAT_MODULES.items():
            a, b = modules[f"transformer_blocks.{i}.{name}"]
            out[f"{SAT_PREFIX}.{i}.{linear}.matrix_A.{part}"] = a  # [r, in]
            out[f"{SAT_PREFIX}.{i}.{linear}.matrix_B.{part}"] = b  # [out / partition, r]
    return out


# --------------------------------------------------------------------------- the merged model


def to_sat_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers CogVideoX transformer's tensors in the SAT model's names and layout, the
    inverse of CogVideo's tools/convert_weight_sat2hf.py (which reads them back exactly).

    q, k and v stack into SAT's one query_key_value [3 D, D] (and its bias); norm1.linear and
    norm2.linear (6 chunks each: shift, scale, gate of the video tokens, then of the text, for
    attention and for the MLP) interleave into SAT's 12-chunk adaLN_modulations: attention's
    video chunks, the MLP's video chunks, attention's text chunks, the MLP's text chunks. Every
    other tensor keeps its shape: the patch embedding's Conv2d (1.0) or Linear over 2x2x2 patches
    (1.5) is laid out as the SAT code of the same generation has it. The fixed sincos tables
    (2B's positional embedding, RoPE's frequencies) are not weights of the diffusers model: SAT
    computes them when it builds the model.

    Raises:
        ExportError: a tensor SAT's CogVideoX has no place for, or a fused one with a part missing.
    """
    out, parts = {}, {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        block = BLOCK.fullmatch(module)
        inner, layer = (block.group(2), block.group(1)) if block else (None, None)
        if key == SAT_POS_EMBEDDING[0]:
            out[SAT_MODEL + SAT_POS_EMBEDDING[1]] = tensor  # [1, text + patches, D]
        elif module in SAT_TOP:
            out[f"{SAT_MODEL}{SAT_TOP[module]}.{param}"] = tensor
        elif inner in SAT_BLOCK:
            out[f"{SAT_MODEL}{SAT_BLOCK[inner].format(i=layer)}.{param}"] = tensor
        elif inner in SAT_FUSED:
            fused, part = SAT_FUSED[inner]
            parts.setdefault(f"{SAT_MODEL}{fused.format(i=layer)}.{param}", {})[part] = tensor
        else:
            raise ExportError(f"{key}: the diffusers transformer's tensor has no place in SAT's")
    out |= {key: _fuse(key, group) for key, group in parts.items()}
    return dict(sorted(out.items()))


def _fuse(key: str, group: dict[int, torch.Tensor]) -> torch.Tensor:
    """SAT's one tensor of the diffusers parts {index: tensor} (see `to_sat_model`)."""
    import torch

    qkv = ".query_key_value." in key
    if sorted(group) != list(range(3 if qkv else 2)):
        raise ExportError(f"{key}: needs every part of it, the transformer has {sorted(group)}")
    if qkv:
        return torch.cat([group[0], group[1], group[2]])  # q, k, v: [3 D, D]
    attention, mlp = group[0].chunk(6), group[1].chunk(6)  # norm1.linear, norm2.linear
    return torch.cat([*attention[:3], *mlp[:3], *attention[3:], *mlp[3:]])  # [12 D, ...]


def sat_config(config: dict[str, Any]) -> tuple[str, str]:
    """(CogVideo's sat/configs yaml, the CogVideo code to run it) of a transformer config."""
    i2v = config["in_channels"] == 2 * config["out_channels"]  # image latents on the channels
    if config.get("patch_size_t"):  # 1.5: main's sat/, whose patch embedding is 3D
        return ("cogvideox1.5_5b_i2v.yaml" if i2v else "cogvideox1.5_5b.yaml"), "main"
    if i2v:
        return "cogvideox_5b_i2v.yaml", "v1.0"
    rope = config.get("use_rotary_positional_embeddings")
    return ("cogvideox_5b.yaml" if rope else "cogvideox_2b.yaml"), "v1.0"


def sat_readme(merged: str, config: dict, out: Path, state: dict) -> str:
    """How to point CogVideo's sat/sample_video.py at the checkpoint folder `out`; `merged`
    says which model and LoRA its weights are."""
    yaml, ref = sat_config(config)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    flag = {"float16": "fp16: True", "bfloat16": "bf16: True"}.get(dtype, "# float32: no flag")
    code = (
        "its main branch: sat/ there runs the CogVideoX 1.5 configs"
        if ref == "main"
        else "its tag v1.0 (git checkout v1.0): main's sat/ embeds 2x2x2 patches with a "
        "Linear and runs only the 1.5 configs; v1.0's Conv2d patch embedding is this model's"
    )
    i2v = config["in_channels"] == 2 * config["out_channels"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ofs = f", ofs_embed_dim {config['ofs_embed_dim']}" if config.get("ofs_embed_dim") else ""
    lines = [
        merged,
        f"CogVideo's SAT checkpoint layout: `latest` names the iteration folder 1, and "
        f'1/{SAT_CHECKPOINT} holds {{"module": {{key: tensor}}}}, {len(state)} {dtype} '
        f"tensors named {SAT_MODEL}<SAT module>. Written by `cogpipe export --format sat-merged`.",
        "",
        "To sample with CogVideo's SAT code (https://github.com/THUDM/CogVideo, folder sat/):",
        f"1. Use {code}.",
        f"2. Base config: sat/configs/{yaml}, without a lora_config (the LoRA is in the "
        f"weights). Its network_config must match this model (the yaml has the released "
        f"one's): num_layers {config['num_layers']}, hidden_size {width}, "
        f"num_attention_heads {config['num_attention_heads']}, in_channels "
        f"{config['in_channels']}, out_channels {config['out_channels']}, time_embed_dim "
        f"{config['time_embed_dim']}{ofs}.",
        "3. In sat/configs/inference.yaml set:",
        f'     load: "{out.resolve()}"',
        "     force_inference: True  # the folder holds the transformer; T5 and the VAE "
        "load from the yaml's paths",
        f"     {flag}",
        *(["     image2video: True"] if i2v else []),
        f"4. cd sat && python sample_video.py --base configs/{yaml} configs/inference.yaml",
    ]
    return "\n".join(lines) + "\n"


def write_checkpoint(out: Path, saved: dict[str, Any], readme: str | None = None) -> Path:
    """SAT's checkpoint folder: `out/latest` naming the iteration folder 1, whose
    `mp_rank_00_model_states.pt` holds `saved` ({"module": {key: tensor}, ...})."""
    import torch

    with atomic_path(out) as tmp:
        (tmp / "1").mkdir(parents=True)
        (tmp / "latest").write_text("1")  # SAT reads the iteration folder's name from here
        torch.save(saved, tmp / "1" / SAT_CHECKPOINT)
        if readme is not None:
            (tmp / SAT_README).write_text(readme)
    return out
