"""`cogpipe generate` on the tiny CogVideoX: files, prompt sources, LoRA scale, clear errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, cli_flags, tiny_sampling
from test_evaluate import make_lora

from cogpipe import evaluate, generate, sampling
from cogpipe.cli import main
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.sweep import read_video
from cogpipe.video import probe_video

PROMPT = "A fighter slaps his opponent and the crowd cheers."


@pytest.fixture
def tiny(tiny_models) -> list[str]:
    """Flags for a fast generation on the tiny model (2 steps, 9 frames, 64x64, CPU)."""
    return cli_flags(model=tiny_models["cogvideox"], **TINY_VIDEO)


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> Path:
    """A LoRA checkpoint folder, saved as training saves it (rank, alpha in the metadata)."""
    folder = tmp_path_factory.mktemp("lora") / "checkpoint-000002"
    make_lora(tiny_models["cogvideox"], folder, seed=0)
    return folder


def options(tiny_models, **fields) -> GenerateOptions:
    """Tiny-model options on the CPU; `fields` override any of them (the device too)."""
    return GenerateOptions(**tiny_sampling(model=str(tiny_models["cogvideox"])) | fields)


def test_generate_writes_mp4_of_asked_frames_and_size(tmp_path, tiny, capsys):
    out = tmp_path / "clips" / "slap.mp4"
    flags = ["--frames", "17", "--height", "48", "--width", "80", "--fps", "12"]
    assert main(["generate", "--prompt", PROMPT, "--output", str(out), *tiny, *flags]) == 0
    info, reason = probe_video(out)
    assert reason == ""
    assert (info["frames"], info["height"], info["width"]) == (17, 48, 80)
    assert info["fps"] == pytest.approx(12)
    path, seconds = capsys.readouterr().out.split()  # one line per video: path, seconds
    assert path == str(out) and seconds.endswith("s") and float(seconds[:-1]) >= 0
    assert [p.name for p in out.parent.iterdir()] == ["slap.mp4"]  # no temporary left


def test_prompt_file_and_prompts_dir(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "slap.txt").write_text("A fighter slaps\n  his opponent.\n")
    (tmp_path / "prompts" / "cheer.txt").write_text("The crowd cheers.")
    (tmp_path / "prompts" / "notes.md").write_text("not a prompt")
    assert generate.read_prompts(prompt_file="slap") == {"slap": "A fighter slaps his opponent."}
    assert generate.read_prompts(prompt_file="prompts/cheer.txt") == {"cheer": "The crowd cheers."}
    assert generate.read_prompts(prompts_dir="prompts") == {
        "cheer": "The crowd cheers.",
        "slap": "A fighter slaps his opponent.",
    }
    assert generate.read_prompts(prompt=PROMPT) == {
        "a-fighter-slaps-his-opponent-and-the-crowd": PROMPT
    }

    assert main(["generate", "--prompts-dir", "prompts", "--output", "out", *tiny]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cheer.mp4", "slap.mp4"]
    assert capsys.readouterr().out.splitlines()[0].startswith("out/cheer.mp4 ")
    assert main(["generate", "--prompt-file", "slap", *tiny]) == 0  # default folder
    assert (tmp_path / "generated" / "slap.mp4").is_file()


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text(" \n")
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        (tmp_path / "two" / f"{name}.txt").write_text(PROMPT)
    cases = {
        ("--prompt-file", "missing"): "--prompt-file missing: no such file (looked for "
        "prompts/missing.txt or missing)",
        ("--prompt-file", "blank.txt"): "blank.txt: empty prompt file",
        ("--prompts-dir", "empty"): "--prompts-dir empty: no .txt prompt files in it",
        ("--prompts-dir", "nowhere"): "--prompts-dir nowhere: no such folder",
        ("--prompts-dir", "two", "--output", "x.mp4"): "there are 2 prompts: give a folder",
        ("--prompt", "x", "--model", str(tmp_path / "nope")): "no such model folder",
        ("--prompt", "x", "--model", str(tmp_path)): "not a diffusers model folder",
        ("--prompt", "x", "--lora", str(tmp_path / "empty")): "the folder holds no "
        "pytorch_lora_weights.safetensors",
        ("--prompt", "x", "--frames", "10"): "--frames: must be 8k+1 (9, 17, 25, 33, 41, 49)",
        ("--prompt", "x", "--frames", "13"): "--frames: must be 8k+1 (9, 17, 25, 33, 41, 49): "
        "the VAE would decode 13 frames as 16",
        ("--prompt", "x", "--width", "72"): "--width: must be a multiple of 16, got 72",
        ("--prompt", "x", "--steps", "0"): "--steps: Input should be greater than or equal to 1",
    }
    for args, message in cases.items():
        assert main(["generate", *tiny, *args]) == 2, args  # the last --model counts
        err = capsys.readouterr().err
        assert err.startswith("cogpipe: error: ") and message in err, (args, err)
    assert not (tmp_path / "generated").exists()


def test_offload_and_compile_are_refused_on_cpu(tiny, capsys):
    for flags, message in [
        (["--offload", "model"], "--offload model needs a CUDA GPU (--device cpu)"),
        (["--offload", "sequential"], "--offload sequential needs a CUDA GPU"),
        (["--compile"], "--compile needs a CUDA GPU"),
    ]:
        assert main(["generate", "--prompt", PROMPT, *tiny, *flags]) == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        opts = GenerateOptions(offload="model")  # device auto
        with pytest.raises(GenerateError, match=r"needs a CUDA GPU \(no CUDA GPU found\)"):
            generate.check_device(opts, "cpu")


def test_lora_changes_the_video_and_scale_zero_is_the_base(tmp_path, tiny_models, lora, tiny):
    base_opts = options(tiny_models)
    base_pipe = generate.load(base_opts)
    base = generate.generate_one(base_pipe, PROMPT, base_opts)
    assert base.shape == (9, 64, 64, 3) and base.dtype == np.uint8

    tuned_opts = options(tiny_models, lora=lora)
    pipe = generate.load(tuned_opts)
    tuned = generate.generate_one(pipe, PROMPT, tuned_opts)
    assert np.abs(tuned.astype(int) - base).mean() > 1.0  # pixels, 0-255
    off = generate.generate_one(pipe, PROMPT, options(tiny_models, lora=lora, lora_scale=0.0))
    np.testing.assert_array_equal(off, base)
    half = generate.generate_one(pipe, PROMPT, options(tiny_models, lora=lora, lora_scale=0.5))
    assert 0 < np.abs(half.astype(int) - base).mean() < np.abs(tuned.astype(int) - base).mean()
    np.testing.assert_array_equal(generate.generate_one(pipe, PROMPT, tuned_opts), tuned)
    # Scale 1 is the checkpoint as evaluate loads it: the video its evaluation writes.
    with evaluate.lora(base_pipe, lora, "step_000002"):
        ec = generate.sampler_settings(tuned_opts)
        np.testing.assert_array_equal(evaluate.generate(base_pipe, ec, PROMPT, 42, "cpu"), tuned)

    # The CLI, with the .safetensors file itself: the same video as the folder gives.
    out = tmp_path / "tuned.mp4"
    file = lora / generate.LORA_FILE
    assert (
        main(["generate", "--prompt", PROMPT, "--lora", str(file), "--output", str(out), *tiny])
        == 0
    )
    generate.write_video(tmp_path / "direct.mp4", tuned, 8)
    np.testing.assert_array_equal(read_video(out), read_video(tmp_path / "direct.mp4"))


@pytest.mark.gpu
def test_offload_and_compile_on_gpu(tmp_path, tiny_models, lora):
    """Offloaded pipelines give the plain pipeline's video; compiled blocks come close."""
    plain = options(tiny_models, device="cuda", lora=lora, lora_scale=0.7)
    pipe = generate.load(plain)
    assert pipe.transformer.dtype == torch.float16  # 2B-type on GPU
    reference = generate.generate_one(pipe, PROMPT, plain)
    del pipe
    torch.cuda.empty_cache()
    for fields in ({"offload": "model", "vae_slicing": True}, {"offload": "sequential"}):
        opts = plain.model_copy(update=fields)
        video = generate.generate_one(generate.load(opts), PROMPT, opts)
        np.testing.assert_array_equal(video, reference, err_msg=str(fields))
    for fields in ({"compile": True}, {"compile": True, "offload": "model"}):
        opts = plain.model_copy(update=fields)
        pipe = generate.load(opts)
        video = generate.generate_one(pipe, PROMPT, opts)
        assert np.abs(video.astype(int) - reference).mean() < 2.0, fields
        base = generate.generate_one(pipe, PROMPT, opts.model_copy(update={"lora_scale": 0.0}))
        assert (
            np.abs(base.astype(int) - reference).mean() > 1.0
        )  # the scale reaches compiled blocks


def test_a_step_cache_reaches_the_sampler_and_is_removed_after(tiny_models):
    exact_opts = options(tiny_models, steps=3)
    pipe = generate.load(exact_opts)
    exact = generate.generate_one(pipe, PROMPT, exact_opts)
    # A threshold this high reuses every step after the first.
    cached_opts = options(tiny_models, steps=3, step_cache="first_block", step_cache_threshold=1e6)
    assert not np.array_equal(generate.generate_one(pipe, PROMPT, cached_opts), exact)
    np.testing.assert_array_equal(generate.generate_one(pipe, PROMPT, exact_opts), exact)


def test_the_step_cache_flag_writes_the_video_the_sampler_makes_with_that_request(
    tmp_path, tiny_models, tiny
):
    out = tmp_path / "cached.mp4"
    flags = ["--steps", "3", "--step-cache", "first_block", "--step-cache-threshold", "1e6"]
    assert main(["generate", "--prompt", PROMPT, "--output", str(out), *tiny, *flags]) == 0
    assert probe_video(out)[1] == ""
    opts = options(tiny_models, steps=3, step_cache="first_block", step_cache_threshold=1e6)
    opts = generate.fit_model(opts)  # the model's fps, as generate_one fits them
    request = sampling.request_for(opts, PROMPT, opts.seed)
    assert (request.step_cache, request.step_cache_threshold) == ("first_block", 1e6)
    pipe = generate.load(opts)
    for name, req in [("cached", request), ("exact", replace(request, step_cache="none"))]:
        generate.write_video(tmp_path / f"{name}-sampler.mp4", sampling.sample(pipe, req), opts.fps)
    got = read_video(out)
    np.testing.assert_array_equal(got, read_video(tmp_path / "cached-sampler.mp4"))
    assert not np.array_equal(got, read_video(tmp_path / "exact-sampler.mp4"))


def test_speed_options_that_cannot_run_are_refused_with_the_reason(tiny, capsys):
    for flags, message in [
        (["--fp8-linears"], "--fp8-linears needs a CUDA GPU (--device cpu)"),
        (["--compile", "--step-cache", "pab"], "pab with compile re-traces the compiled blocks"),
        (["--fp8-linears", "--offload", "model"], "fp8_linears with offload model: the linears"),
    ]:
        assert main(["generate", "--prompt", PROMPT, *tiny, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_fp8_linears_are_made_before_the_lora_loads(tiny_models, lora, monkeypatch):
    """The CPU cannot run FP8: the device check is stubbed so that load reaches it, and
    `speed.fp8_linears` is seen as it runs (then as it refuses the CPU, with its reason)."""
    from cogpipe.models import speed

    seen = []

    def record(transformer) -> int:
        seen.append(hasattr(transformer, "peft_config"))  # a LoRA loaded already?
        return 0

    monkeypatch.setattr(generate, "check_device", lambda options, device: None)
    monkeypatch.setattr(speed, "fp8_linears", record)
    pipe = generate.load(options(tiny_models, lora=lora, fp8_linears=True))
    assert seen == [False] and generate.ADAPTER in pipe.transformer.peft_config
    monkeypatch.undo()
    monkeypatch.setattr(generate, "check_device", lambda options, device: None)
    with pytest.raises(GenerateError, match="--fp8-linears: fp8_linears needs a CUDA GPU"):
        generate.load(options(tiny_models, fp8_linears=True))
