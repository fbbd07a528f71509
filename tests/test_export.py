"""LoRA exports on tiny 2B- and 5B-shaped transformers (30 and 42 layers, tiny widths) and
on tiny models of every generation (`tiny_family`: 1.5, 5B-I2V, 1.5-I2V; 2 and 3 layers).

SAT keys number num_layers x 8 and convert back to equal tensors; ComfyUI keys are the
kohya layout with alpha; merged weights equal base + (alpha / r) * B @ A, as computed here
and as peft's own fuse_lora computes them; the merged SAT checkpoint has the keys and shapes
of CogVideo's SAT model and CogVideo's own sat2hf rules turn it back into the merged weights;
bad input is a clear error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogpipe.cli import main
from cogpipe.export import ExportError, read_lora, run_export
from cogpipe.models import cogvideox

RANK, ALPHA = 4, 8.0
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# THUDM/CogVideo tools/export_sat_lora_weight.py: the SAT -> diffusers names, per layer.
SAT_TO_DIFFUSERS = {
    "attention.query_key_value.matrix_A.0": "attn1.to_q.lora_A.weight",
    "attention.query_key_value.matrix_A.1": "attn1.to_k.lora_A.weight",
    "attention.query_key_value.matrix_A.2": "attn1.to_v.lora_A.weight",
    "attention.query_key_value.matrix_B.0": "attn1.to_q.lora_B.weight",
    "attention.query_key_value.matrix_B.1": "attn1.to_k.lora_B.weight",
    "attention.query_key_value.matrix_B.2": "attn1.to_v.lora_B.weight",
    "attention.dense.matrix_A.0": "attn1.to_out.0.lora_A.weight",
    "attention.dense.matrix_B.0": "attn1.to_out.0.lora_B.weight",
}
# All but the layer and head counts tiny: 8-dim heads, 4 latent channels, 8 text tokens of
# 8 dims, a 9-frame sample of 8 x 8 latents (64 x 64 px) in patches of 2.
TINY_SIZES = dict(attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2)
TINY_SIZES |= dict(text_embed_dim=8, max_text_seq_length=8, patch_size=2)
TINY_SIZES |= dict(sample_width=8, sample_height=8, sample_frames=9)


def write_transformer(folder: Path, num_layers: int, heads: int, five_b: bool, dtype) -> Path:
    """A model folder holding only `transformer/`: CogVideoX's layer count, tiny widths."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(num_layers)
    model = CogVideoXTransformer3DModel(
        num_layers=num_layers,
        num_attention_heads=heads,
        use_rotary_positional_embeddings=five_b,
        **TINY_SIZES,
    )
    model.to(dtype).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "2b": write_transformer(root / "2b", 30, 2, five_b=False, dtype=torch.float32),
        "5b": write_transformer(root / "5b", 42, 4, five_b=True, dtype=torch.bfloat16),
    }


def make_lora(model: Path, out: Path, targets: list[str] = ATTENTION, seed: int = 0) -> Path:
    """A checkpoint folder written by the trainer's own code, with random non-zero B."""
    transformer = cogvideox.load_transformer(str(model), "cpu", torch.float32)
    cogvideox.add_lora(transformer, RANK, ALPHA, targets, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # zero at init: the update would be zero
                p.copy_(torch.randn(p.shape, generator=g))
    cogvideox.save_lora(out, transformer, RANK, ALPHA)
    return out


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        name: make_lora(path, root / name / "checkpoint-000010") for name, path in models.items()
    }


def diffusers_load(transformer, file: Path) -> None:
    """Load a LoRA file into a transformer as `CogVideoXPipeline.load_lora_weights` does."""
    from diffusers import CogVideoXPipeline

    state, metadata = CogVideoXPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    assert transformer.peft_config["default_0"].lora_alpha == ALPHA  # read from the file


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / cogvideox.LORA_FILE if path.is_dir() else path
    return load_file(file)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("name", "layers"), [("2b", 30), ("5b", 42)])
def test_sat_export_has_num_layers_x8_keys_and_converts_back(models, loras, tmp_path, name, layers):
    sat, _ = run_export(loras[name], tmp_path / "sat.safetensors", "sat", model=str(models[name]))
    keys = load_file(sat)
    assert len(keys) == layers * 8  # 240 for 2B, 336 for 5B
    with safe_open(str(sat), "pt") as f:
        meta = f.metadata()
    assert (meta["r"], meta["lora_alpha"], meta["num_layers"]) == ("4", "8.0", str(layers))

    # Every SAT key, renamed by CogVideo's own SAT -> diffusers map, is the trained tensor.
    trained = lora_tensors(loras[name])
    prefix = "model.diffusion_model.transformer.layers."
    for key, tensor in keys.items():
        layer, rest = key.removeprefix(prefix).split(".", 1)
        assert torch.equal(
            tensor, trained[f"transformer.transformer_blocks.{layer}.{SAT_TO_DIFFUSERS[rest]}"]
        )

    back, lora = run_export(sat, tmp_path / "back", "diffusers")
    assert (lora.rank, lora.alpha, lora.layout) == (RANK, ALPHA, "sat")
    assert_same_tensors(lora_tensors(back), trained)
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(models[name], subfolder="transformer")
    diffusers_load(transformer, back)  # diffusers reads rank and alpha

    # Without a model, num_layers comes from the LoRA's keys.
    inferred, _ = run_export(loras[name], tmp_path / "inferred.safetensors", "sat")
    assert_same_tensors(load_file(inferred), keys)


def test_sat_checkpoint_folder_is_sat_layout_and_reads_back(loras, tmp_path):
    out, _ = run_export(loras["2b"], tmp_path / "sat", "sat")
    assert (out / "latest").read_text() == "1"
    saved = torch.load(out / "1" / "mp_rank_00_model_states.pt", weights_only=True)
    assert len(saved["module"]) == 240
    assert saved["lora_config"] == {"r": RANK, "lora_alpha": ALPHA, "num_layers": 30}
    back, _ = run_export(out, tmp_path / "back.safetensors", "diffusers")
    assert_same_tensors(lora_tensors(back), lora_tensors(loras["2b"]))


def test_full_sat_checkpoint_reads_its_lora_with_sat_default_alpha_1(loras, tmp_path):
    sat, _ = run_export(loras["2b"], tmp_path / "sat.safetensors", "sat")
    layer = "model.diffusion_model.transformer.layers.0"
    full = load_file(sat) | {  # as SAT saves a LoRA run: base weights beside the LoRA
        f"{layer}.attention.query_key_value.original.weight": torch.ones(48, 16),
        f"{layer}.mlp.dense_h_to_4h.weight": torch.ones(64, 16),
    }
    (tmp_path / "run" / "1000").mkdir(parents=True)
    (tmp_path / "run" / "latest").write_text("1000\n")
    torch.save({"module": full}, tmp_path / "run" / "1000" / "mp_rank_00_model_states.pt")
    lora = read_lora(tmp_path / "run")
    assert (lora.rank, lora.alpha, len(lora.modules)) == (RANK, 1.0, 120)  # no alpha recorded
    back, _ = run_export(tmp_path / "run", tmp_path / "back.safetensors", "diffusers")
    assert_same_tensors(lora_tensors(back), lora_tensors(loras["2b"]))


def test_sat_refuses_a_lora_it_cannot_hold(models, tmp_path):
    qv = make_lora(models["2b"], tmp_path / "qv", targets=["to_q", "to_v"])
    with pytest.raises(ExportError, match=r"SAT adapts to_q, to_k, to_v and to_out.0 of all 30"):
        run_export(qv, tmp_path / "qv.safetensors", "sat")
    ff = make_lora(models["2b"], tmp_path / "ff", targets=[*ATTENTION, "ff.net.2"])
    with pytest.raises(ExportError, match=r"has 30 others \['transformer_blocks.0.ff.net.2'"):
        run_export(ff, tmp_path / "ff.safetensors", "sat")


# The Linears of diffusers' CogVideoX beside the modules of ComfyUI's (its
# comfy/ldm/cogvideo/model.py, loaded under `diffusion_model.`), whole names: block 0's
# (every block alike, by its number) and two outside the blocks.
COMFY_MODULES = """
transformer_blocks.0.attn1.to_q       diffusion_model.blocks.0.q
transformer_blocks.0.attn1.to_k       diffusion_model.blocks.0.k
transformer_blocks.0.attn1.to_v       diffusion_model.blocks.0.v
transformer_blocks.0.attn1.to_out.0   diffusion_model.blocks.0.attn_out
transformer_blocks.0.ff.net.0.proj    diffusion_model.blocks.0.ff_proj
transformer_blocks.0.ff.net.2         diffusion_model.blocks.0.ff_out
transformer_blocks.0.norm1.linear     diffusion_model.blocks.0.norm1.linear
proj_out                              diffusion_model.proj_out
time_embedding.linear_1               diffusion_model.time_embedding_linear_1
"""


def comfy_modules(blocks: int) -> dict[str, str]:
    """{diffusers module: ComfyUI module} of COMFY_MODULES in a transformer of `blocks`."""
    modules = {}
    for line in COMFY_MODULES.strip().splitlines():
        diffusers, comfy = line.split()
        for i in range(blocks) if "blocks.0." in diffusers else [0]:
            nth = f"blocks.{i}."
            modules[diffusers.replace("blocks.0.", nth)] = comfy.replace("blocks.0.", nth)
    return modules


def test_comfyui_keys_are_comfys_cogvideox_modules_with_alpha_and_read_back(models, tmp_path):
    targets = [name.removeprefix("transformer_blocks.0.") for name in comfy_modules(1)]
    source = make_lora(models["2b"], tmp_path / "all", targets=targets)
    out, _ = run_export(source, tmp_path / "slap.safetensors", "comfyui")
    keys = load_file(out)
    comfy = comfy_modules(30)
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    expected = {f"{module}.{s}" for module in comfy.values() for s in suffixes}
    assert sorted(keys) == sorted(expected)  # 30 x 7 + 2 modules

    # ComfyUI adds (alpha / down.shape[0]) * up @ down to `diffusion_model.<module>.weight`.
    trained = lora_tensors(source)
    for diffusers_name, key in comfy.items():
        assert keys[f"{key}.alpha"].item() == ALPHA
        assert torch.equal(
            keys[f"{key}.lora_down.weight"], trained[f"transformer.{diffusers_name}.lora_A.weight"]
        )
        assert torch.equal(
            keys[f"{key}.lora_up.weight"], trained[f"transformer.{diffusers_name}.lora_B.weight"]
        )

    back, lora = run_export(out, tmp_path / "back.safetensors", "diffusers")
    assert (lora.rank, lora.alpha, lora.layout) == (RANK, ALPHA, "comfyui")
    assert_same_tensors(lora_tensors(back), trained)


def test_comfyui_refuses_a_module_comfy_does_not_have(tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file(
        {
            "transformer.extra.lora_A.weight": torch.ones(4, 8),
            "transformer.extra.lora_B.weight": torch.ones(8, 4),
        },
        odd,
    )
    with pytest.raises(ExportError, match=r"odd.safetensors: extra has no counterpart in ComfyUI"):
        run_export(odd, tmp_path / "odd-comfy.safetensors", "comfyui")


def test_diffusers_export_copies_the_trainers_file(loras, tmp_path):
    out, lora = run_export(loras["5b"], tmp_path / "lora.safetensors", "diffusers")
    assert out.read_bytes() == (loras["5b"] / cogvideox.LORA_FILE).read_bytes()
    assert (lora.rank, lora.alpha, lora.num_layers()) == (RANK, ALPHA, 42)


def test_merged_equals_base_plus_scaled_delta_and_peft_fuse(models, loras, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    out, _ = run_export(loras["2b"], tmp_path / "merged", "merged", model=str(models["2b"]))
    base_dir = models["2b"] / "transformer"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    base = load_file(base_dir / "diffusion_pytorch_model.safetensors")
    merged = load_file(out / "diffusion_pytorch_model.safetensors")
    lora = lora_tensors(loras["2b"])
    adapted = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight")
        for k in lora
        if k.endswith(".lora_A.weight")
    }
    assert len(adapted) == 120
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if module in adapted:
            a, b = (
                lora[f"transformer.{module}.lora_A.weight"],
                lora[f"transformer.{module}.lora_B.weight"],
            )
            expected = weight + (b @ a) * (ALPHA / RANK)
            assert not torch.equal(merged[key], weight), key
        else:
            expected = weight
        assert torch.equal(merged[key], expected), key

    # peft's own fuse of the same file into the same base gives the same weights.
    fused = CogVideoXTransformer3DModel.from_pretrained(models["2b"], subfolder="transformer")
    diffusers_load(fused, loras["2b"] / cogvideox.LORA_FILE)
    fused.fuse_lora(lora_scale=1.0)
    for name, module in fused.named_modules():
        if name in adapted:
            assert torch.equal(module.base_layer.weight, merged[f"{name}.weight"]), name
    reloaded = CogVideoXTransformer3DModel.from_pretrained(out)  # a diffusers transformer folder
    assert reloaded.config.num_layers == 30


def test_merged_single_file_keeps_the_base_dtype(models, loras, tmp_path):
    out, _ = run_export(loras["5b"], tmp_path / "m.safetensors", "merged", model=str(models["5b"]))
    merged = load_file(out)
    base = load_file(models["5b"] / "transformer" / "diffusion_pytorch_model.safetensors")
    lora = lora_tensors(loras["5b"])
    assert sorted(merged) == sorted(base)
    key = "transformer_blocks.41.attn1.to_out.0.weight"
    a = lora["transformer.transformer_blocks.41.attn1.to_out.0.lora_A.weight"]
    b = lora["transformer.transformer_blocks.41.attn1.to_out.0.lora_B.weight"]
    assert merged[key].dtype == torch.bfloat16
    assert torch.equal(
        merged[key], (base[key].float() + (b @ a) * (ALPHA / RANK)).to(torch.bfloat16)
    )
    assert torch.equal(merged["proj_out.weight"], base["proj_out.weight"])


def test_cli_export_writes_and_reports(loras, tmp_path, capsys):
    out = tmp_path / "slap-sat.safetensors"
    assert main(["export", str(loras["5b"]), "--format", "sat", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: sat export of ")
    assert len(load_file(out)) == 336


def test_cli_bad_input_is_a_clear_error_naming_the_file(models, loras, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["export", *args]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "nope"
    assert f"cogpipe: error: {missing}: no such file or folder" in error(str(missing), "--out", "x")

    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    assert f"{text}: not a readable safetensors file" in error(str(text), "--out", "x")

    other = tmp_path / "other.safetensors"
    save_file({"proj_out.weight": torch.zeros(2, 2)}, other)
    assert f"{other}: not a LoRA: no lora_A/lora_B" in error(str(other), "--out", "x")

    lora_5b = loras["5b"] / cogvideox.LORA_FILE
    err = error(str(loras["5b"]), "--format", "sat", "--model", str(models["2b"]), "--out", "x")
    assert f"{lora_5b}: does not fit {models['2b']}" in err and "(30 transformer blocks)" in err

    lora_2b = loras["2b"] / cogvideox.LORA_FILE
    err = error(str(loras["2b"]), "--format", "merged", "--model", str(models["5b"]), "--out", "x")
    assert (
        f"{lora_2b}: does not fit" in err
        and "is [32, 32] there, the LoRA's B @ A is [16, 16]" in err
    )

    assert "--format merged needs --model" in error(
        str(loras["2b"]), "--format", "merged", "--out", "x"
    )
    err = error(str(loras["2b"]), "--format", "comfyui", "--out", str(tmp_path / "dir"))
    assert "name it NAME.safetensors" in err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the whole family

WIDE = [*ATTENTION, "norm1.linear", "norm2.linear", "ff.net.0.proj", "proj_out"]
EXTRA = {"1.5": ["patch_embed.proj"], "1.5-i2v": ["patch_embed.proj", "ofs_embedding.linear_1"]}
SAT_YAML = {
    "2b": "cogvideox_2b.yaml",
    "1.5": "cogvideox1.5_5b.yaml",
    "i2v": "cogvideox_5b_i2v.yaml",
    "1.5-i2v": "cogvideox1.5_5b_i2v.yaml",
}


def generation(name: str) -> str:
    """The generation of a `family` model: "1.5-i2v-3" is a 3-layer 1.5-i2v."""
    return name.removesuffix("-3")


def model_config(model: Path) -> dict:
    import json

    return json.loads((model / "transformer" / "config.json").read_text())


@pytest.fixture(scope="module")
def family(tiny_family, tmp_path_factory) -> dict[str, Path]:
    """Tiny models of every generation (2 layers), and a 3-layer 1.5-I2V-shaped one."""
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.samples import write_tiny_cogvideox

    root = tmp_path_factory.mktemp("family-export")
    three = model_config(tiny_family["1.5-i2v"]) | {"num_layers": 3}
    torch.manual_seed(3)
    CogVideoXTransformer3DModel.from_config(three).save_pretrained(root / "3" / "transformer")
    return {"2b": write_tiny_cogvideox(root / "2b", "2b"), **tiny_family, "1.5-i2v-3": root / "3"}


@pytest.fixture(scope="module")
def family_loras(family, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{model: {"attention": LoRA on to_q/k/v/out, "wide": also adaLN, MLP, proj_out and, on 1.5,
    the patch embedding (a Linear there) and the ofs embedding}}."""
    root = tmp_path_factory.mktemp("family-loras")
    return {
        name: {
            "attention": make_lora(model, root / name / "attention"),
            "wide": make_lora(
                model, root / name / "wide", WIDE + EXTRA.get(generation(name), []), 1
            ),
        }
        for name, model in family.items()
    }


def transformer_output(transformer) -> torch.Tensor:
    """One seeded forward at the model's own latent size (5B-I2V's learned positions fix it)."""
    c = transformer.config
    g = torch.Generator().manual_seed(0)
    frames = 2 * (c.patch_size_t or 1)  # latent frames, whole temporal patches
    x = torch.randn(1, frames, c.in_channels, c.sample_height, c.sample_width, generator=g)
    text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g)
    ofs = {"ofs": torch.tensor([2.0])} if c.ofs_embed_dim else {}
    with torch.no_grad():
        return transformer(x, text, torch.tensor([500]), **ofs, return_dict=False)[0]


@pytest.mark.parametrize("name", ["1.5", "i2v", "1.5-i2v"])
def test_every_lora_export_works_for_the_new_generations(family, family_loras, tmp_path, name):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    model, lora = family[name], family_loras[name]
    sat, _ = run_export(lora["attention"], tmp_path / "sat.safetensors", "sat", model=str(model))
    keys = load_file(sat)
    assert sorted({k.split(".")[4] for k in keys}) == ["0", "1"] and len(keys) == 2 * 8
    back, _ = run_export(sat, tmp_path / "sat-back.safetensors", "diffusers")
    assert_same_tensors(lora_tensors(back), lora_tensors(lora["attention"]))

    comfy, _ = run_export(lora["wide"], tmp_path / "comfy.safetensors", "comfyui")
    back, _ = run_export(comfy, tmp_path / "comfy-back.safetensors", "diffusers")
    assert_same_tensors(lora_tensors(back), lora_tensors(lora["wide"]))

    # The diffusers export loads with the generation's own pipeline and changes its output
    # exactly as the merged export's weights do.
    exported, _ = run_export(lora["wide"], tmp_path / "lora.safetensors", "diffusers")
    pipeline = CogVideoXImageToVideoPipeline if "i2v" in name else CogVideoXPipeline
    pipe = pipeline.from_pretrained(model)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(exported))
    adapted = transformer_output(pipe.transformer)
    merged, _ = run_export(lora["wide"], tmp_path / "merged", "merged", model=str(model))
    from diffusers import CogVideoXTransformer3DModel

    folded = transformer_output(CogVideoXTransformer3DModel.from_pretrained(merged))
    assert (adapted - base).abs().mean() > 1e-2
    torch.testing.assert_close(folded, adapted, rtol=1e-4, atol=1e-4)


def test_sat_lora_keys_follow_the_layer_count_and_misfits_are_clear(family, family_loras, tmp_path):
    three, two = family_loras["1.5-i2v-3"]["attention"], family_loras["1.5-i2v"]["attention"]
    for model in (str(family["1.5-i2v-3"]), None):  # num_layers from the config, or the LoRA
        sat, _ = run_export(three, tmp_path / "sat.safetensors", "sat", model=model)
        assert len(load_file(sat)) == 3 * 8

    with pytest.raises(ExportError, match=r"does not fit .*\(2 transformer blocks\)"):
        run_export(three, tmp_path / "x.safetensors", "sat", model=str(family["1.5-i2v"]))
    with pytest.raises(ExportError, match=r"of all 3 layers; the LoRA lacks 4 of those"):
        run_export(two, tmp_path / "x.safetensors", "sat", model=str(family["1.5-i2v-3"]))
    wide_15, wide_15_i2v = family_loras["1.5"]["wide"], family_loras["1.5-i2v"]["wide"]
    with pytest.raises(ExportError, match=r"not in it, e.g. ofs_embedding.linear_1"):
        run_export(wide_15_i2v, tmp_path / "m", "sat-merged", model=str(family["1.5"]))
    with pytest.raises(  # 1.5-I2V's patches carry twice the latent channels
        ExportError, match=r"patch_embed.proj is \[32, 64\] there, the LoRA's B @ A is \[32, 32\]"
    ):
        run_export(wide_15, tmp_path / "m", "sat-merged", model=str(family["1.5-i2v"]))
    assert not (tmp_path / "m").exists()


def sat_layout(config: dict) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the transformer of CogVideo's SAT model for a diffusers config, from
    sat/dit_video_concat.py (DiffusionTransformer and its mixins) and SwissArmyTransformer's
    BaseTransformer (layers of input_layernorm, attention.query_key_value / dense,
    post_attention_layernorm, mlp.dense_h_to_4h / dense_4h_to_h; final_layernorm)."""
    d, head = (
        config["num_attention_heads"] * config["attention_head_dim"],
        config["attention_head_dim"],
    )
    t, p, pt = config["time_embed_dim"], config["patch_size"], config["patch_size_t"]
    cin, cout = config["in_channels"], config["out_channels"]
    linears = {  # module: weight shape; each has a bias [weight's first dim]
        "time_embed.0": (t, d),
        "time_embed.2": (t, t),
        "mixins.patch_embed.proj": (d, cin * p * p * pt) if pt else (d, cin, p, p),
        "mixins.patch_embed.text_proj": (d, config["text_embed_dim"]),
        "transformer.final_layernorm": (d,),
        "mixins.final_layer.norm_final": (d,),
        "mixins.final_layer.linear": (p * p * (pt or 1) * cout, d),
        "mixins.final_layer.adaLN_modulation.1": (2 * d, t),
    }
    if o := config.get("ofs_embed_dim"):
        linears |= {"ofs_embed.0": (o, o), "ofs_embed.2": (o, o)}
    for i in range(config["num_layers"]):
        layer, adaln = f"transformer.layers.{i}", "mixins.adaln_layer"
        linears |= {
            f"{layer}.input_layernorm": (d,),
            f"{layer}.post_attention_layernorm": (d,),
            f"{layer}.attention.query_key_value": (3 * d, d),
            f"{layer}.attention.dense": (d, d),
            f"{layer}.mlp.dense_h_to_4h": (4 * d, d),
            f"{layer}.mlp.dense_4h_to_h": (d, 4 * d),
            f"{adaln}.adaLN_modulations.{i}.1": (12 * d, t),
            f"{adaln}.query_layernorm_list.{i}": (head,),
            f"{adaln}.key_layernorm_list.{i}": (head,),
        }
    shapes = {f"{m}.weight": s for m, s in linears.items()} | {
        f"{m}.bias": s[:1] for m, s in linears.items()
    }
    if config.get("use_learned_positional_embeddings"):  # 5B-I2V: text tokens, then patches
        frames = (config["sample_frames"] - 1) // config["temporal_compression_ratio"] + 1
        patches = config["sample_height"] // p * (config["sample_width"] // p) * frames
        shapes["mixins.pos_embed.pos_embedding"] = (1, config["max_text_seq_length"] + patches, d)
    return {f"model.diffusion_model.{k}": s for k, s in shapes.items()}


# THUDM/CogVideo tools/convert_weight_sat2hf.py: its renames, applied to each key in this order.
SAT2HF_RENAMES = [
    ("transformer.final_layernorm", "norm_final"),
    ("transformer", "transformer_blocks"),
    ("attention", "attn1"),
    ("mlp", "ff.net"),
    ("dense_h_to_4h", "0.proj"),
    ("dense_4h_to_h", "2"),
    (".layers", ""),
    ("dense", "to_out.0"),
    ("input_layernorm", "norm1.norm"),
    ("post_attn1_layernorm", "norm2.norm"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("ofs_embed.0", "ofs_embedding.linear_1"),
    ("ofs_embed.2", "ofs_embedding.linear_2"),
    ("mixins.patch_embed", "patch_embed"),
    ("mixins.final_layer.norm_final", "norm_out.norm"),
    ("mixins.final_layer.linear", "proj_out"),
    ("mixins.final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),
]


def sat_to_diffusers(module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_weight_sat2hf.py's transformer conversion: renames, then q/k/v split in 3 along
    dim 0, the q/k layernorm lists moved into the blocks, the 12 adaLN chunks split into
    norm1 (chunks 0-2, 6-8) and norm2 (chunks 3-5, 9-11)."""
    out = {}
    for key, tensor in module.items():
        name = key.removeprefix("model.diffusion_model.")
        for old, new in SAT2HF_RENAMES:
            name = name.replace(old, new)
        if "query_key_value" in name:
            for part, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3), strict=True):
                out[name.replace("query_key_value", part)] = chunk
        elif "layernorm_list" in name:
            layer, param = name.split(".")[-2:]
            norm = "norm_q" if "query" in name else "norm_k"
            out[f"transformer_blocks.{layer}.attn1.{norm}.{param}"] = tensor
        elif "adaLN_modulations" in name:
            layer, _, param = name.split(".")[-3:]
            c = tensor.chunk(12)
            out[f"transformer_blocks.{layer}.norm1.linear.{param}"] = torch.cat(c[0:3] + c[6:9])
            out[f"transformer_blocks.{layer}.norm2.linear.{param}"] = torch.cat(c[3:6] + c[9:12])
        else:
            out[name] = tensor
    return out


@pytest.mark.parametrize("name", ["2b", "1.5", "i2v", "1.5-i2v", "1.5-i2v-3"])
def test_sat_merged_is_sats_layout_and_converts_back_to_the_merged_weights(
    family, family_loras, tmp_path, name
):
    from diffusers import CogVideoXTransformer3DModel

    model, lora = family[name], family_loras[name]["wide"]
    out, _ = run_export(lora, tmp_path / "sat", "sat-merged", model=str(model))
    assert (out / "latest").read_text() == "1"
    module = torch.load(out / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    config = model_config(model)
    assert {k: tuple(v.shape) for k, v in module.items()} == sat_layout(config)

    back = sat_to_diffusers(module)
    merged, _ = run_export(lora, tmp_path / "merged.safetensors", "merged", model=str(model))
    assert_same_tensors(back, load_file(merged))  # base + (alpha / r) * B @ A, every tensor
    CogVideoXTransformer3DModel.from_config(config).load_state_dict(back, strict=True)

    readme = (out / "README.txt").read_text()
    assert f'load: "{out.resolve()}"' in readme and "force_inference: True" in readme
    assert f"sat/configs/{SAT_YAML[generation(name)]}" in readme
    assert ("image2video: True" in readme) == ("i2v" in name)
    assert ("tag v1.0" in readme) == (not name.startswith("1.5"))
    assert f"num_layers {config['num_layers']}," in readme


def test_sat_merged_of_a_5b_keeps_bf16_and_names_its_yaml(models, loras, tmp_path):
    out, _ = run_export(loras["5b"], tmp_path / "sat", "sat-merged", model=str(models["5b"]))
    module = torch.load(out / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert len(module) == 42 * 18 + 16  # 18 tensors a layer, 16 outside them
    assert {v.dtype for v in module.values()} == {torch.bfloat16}
    readme = (out / "README.txt").read_text()
    assert "sat/configs/cogvideox_5b.yaml" in readme and "bf16: True" in readme


def test_cli_sat_merged_writes_and_refuses_clearly(family, family_loras, tmp_path, capsys):
    lora, model = family_loras["i2v"]["wide"], str(family["i2v"])
    out = tmp_path / "slap-sat"
    assert (
        main(["export", str(lora), "--format", "sat-merged", "--model", model, "--out", str(out)])
        == 0
    )
    assert capsys.readouterr().out.startswith(f"{out}: sat-merged export of ")
    assert (out / "1" / "mp_rank_00_model_states.pt").is_file()

    assert main(["export", str(lora), "--format", "sat-merged", "--out", str(out)]) == 2
    assert "--format sat-merged needs --model" in capsys.readouterr().err
    file = tmp_path / "slap.safetensors"
    assert (
        main(["export", str(lora), "--format", "sat-merged", "--model", model, "--out", str(file)])
        == 2
    )
    assert f"--out {file}: SAT loads a checkpoint folder" in capsys.readouterr().err
    assert not file.exists()
