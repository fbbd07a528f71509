"""Sampling the CogVideoX family on tiny random models: image-to-video (5B-I2V and 1.5-I2V
shaped) from `--image`, CogVideoX 1.5's 81 frames, the refusals, and evaluate on an
image-to-video model.

A tiny random transformer ignores its image (its first frame is grey whatever it is
given), so "the first frame follows the image" is tested twice over: the real transformer
is shown to receive the image's latents in the first latent frame (a recording hook), and
a stand-in for a trained model, which denoises every frame towards the image latents it
is given, is shown to return a first frame nearer its own image than another image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_VIDEO, cli_flags, tiny_sampling
from PIL import Image

from cogpipe import cli, evaluate, generate, sampling
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.workspace import StageResult, Workspace, write_table

PROMPT = "A fighter slaps his opponent and the crowd cheers."
SIZE = dict(height=64, width=64)  # the tiny 5B-I2V-shaped model's fixed size
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}


@pytest.fixture(autouse=True)
def _prefect_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Solid red and solid blue PNGs, larger than the video and of another aspect (cropped)."""
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, colour in COLOURS.items():
        paths[name] = root / f"{name}.png"
        Image.fromarray(np.full((80, 120, 3), colour, np.uint8)).save(paths[name])
    return paths


def options(model: Path, **fields) -> GenerateOptions:
    return GenerateOptions(model=str(model), steps=2, seed=3, device="cpu", **SIZE | fields)


class Oracle(torch.nn.Module):
    """A stand-in for a trained image-to-video transformer: its v-prediction takes every
    latent frame to the image latents of the first latent frame (channels C..2C)."""

    def __init__(self, inner, alphas_cumprod):
        super().__init__()
        self.inner, self.alphas = inner, alphas_cumprod

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def cache_context(self, name: str):
        return self.inner.cache_context(name)

    def forward(self, hidden_states, timestep, return_dict=False, **kwargs):
        c = hidden_states.shape[2] // 2
        x, clean = (
            hidden_states[:, :, :c],
            hidden_states[:, :1, c:].expand_as(hidden_states[:, :, :c]),
        )
        a = self.alphas[timestep.long()].to(x).view(-1, 1, 1, 1, 1)
        noise = (x - a.sqrt() * clean) / (1 - a).sqrt()
        return (a.sqrt() * noise - (1 - a).sqrt() * clean,)  # v-prediction of `clean`


def round_trip(pipe, image: np.ndarray) -> np.ndarray:
    """The VAE's reconstruction of one image (what a perfect model's first frame can be)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    return ((y[0, :, 0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).numpy()


@pytest.mark.parametrize(("variant", "frames"), [("i2v", 9), ("1.5-i2v", 17)])
def test_first_frame_follows_the_image(tiny_family, images, variant, frames):
    model = tiny_family[variant]
    opts = {name: options(model, image=path, frames=frames) for name, path in images.items()}
    pipe = generate.load(opts["red"])
    assert type(pipe).__name__ == "CogVideoXImageToVideoPipeline"  # from the configs

    # The real transformer gets each image's latents in the first latent frame only, and
    # the same noise whatever the image (1.5-I2V: with an `ofs`).
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault(name, (kwargs["hidden_states"].clone(), kwargs.get("ofs")))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    videos = {}
    for name in images:
        videos[name] = generate.generate_one(pipe, PROMPT, opts[name])
    hook.remove()
    assert videos["red"].shape == (frames, 64, 64, 3)
    c = pipe.vae.config.latent_channels
    (red, ofs), (blue, _) = seen["red"], seen["blue"]
    assert torch.equal(red[:, :, :c], blue[:, :, :c])  # the same seeded noise
    assert red[:, 1:, c:].abs().max() == 0 and blue[:, 1:, c:].abs().max() == 0
    assert (red[:, 0, c:] - blue[:, 0, c:]).abs().mean() > 0.05  # the images differ there
    assert (ofs is not None) == (variant == "1.5-i2v")

    # A transformer that follows its image: the first frame is nearer its own image's. The
    # random VAE's posterior is as wide as its mean, so its log-variance is pinned low: an
    # image then encodes to its mean, as a trained VAE's nearly does.
    pipe.transformer = Oracle(pipe.transformer, pipe.scheduler.alphas_cumprod)
    with torch.no_grad():
        pipe.vae.encoder.conv_out.conv.weight[c:] = 0
        pipe.vae.encoder.conv_out.conv.bias[c:] = -30
    made = {n: generate.generate_one(pipe, PROMPT, opts[n])[0].astype(float) for n in images}
    truth = {n: round_trip(pipe, sampling.read_image(p, 64, 64)) for n, p in images.items()}
    for own, other in (("red", "blue"), ("blue", "red")):
        near, far = np.abs(made[own] - truth[own]).mean(), np.abs(made[own] - truth[other]).mean()
        assert near < far / 2, (own, near, far)


def test_cogvideox_15_makes_81_frames_by_default(tiny_family):
    model = tiny_family["1.5"]
    small = options(model, height=32, width=32)  # frames not given: the model's
    assert generate.fit(small, sampling.model_traits(str(model))).frames == 81
    video = generate.generate_one(generate.load(small), PROMPT, small)
    assert video.shape == (81, 32, 32, 3) and video.dtype == np.uint8  # padding dropped
    # Native sizes when none is given: 1.5 at 768x1360, 5B-I2V at its fixed size.
    assert sampling.model_traits(str(model)).native == (81, 768, 1360)
    assert sampling.model_traits(str(tiny_family["i2v"])).native == (9, 64, 64)


def test_generate_image_end_to_end(tmp_path, tiny_family, sample_videos, capsys):
    """`cogpipe generate --image` from a video file (its first frame) writes the video."""
    from cogpipe.video import probe_video

    out = tmp_path / "i2v.mp4"
    video = next(p for name, p in sample_videos.items() if name.startswith("shapes"))
    inputs = cli_flags(model=tiny_family["i2v"], image=video, prompt=PROMPT)
    rc = cli.main(["generate", *inputs, *cli_flags(**TINY_VIDEO), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    info, reason = probe_video(out)
    assert not reason and info["frames"] == 9 and (info["width"], info["height"]) == (64, 64)


@pytest.mark.parametrize(
    ("variant", "flags", "error"),
    [
        ("i2v", [], "is image-to-video: give --image"),
        ("1.5", ["--image", "IMAGE"], "--image: model {model} is text-to-video; it takes no image"),
        ("1.5", ["--frames", "41"], "--frames 41: CogVideoX 1.5 (temporal patch 2) takes 16k+1"),
        (
            "1.5",
            ["--frames", "17", "--steps", "1", "--height", "784", "--width", "784"],
            "784x784: CogVideoX 1.5 makes videos up to 768x1360 or 1360x768",
        ),
        ("i2v", ["--image", "IMAGE", "--width", "128"], "64x128: the model's learned positional"),
    ],
)
def test_generate_refuses_what_the_model_cannot_take(
    tmp_path, tiny_family, images, capsys, variant, flags, error
):
    model = str(tiny_family[variant])
    flags = [str(images["red"]) if f == "IMAGE" else f for f in flags]
    argv = [
        "generate",
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "x.mp4"),
        *flags,
    ]
    if "--height" not in flags:
        argv += ["--height", "64"] + ([] if "--width" in flags else ["--width", "64"])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and error.format(model=model) in err, err
    assert not (tmp_path / "x.mp4").exists()


def test_sweep_gives_every_cell_the_image(tmp_path, tiny_family, images):
    from cogpipe.sweep import run_sweep

    opts = options(tiny_family["i2v"], image=images["blue"], frames=9)
    table = run_sweep({"p": PROMPT}, opts, {"seed": ["1", "2"]}, tmp_path, "seeds")
    assert list(table.error) == ["", ""] and table.file_bytes.gt(0).all()
    with pytest.raises(GenerateError, match="is image-to-video: give --image"):
        run_sweep({"p": PROMPT}, options(tiny_family["i2v"]), {"seed": ["1"]}, tmp_path, "x")


def _check(folder: Path, videos: dict[str, Path]) -> StageResult:
    """A check output with two kept held-out clips."""
    from cogpipe.video import probe_video

    rows = []
    for i in (1, 2):
        path = videos[f"shapes_{i:02d}.mp4"]
        rows.append(
            {
                "clip_id": f"clip{i}",
                "path": str(path),
                "start": 0.0,
                "split": "heldout",
                "end": probe_video(path)[0]["duration"],
                "keep": True,
            }
        )
    write_table(folder / "clips.parquet", pd.DataFrame(rows))
    return StageResult("check", "check-2", str(folder))


def test_evaluate_image_to_video_model(tmp_path, tiny_family, tiny_models, sample_videos):
    from cogpipe.models import cogvideox
    from cogpipe.video import read_frames, resize_center_crop

    model = tiny_family["i2v"]
    ec = EvaluateConfig(
        prompts=[PROMPT, "A dog runs."],
        seeds=[42],
        steps=2,
        frames=9,
        clip_model=str(tiny_models["clip"]),
        device="cpu",
        **SIZE,
    )
    cfg = PipelineConfig(workspace=tmp_path / "ws", model=str(model), evaluate=ec)
    run_dir = Workspace(cfg.workspace).root / "train" / "run-i2v"
    transformer = cogvideox.load_transformer(str(model), "cpu", torch.float32)
    cogvideox.add_lora(transformer, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    cogvideox.save_lora(run_dir / "checkpoint-000002", transformer, 4, 4.0)
    upstream = {
        "train": StageResult("train", "run-i2v", str(run_dir)),
        "check": _check(tmp_path / "check", sample_videos),
    }

    suite = evaluate.load_suite(cfg, upstream)
    assert suite.image_to_video and list(suite.paired.clip_id) == ["clip1", "clip2"]
    result = evaluate.run_evaluate(Workspace(cfg.workspace), cfg, upstream)
    assert result.counts == {"checkpoints_evaluated": 1, "checkpoints_total": 1, "videos": 4}
    out = Path(result.path)
    for unit in ("base", "checkpoint-000002"):
        assert evaluate.read_video(out / unit / "p01-s42.mp4", ec).shape == (9, 64, 64, 3)
        assert (out / unit / "contact_sheet.png").is_file()
    # Prompt i's image is its held-out clip's first frame, at evaluate's size.
    ev = evaluate.prepare(Workspace(cfg.workspace), cfg, "k", upstream, lambda note: None)
    first = resize_center_crop(read_frames(sample_videos["shapes_02.mp4"], [0.0]), 64, 64)[0]
    assert np.array_equal(ev.requests[1].image, first) and ev.requests[1].clip_id == "clip2"
    # Validation during training starts prompt i from the same image.
    from cogpipe.validation import heldout_images

    images = heldout_images(cfg, ec, upstream["check"])
    assert len(images) == 2 and np.array_equal(images[1], first)

    # Sizes the model cannot take and conditioned modes are refused before anything loads.
    wide = cfg.model_copy(update={"evaluate": ec.model_copy(update={"width": 128})})
    with pytest.raises(ValueError, match="evaluate.height/width 64x128: the model's learned"):
        evaluate.load_suite(wide, upstream)
    tic = cfg.model_copy(update={"train": cfg.train.model_copy(update={"mode": "tic-ft"})})
    with pytest.raises(ValueError, match="train.mode tic-ft: its evaluation is text-to-video"):
        evaluate.load_suite(tic, upstream)


def test_validation_samples_an_image_to_video_model(tmp_path, tiny_family, tiny_models, images):
    from cogpipe import validation
    from cogpipe.models import cogvideox

    model = tiny_family["i2v"]
    ec = EvaluateConfig(
        prompts=[PROMPT],
        seeds=[42],
        steps=2,
        frames=9,
        device="cpu",
        clip_model=str(tiny_models["clip"]),
        **SIZE,
    )
    cfg = PipelineConfig(workspace=tmp_path / "ws", model=str(model), evaluate=ec)
    with pytest.raises(ValueError, match="takes its images from check's held-out clips"):
        validation.prepare(cfg, "cpu", torch.float32)  # no check stage has run
    transformer = cogvideox.load_transformer(str(model), "cpu", torch.float32)
    cogvideox.add_lora(transformer, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    videos = {}
    for name, path in images.items():
        image = sampling.read_image(path, 64, 64)
        v = validation.prepare(cfg, "cpu", torch.float32, images=[image])
        validation.run(v, transformer, tmp_path / name, step=1)
        videos[name] = evaluate.read_video(
            tmp_path / name / "validation/step-000001/p00-s42.mp4", ec
        )
    assert videos["red"].shape == (9, 64, 64, 3)
    assert not np.array_equal(videos["red"], videos["blue"])  # the image reached the model
    with pytest.raises(ValueError, match="1 validation images for 2 prompts"):
        two = cfg.model_copy(update={"evaluate": ec.model_copy(update={"prompts": [PROMPT] * 2})})
        validation.prepare(two, "cpu", torch.float32, images=[image])


@pytest.mark.parametrize("mode", ["ic-lora", "tic-ft"])
def test_conditioned_sampling_on_cogvideox_15_pads_as_training_does(tiny_family, mode):
    """5 latent frames (17 video frames) and a temporal patch of 2: training puts a copy of
    the first frame in front of the reference and of the target (ic-lora) or of the whole
    sequence (tic-ft); sampling feeds the same layout and returns the unpadded frames."""
    import torch
    from diffusers import DiffusionPipeline

    from cogpipe import sampling
    from cogpipe.config import EvaluateConfig, TicFtConfig
    from cogpipe.models.cogvideox import pad_frames

    pipe = DiffusionPipeline.from_pretrained(tiny_family["1.5"])
    fields = tiny_sampling(prompts=["a slap"], seeds=[1], frames=17, height=32, width=32)
    settings = EvaluateConfig(**fields, fps=8, clip_model="unused")
    video = np.random.default_rng(0).integers(0, 256, (17, 32, 32, 3), dtype=np.uint8)
    layout = TicFtConfig(condition_frames=1, buffer_frames=2, target_frames=2)
    condition = sampling.Condition(mode, frames=video, layout=layout if mode == "tic-ft" else None)
    request = sampling.request_for(settings, "a slap", 1, condition=condition)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    try:
        out = sampling.sample(pipe, request)
    finally:
        handle.remove()
    fed = 12 if mode == "ic-lora" else 6  # (5 + 1) + (5 + 1), or 5 + 1
    assert seen and all(x.shape[1] == fed for x in seen)
    if mode == "ic-lora":
        reference = sampling.condition_latents(pipe, request, 5, "cpu", torch.float32)
        assert all(torch.equal(x[:1, :6], pad_frames(reference, 2)) for x in seen)
        assert out.shape == (17, 32, 32, 3)
    else:
        assert all(torch.equal(x[:, 0], x[:, 1]) for x in seen)  # the padded condition frame
        assert out.shape == (8, 32, 32, 3)  # 2 target latent frames, as on CogVideoX 1.0


def test_the_base_store_keys_an_image_to_video_video_on_its_image(demo_config):
    from types import SimpleNamespace

    from cogpipe.base_suite import base_key

    cfg = demo_config()
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    key = lambda image: base_key(cfg, SimpleNamespace(prompt="a slap", seed=1, image=image))  # noqa: E731
    assert key(None) == base_key(cfg, SimpleNamespace(prompt="a slap", seed=1))  # t2v: as before
    assert len({key(None), key(red), key(blue)}) == 3
    assert key(red) == key(red.copy())
