"""Config loading: defaults, validation messages, path resolution, shipped files."""

import re
from pathlib import Path

import pytest
import yaml

from cogpipe.config import ConfigError, PipelineConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_published_cogvideox_guidance():
    cfg = PipelineConfig()
    assert (cfg.train.rank, cfg.train.alpha) == (128, 64)
    assert cfg.train.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.train.lr_scheduler == "cosine_with_restarts"
    assert cfg.train.max_grad_norm == 1.0
    assert (cfg.precompute.frames, cfg.precompute.fps) == (49, 8)
    assert (cfg.precompute.height, cfg.precompute.width) == (480, 720)
    assert "slap" in cfg.caption.prompt


def test_wrong_value_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  rank: -3\nprecompute:\n  frames: 48\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message
    assert "train.rank" in message
    assert "precompute" in message and "4k+1" in message


@pytest.mark.parametrize(
    "text, message",
    [
        ("precompute:\n  frame_buckets: [30]\n", "8k+1 frame counts"),
        ("precompute:\n  frame_buckets: [57]\n", "8k+1 frame counts from 9 up to frames"),
        ("precompute:\n  windows: 0\n", "windows must be first, all or a number"),
        ("check:\n  max_duration: 5\n", "longer than check.max_duration"),
        (
            "train:\n  mode: tic-ft\nprecompute:\n  frames: 61\n  frame_buckets: [33]\n",
            "tic-ft needs every sample at its layout's frame count",
        ),
        (
            "evaluate:\n  prompts: heldout\ntrain:\n  validation_every: 100\n",
            "with evaluate.prompts: heldout there is no prompt list",
        ),
        ("caption:\n  existing: maybe\n", "caption.existing"),
    ],
)
def test_data_settings_that_cannot_work_fail_at_load(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n  learning_rate: 1e39\n",
            "train.learning_rate: Input should be less than or equal to 1 (got 1e39)",
        ),
        (
            "train:\n  learning_rate: .inf\n",
            "train.learning_rate: Input should be a finite number (got inf)",
        ),
        ("train:\n  betas: [0.9, 1.5]\n", "train.betas.1: Input should be less than 1 (got 1.5)"),
        (
            "train:\n  weight_decay: 3\n",
            "train.weight_decay: Input should be less than or equal to 1 (got 3)",
        ),
        (
            "evaluate:\n  guidance: .nan\n",
            "evaluate.guidance: Input should be a finite number (got nan)",
        ),
    ],
)
def test_an_absurd_number_fails_at_load_in_one_line_naming_the_field(tmp_path, text, message):
    """1e39 used to pass validation and overflow in the optimizer."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"


def test_unknown_field_is_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("caption:\n  promt: hello\n")
    with pytest.raises(ConfigError, match="caption.promt"):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text(
        "workspace: ws\nmodel: ./m\ningest:\n  source: ../videos\ncaption:\n  model: org/name\n"
    )
    cfg = load_config(path)
    assert cfg.workspace == tmp_path / "sub" / "ws"
    assert cfg.ingest.source == tmp_path / "videos"
    assert cfg.model == str(tmp_path / "sub" / "m")
    assert cfg.caption.model == "org/name"  # a hub id stays a hub id


def test_dump_round_trips(tmp_path):
    cfg = PipelineConfig()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again.train == cfg.train and again.caption == cfg.caption


def test_unkeyed_fields_do_not_enter_the_key():
    a = PipelineConfig().caption
    b = a.model_copy(update={"device": "cuda:1", "dtype": "float16"})
    assert a.key_fields() == b.key_fields()
    assert "device" not in a.key_fields()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.model


def test_deployment_parameters_validate_against_their_flows():
    """Every deployment's entrypoint loads, and its parameters validate against the flow's
    signature as the server does when the UI submits them."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    pools = {}
    for deployment in spec["deployments"]:
        module, _, fn = deployment["entrypoint"].partition(":")
        assert (ROOT / module).is_file(), module
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        # A run supplies its config: the form a file, the pipeline its stage runs the whole.
        run = {"config": {}} if deployment["name"] == "gpu" else {"config_file": "demo/demo.yaml"}
        params = flow.validate_parameters((deployment.get("parameters") or {}) | run)
        assert params.get("config_file") or isinstance(params["config"], PipelineConfig)
        pools[deployment["name"]] = deployment["work_pool"]["name"]
        for schedule in deployment.get("schedules", []):
            assert schedule["timezone"] and schedule["cron"], deployment["name"]
    assert pools == {
        "pipeline": "cpu",
        "gpu": "gpu",
        "train-sweep": "cpu",
        "evaluate-checkpoints-nightly": "gpu",
    }
    # The pipeline starts its GPU stages on the deployment named after the gpu pool.
    pipeline = next(d for d in spec["deployments"] if d["name"] == "pipeline")
    assert pipeline["parameters"]["gpu_pool"] in pools


def test_precision_follows_the_model_type_whatever_the_config_form():
    from types import SimpleNamespace

    import torch

    from cogpipe.models.cogvideox import weight_dtype

    five_b = {"use_rotary_positional_embeddings": True}
    assert weight_dtype("auto", five_b, "cuda") == torch.bfloat16
    assert weight_dtype("auto", SimpleNamespace(**five_b), "cuda") == torch.bfloat16
    assert weight_dtype("auto", {}, "cuda") == torch.float16
    assert weight_dtype("auto", five_b, "cpu") == torch.float32
    assert weight_dtype("bf16", {}, "cpu") == torch.bfloat16


def test_moving_a_model_folder_keeps_its_fingerprint(tmp_path):
    import shutil

    from cogpipe.workspace import model_fingerprint

    (tmp_path / "a" / "vae").mkdir(parents=True)
    (tmp_path / "a" / "vae" / "config.json").write_text("{}")
    (tmp_path / "a" / "vae" / "weights.bin").write_bytes(bytes(range(256)) * 20_000)  # 5 MB
    before = model_fingerprint(str(tmp_path / "a"))
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert model_fingerprint(str(tmp_path / "b")) == before
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # a copy: new mtimes, same contents
    assert model_fingerprint(str(tmp_path / "c")) == before
    weights = bytearray((tmp_path / "c" / "vae" / "weights.bin").read_bytes())
    weights[-10] ^= 1  # new weights in place, same size
    (tmp_path / "c" / "vae" / "weights.bin").write_bytes(weights)
    assert model_fingerprint(str(tmp_path / "c")) != before
    assert model_fingerprint("THUDM/CogVideoX-2b") == {"id": "THUDM/CogVideoX-2b", "revision": None}


def test_a_prompt_file_replaces_the_prompt_and_keys_its_text(tmp_path):
    from cogpipe.caption import key_of

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.txt").write_text("Describe the knockout in 60 words.\n")
    (tmp_path / "prompts" / "strict.txt").write_text("Only the knockout, 60 words.\n")
    path = tmp_path / "c.yaml"
    path.write_text(
        "caption:\n  prompt_file: prompts/mine.txt\nfilter:\n  retry_prompt_file: prompts/strict.txt\n"
    )
    cfg = load_config(path)
    assert cfg.caption.prompt == "Describe the knockout in 60 words."
    assert cfg.filter.retry_prompt == "Only the knockout, 60 words."
    key = key_of(cfg, {"check": "k"})
    (tmp_path / "prompts" / "mine.txt").write_text("Describe the slap in 60 words.\n")
    assert key_of(load_config(path), {"check": "k"}) != key  # the text is keyed, not the path

    path.write_text("caption:\n  prompt_file: prompts/missing.txt\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: caption\.prompt_file: cannot read .*missing"):
        load_config(path)
    path.write_text("caption:\n  prompt_file: prompts/mine.txt\n  prompt: Two.\n")
    with pytest.raises(ConfigError, match="give prompt or prompt_file, not both"):
        load_config(path)


def test_shipped_family_configs_train_at_their_models_native_shapes():
    """The 1.5-5B config trains at 81 frames (16k+1 for its temporal patch of 2) and up to
    768x1360 in both orientations; the 5B-I2V config only at the 480x720 its learned
    positional embeddings fix. Both name their model by short name: it must resolve."""
    from cogpipe.models.cogvideox import hub_id

    wide = load_config(ROOT / "configs" / "cogvideox1.5-5b-lora.yaml")
    assert wide.model == hub_id("1.5-5b") == "THUDM/CogVideoX1.5-5B"
    p = wide.precompute
    assert p.frames == 81 and (p.frames - 1) % 16 == 0
    assert {(768, 1360), (1360, 768)} <= set(p.all_buckets())
    assert max(max(b) for b in p.all_buckets()) == 1360
    assert wide.train.mixed_precision == "bf16"
    assert (wide.evaluate.frames, wide.evaluate.height, wide.evaluate.width) == (81, 768, 1360)

    i2v = load_config(ROOT / "configs" / "cogvideox-5b-i2v-lora.yaml")
    assert i2v.model == hub_id("5b-i2v") == "THUDM/CogVideoX-5b-I2V"
    assert i2v.precompute.all_buckets() == [(480, 720)] and i2v.precompute.frames == 49
    assert i2v.evaluate.prompts == "heldout"  # each image comes with its own clip's caption
    assert (i2v.evaluate.frames, i2v.evaluate.height, i2v.evaluate.width) == (49, 480, 720)
    assert i2v.train.mixed_precision == "bf16"


def _hub_transformer_config(model: str) -> dict:
    """A hub model's transformer config.json as bench/train_step.py writes it down (the
    values that differ from diffusers' defaults) over those defaults."""
    import importlib.util
    import inspect

    from diffusers import CogVideoXTransformer3DModel

    path = ROOT / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    params = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return defaults | bench.MODELS[model]


def test_shipped_family_configs_pass_their_models_shape_checks():
    """Precompute's check of the model's traits (cogvideox.check_fits) accepts each shipped
    config with the real config of the model it names, and refuses the 1.5 config's sizes
    for 5B-I2V, whose learned positional embeddings fix 480x720."""
    from cogpipe.models import cogvideox

    vae = {"latent_channels": 16}
    wide = load_config(ROOT / "configs" / "cogvideox1.5-5b-lora.yaml")
    i2v = load_config(ROOT / "configs" / "cogvideox-5b-i2v-lora.yaml")
    wide_shape = cogvideox.model_shape(_hub_transformer_config("1.5-5b"), vae)
    i2v_shape = cogvideox.model_shape(_hub_transformer_config("5b-i2v"), vae)
    assert (wide_shape.temporal_patch, wide_shape.image_to_video) == (2, False)
    assert (i2v_shape.fixed_size, i2v_shape.image_to_video) == ((480, 720), True)
    cogvideox.check_fits(wide, wide_shape)
    cogvideox.check_fits(i2v, i2v_shape)
    with pytest.raises(ConfigError, match="480x720"):
        cogvideox.check_fits(wide, i2v_shape)
