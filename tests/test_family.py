"""The CogVideoX family through precompute and training: CogVideoX 1.5 (temporal patch 2,
81 frames), 5B-I2V and 1.5-I2V (image latents on the channels, `ofs`).

Each tiny model of `tiny_family` runs the pipeline from ingest to train at 81 frames
(the sample videos are 3 s long: 27 fps fits 81 frames in them), once per module: the
upstream stages are shared by the three (their keys do not depend on the model), then
each model precomputes, trains 2 steps, trains again killed after its first checkpoint
and resumes. Unit tests pin the padding, the image-to-video input and the refusals on
stub inputs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import seeded_loss, tiny_pipe_call
from safetensors.torch import load_file
from test_train import LORA, _losses, _stop_at

from cogpipe import precompute, train
from cogpipe.config import ConfigError, PipelineConfig, TicFtConfig
from cogpipe.demo import DEMO_CONFIG
from cogpipe.models import cogvideox
from cogpipe.pipeline import run_all, upstream_results
from cogpipe.workspace import StageResult, Workspace, read_table

FRAMES, FPS = 81, 27  # 80 / 27 = 2.96 s: the whole of a 3 s sample video
STEPS = dict(max_steps=2, checkpoint_every=1, batch_size=1, rank=4, alpha=8, device="cpu")


@pytest.fixture(scope="module")
def family_config(tmp_path_factory, sample_videos, tiny_models, tiny_family):
    """A factory for the demo config of one tiny model on a workspace the module shares."""
    workspace = tmp_path_factory.mktemp("family") / "workspace"

    def make(variant: str, name: str, **sections) -> PipelineConfig:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
        raw |= {
            "workspace": str(workspace),
            "name": name,
            "model": str(tiny_family[variant]),
            "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
        }
        raw["caption"]["model"] = str(tiny_models["llava"])
        raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
        raw["filter"] |= {"select_top": 3}  # 3 samples: 2 shards, batches of 1
        raw["check"] |= {
            "heldout_fraction": 0.4
        }  # held-out clips: image-to-video evaluates on them
        raw["evaluate"] |= {"frames": FRAMES, "prompts": raw["evaluate"]["prompts"][:1]}
        raw["precompute"] |= {"frames": FRAMES, "fps": FPS, "device": "cpu"}
        raw["train"] |= STEPS
        for section, values in sections.items():
            raw[section] = raw[section] | values
        return PipelineConfig.model_validate(raw)

    return make


@pytest.fixture(scope="module")
def trained(family_config):
    """variant -> (config, precompute result, uninterrupted run, resumed run), made once."""
    done = {}

    def get(variant: str):
        if variant not in done:
            cfg = family_config(variant, f"{variant}-full")
            results = run_all(cfg, until="train")
            pre, full = results[-2], results[-1]
            ws, upstream = Workspace(cfg.workspace), {"precompute": pre}
            resumed_cfg = family_config(variant, f"{variant}-resumed")
            with pytest.raises(KeyboardInterrupt):
                train.run_train(ws, resumed_cfg, upstream, _stop_at(1))
            resumed = train.run_train(ws, resumed_cfg, upstream)
            done[variant] = cfg, pre, full, resumed
        return done[variant]

    return get


@pytest.mark.parametrize("variant", ["1.5", "i2v", "1.5-i2v"])
def test_trains_at_81_frames_and_resumes_exactly(trained, variant):
    cfg, pre, full, resumed = trained(variant)
    index = read_table(Path(pre.path) / "index.parquet")
    ok = index[index.status == "ok"]
    assert len(ok) >= 2 and set(ok.frames) == {81} and set(ok.latent_frames) == {21}
    expected, got = _losses(Path(full.path)), _losses(Path(resumed.path))
    assert [e["step"] for e in expected] == [1, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in expected)
    assert resumed.stats["resumed_from_step"] == 1
    assert [g["loss"] for g in got] == [e["loss"] for e in expected]
    a = load_file(Path(full.path) / "checkpoint-000002" / LORA)
    b = load_file(Path(resumed.path) / "checkpoint-000002" / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["i2v", "1.5-i2v"])
def test_image_to_video_shards_hold_the_first_frames_latents(trained, variant):
    cfg, pre, _, _ = trained(variant)
    index = read_table(Path(pre.path) / "index.parquet")
    row = index[index.status == "ok"].iloc[0]
    assert row.image_key == f"{row.clip_id}.image_latents"
    assert pre.counts["encoded_images"] == pre.counts["encoded_videos"] == len(index) > 0
    stored = load_file(Path(pre.path) / row.shard)
    assert stored[row.latents_key].shape == (21, 4, 8, 8)
    assert stored[row.image_key].shape == (1, 4, 8, 8)
    # The window's first frame, encoded alone with the clip's own image seed.
    plan = precompute.sample_table(cfg, upstream_results(cfg, "precompute"))
    clip = next(r for r in plan.itertuples() if r.clip_id == row.clip_id)
    frames, _, reason = precompute._decode(clip)
    assert not reason
    vae = cogvideox.load_vae(cfg.model, "cpu", torch.float32)
    image = torch.from_numpy(frames[:1])  # [1, H, W, 3]
    again = cogvideox.encode_image(vae, image, [precompute._image_seed(clip)])[0]
    assert torch.allclose(again, stored[row.image_key], atol=1e-5)
    other = cogvideox.encode_image(vae, image, [precompute._seed(clip)])[0]  # the video's seed
    assert not torch.allclose(other, stored[row.image_key], atol=1e-4)


@pytest.mark.parametrize("variant", ["1.5", "i2v", "1.5-i2v"])
def test_trained_lora_loads_in_the_pipeline_and_changes_the_output(trained, variant):
    from diffusers import DiffusionPipeline
    from PIL import Image

    cfg, _, full, _ = trained(variant)
    pipe = DiffusionPipeline.from_pretrained(cfg.model)
    image_to_video = cogvideox.shape_of(cfg.model).image_to_video
    assert type(pipe).__name__ == (
        "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline"
    )
    extra = {"image": Image.new("RGB", (64, 64), (200, 40, 40))} if image_to_video else {}

    def generate():
        call = tiny_pipe_call(prompt="a red circle", num_frames=17, output_type="latent")
        return pipe(**call, generator=torch.Generator().manual_seed(0), **extra).frames

    base = generate()
    pipe.load_lora_weights(str(Path(full.path) / "checkpoint-000002"))
    tuned = generate()
    assert base.shape == tuned.shape and torch.isfinite(tuned).all()
    assert (tuned - base).abs().max() > 1e-4


# --------------------------------------------------------------------------- units


def test_pad_frames_copies_the_first_latent_frame_in_front():
    latents = torch.randn(2, 21, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    padded = cogvideox.pad_frames(latents, 2)
    assert padded.shape == (2, 22, 4, 8, 8)
    assert torch.equal(padded[:, 0], latents[:, 0]) and torch.equal(padded[:, 1:], latents)
    assert cogvideox.pad_frames(padded, 2) is padded  # already a multiple
    assert cogvideox.pad_frames(latents, 1) is latents  # CogVideoX 1.0


def test_image_scale_follows_the_vae_config():
    assert cogvideox.image_scale({"scaling_factor": 0.7}) == 0.7
    assert cogvideox.image_scale({"scaling_factor": 0.7, "invert_scale_latents": True}) == 1 / 0.7


class Recorder(torch.nn.Module):
    """A stand-in transformer: records its inputs, predicts the first C input channels."""

    def __init__(self, **config):
        super().__init__()
        self.config = {
            "out_channels": 4,
            "in_channels": 4,
            "sample_height": 8,
            "sample_width": 8,
        } | config
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen: dict = {}

    def forward(self, hidden_states, **kwargs):
        self.seen = {"hidden_states": hidden_states} | kwargs
        return (hidden_states[:, :, :4] * self.weight,)


@pytest.mark.parametrize(
    ("config", "image_to_video"),
    [
        ({"patch_size_t": 2}, False),  # 1.5
        ({"in_channels": 8, "use_learned_positional_embeddings": True}, True),  # 5B-I2V
        ({"in_channels": 8, "patch_size_t": 2, "ofs_embed_dim": 8}, True),  # 1.5-I2V
    ],
)
def test_the_transformer_gets_padded_latents_image_channels_and_ofs(
    tiny_models, config, image_to_video
):
    scheduler = cogvideox.load_scheduler(str(tiny_models["cogvideox"]))
    transformer = Recorder(**config)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 21, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 16, 32, generator=g)
    image = torch.randn(2, 1, 4, 8, 8, generator=g) if image_to_video else None
    seeded_loss(transformer, scheduler, latents, embeds, 7, image=image)
    seen = transformer.seen
    frames = 22 if config.get("patch_size_t") else 21
    fed = seen["hidden_states"]
    assert fed.shape == (2, frames, 8 if image_to_video else 4, 8, 8)
    # The draws diffusion_loss makes from its generator, in their order.
    shape = (2, frames, 4, 8, 8)
    timesteps, noise, *augment = train.draws(
        torch.Generator().manual_seed(7), shape, 1000, image_to_video
    )
    padded = cogvideox.pad_frames(latents, config.get("patch_size_t") or 1)
    assert torch.equal(fed[:, :, :4], scheduler.add_noise(padded, noise, timesteps))
    assert torch.equal(seen["timestep"], timesteps)
    if image_to_video:
        sigma, image_noise = augment
        assert 0 < sigma.item() < 1  # exp(N(-3, 0.5)): about 0.05
        assert torch.equal(fed[:, 0, 4:], (image + image_noise * sigma)[:, 0])
        assert torch.count_nonzero(fed[:, 1:, 4:]) == 0
    if config.get("ofs_embed_dim"):
        assert torch.equal(seen["ofs"], torch.tensor([2.0]))
    else:
        assert "ofs" not in seen


def test_models_refuse_what_they_cannot_take(family_config):
    """At the start of precompute, before its inputs are read (they do not exist here)."""
    nowhere = {stage: StageResult(stage, "k", "/nonexistent") for stage in ("check", "filter")}

    def refused(cfg: PipelineConfig, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            precompute.run_precompute(Workspace(cfg.workspace), cfg, nowhere)

    fixed = family_config("i2v", "refused", precompute={"buckets": [(64, 128)]})
    refused(
        fixed, "precompute.height/width and precompute.buckets must all be 64x64; 64x128 are not"
    )
    mode = family_config(
        "1.5-i2v",
        "ic",
        train={"mode": "ic-lora"},
        precompute={"reference": "cogpipe.condition:canny"},
    )
    refused(mode, "train.mode ic-lora: .* is image-to-video")
    refused(family_config("1.5", "short", precompute={"frames": 41}), r"must be 16k\+1 .*41")


def test_a_text_to_video_precompute_keeps_its_key_and_cache_keys():
    """Pinned before image-to-video existed: T2V caches and outputs stay valid."""
    cfg = PipelineConfig(model="2b")
    assert precompute.key_of(cfg, {"filter": "f1", "check": "c1"}) == "823f24af7494"
    m = precompute._Model(
        max_len=226,
        image=False,
        ratio=4,
        vae_fp=cogvideox.component_fingerprint(cfg.model, "vae"),
        text_fp=cogvideox.component_fingerprint(cfg.model, "tokenizer", "text_encoder"),
        reference_fp=None,
        device="cpu",
        dtype=None,
    )
    plan = pd.DataFrame(
        [
            dict(
                video_id="v1",
                start=0.0,
                end=6.0,
                frames=49,
                height=480,
                width=720,
                caption="a slap",
            )
        ]
    )
    precompute._cache_keys(plan, cfg.precompute, m)
    assert list(plan.columns)[-2:] == ["latents_cache", "embeds_cache"]  # no image_cache
    assert plan.latents_cache[0].startswith("b5acca6f0159364067c7")
    assert plan.embeds_cache[0].startswith("5e9c7db23370e6e18fea")


def test_conditioned_modes_pad_each_part_for_a_temporal_patch_of_2(tiny_models):
    scheduler = cogvideox.load_scheduler(str(tiny_models["cogvideox"]))
    transformer = Recorder(patch_size_t=2)
    g = torch.Generator().manual_seed(5)
    latents, reference = torch.randn(2, 1, 21, 4, 8, 8, generator=g)
    embeds = torch.randn(1, 16, 32, generator=g)
    # ic-lora: the reference and the target each padded, the reference first.
    seeded_loss(transformer, scheduler, latents, embeds, 1, reference=reference)
    fed = transformer.seen["hidden_states"]
    assert fed.shape == (1, 44, 4, 8, 8)
    assert torch.equal(fed[:, :22], cogvideox.pad_frames(reference, 2))
    # tic-ft: the copy of the clean condition frame is one more clean condition frame.
    layout = TicFtConfig(condition_frames=1, buffer_frames=4, target_frames=16)
    seeded_loss(transformer, scheduler, latents, embeds, 1, tic_ft=layout)
    fed = transformer.seen["hidden_states"]
    assert fed.shape == (1, 22, 4, 8, 8)
    assert torch.equal(fed[:, 0], latents[:, 0]) and torch.equal(fed[:, 1], latents[:, 0])
    assert (fed[:, 2:] - latents[:, 1:]).abs().amin(dim=(2, 3, 4)).gt(0).all()  # noised


@pytest.mark.parametrize(
    "config", [{"patch_size_t": 2}, {"in_channels": 8, "patch_size_t": 2, "ofs_embed_dim": 8}]
)
def test_a_rank_skips_exactly_the_draws_of_lower_ranks_micro_batches(tiny_models, config):
    """What makes a multi-process run draw per micro-batch what one process would."""
    scheduler = cogvideox.load_scheduler(str(tiny_models["cogvideox"]))
    transformer = Recorder(**config)
    shape = cogvideox.model_shape(transformer.config)
    latents, embeds = torch.randn(2, 21, 4, 8, 8), torch.randn(2, 16, 32)
    image = torch.randn(2, 1, 4, 8, 8) if shape.image_to_video else None
    made, skipped = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    train.diffusion_loss(transformer, scheduler, latents, embeds, None, made, image=image)
    train.skip_draws(skipped, [tuple(latents.shape)], shape, 1000)
    assert torch.equal(made.get_state(), skipped.get_state())
    assert not torch.equal(made.get_state(), torch.Generator().manual_seed(9).get_state())


def test_image_to_video_runs_through_evaluate_at_81_frames(trained, family_config):
    """The whole pipeline, evaluate included, on the 1.5-I2V tiny model at its native 81
    frames: base and both checkpoints sampled from held-out clips' first frames."""
    cfg, _, _, _ = trained("1.5-i2v")
    result = run_all(cfg, until="evaluate")[-1]
    assert result.counts["checkpoints_evaluated"] == 2
    index = read_table(cfg.workspace / "evaluate" / "index.parquet")
    assert set(index.checkpoint) >= {"checkpoint-000001", "checkpoint-000002"}
    videos = sorted(Path(result.path).rglob("*.mp4"))
    assert videos
