"""Validation before work (`cogpipe.preflight`) and the one-line messages of what only a
stage can find: a stage left with nothing, a load that fails, a full disk, a read-only
workspace, a rejection that must clear. Every message is asserted whole.

No test touches the network: hub ids are looked up in a hub cache of the test's own, and
"unreachable" is a closed port on 127.0.0.1. A read-only file system and a full disk are
real ones, mounted in a private mount namespace (`unshare -m`) where that is allowed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from cogpipe.config import ConfigError, PipelineConfig
from cogpipe.errors import EmptyStage, ModelLoadError, describe, is_permanent
from cogpipe.preflight import preflight
from cogpipe.workspace import SUCCESS, read_table

VIDEO_KINDS = ".avi/.m4v/.mkv/.mov/.mp4/.webm"
LISTS = "a folder or a list of videos (.csv, .jsonl, .json, or a .txt of paths)"


@pytest.fixture
def videos(sample_videos, tmp_path) -> Path:
    """Three good sample clips in a folder of their own."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        shutil.copy(sample_videos[f"shapes_0{i}.mp4"], folder)
    return folder


@pytest.fixture
def cogvideox(tiny_models, tmp_path) -> Path:
    """A copy of the tiny CogVideoX folder, for a test to break."""
    return Path(shutil.copytree(tiny_models["cogvideox"], tmp_path / "cogvideox"))


def failure(cfg: PipelineConfig, until: str = "evaluate") -> str:
    with pytest.raises(ConfigError) as e:
        preflight(cfg, until)
    return str(e.value)


# --------------------------------------------------------------------------- sources


def test_the_demo_config_passes(demo_config):
    preflight(demo_config(), "evaluate")


def test_a_source_without_videos_names_the_field_and_the_path(demo_config, tmp_path):
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "readme.txt").write_text("no videos here\n")
    (notes / "blank.mp4").write_bytes(b"")
    missing = tmp_path / "missing"
    assert failure(demo_config(ingest={"source": str(missing)})) == (
        f"ingest.source {missing} does not exist"
    )
    assert failure(demo_config(ingest={"source": str(empty)})) == (
        f"ingest.source {empty} holds no files (folder layout): nothing to ingest"
    )
    assert failure(demo_config(ingest={"source": str(notes)})) == (
        f"ingest.source {notes} holds no video: 2 files, none a readable {VIDEO_KINDS} file"
    )


def test_a_binary_source_is_a_clear_error_and_status_says_so(demo_config, tmp_path, capsys):
    from cogpipe.cli import main

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64 + b"\x00" * 100)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    assert failure(demo_config(ingest={"source": str(binary)})) == (
        f"ingest.source {binary} is a binary file, not {LISTS}"
    )
    assert failure(demo_config(ingest={"source": str(video)})) == (
        f"ingest.source {video} is a video file, not {LISTS}: give the folder that holds it"
    )
    path = tmp_path / "binary.yaml"
    path.write_text(
        yaml.safe_dump(demo_config(ingest={"source": str(binary)}).model_dump(mode="json"))
    )
    assert main(["status", str(path)]) == 0  # status reads what it can, and says why not
    assert (
        capsys.readouterr().out == f"error: ingest.source {binary} is a binary file, not {LISTS}\n"
    )
    assert main(["ingest", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"cogpipe: error: ingest.source {binary} is a binary file, not {LISTS}\n"
    )


# --------------------------------------------------------------------------- empty stages


def test_an_ingest_of_no_video_fails_naming_why_and_is_not_done(sample_videos, tmp_path):
    from cogpipe.pipeline import run_stage, status

    source = tmp_path / "bad"
    source.mkdir()
    shutil.copy(sample_videos["corrupt.mp4"], source)
    shutil.copy(sample_videos["notes.txt"], source)
    (source / "empty.mp4").write_bytes(b"")
    cfg = PipelineConfig(workspace=tmp_path / "ws", ingest={"source": source})
    with pytest.raises(EmptyStage) as e:
        run_stage(cfg, "ingest")
    assert str(e.value) == (
        f"ingest: no video in ingest.source {source}: 3 files, every one rejected"
        " (cannot open as video (1), empty file (1), not a video file (1))"
    )
    assert is_permanent(e.value) and describe(e.value) == str(e.value)
    assert not status(cfg)["ingest"]["done"]
    folder = next((tmp_path / "ws" / "ingest").iterdir())
    assert not (folder / SUCCESS).exists() and len(read_table(folder / "videos.parquet")) == 3


def test_a_check_that_rejects_every_clip_names_the_top_reasons(sample_videos, tmp_path):
    from cogpipe.pipeline import run_stage, status

    source = tmp_path / "dark"
    source.mkdir()
    for name in ("black.mp4", "frozen.mp4"):
        shutil.copy(sample_videos[name], source)
    cfg = PipelineConfig(
        workspace=tmp_path / "ws", ingest={"source": source}, precompute={"frames": 9}
    )
    run_stage(cfg, "ingest")
    with pytest.raises(EmptyStage) as e:
        run_stage(cfg, "check")
    assert str(e.value) == (
        "check: no clip kept: 2 clips of 2 videos, every one rejected (black frames (1), frozen (1))"
    )
    assert not status(cfg)["check"]["done"]


# --------------------------------------------------------------------------- models


def test_a_missing_weight_file_names_the_file_and_the_field(demo_config, cogvideox):
    import torch

    from cogpipe.models.cogvideox import load_transformer, load_vae

    vae = cogvideox / "vae" / "diffusion_pytorch_model.safetensors"
    transformer = cogvideox / "transformer" / "diffusion_pytorch_model.safetensors"
    vae.rename(vae.with_suffix(".moved"))
    expected = f"model: {vae} is missing (the vae weights)"
    assert failure(demo_config(model=str(cogvideox)), "precompute") == expected
    with pytest.raises(ModelLoadError) as e:  # the loader says the same, not `.bin` in the root
        load_vae(str(cogvideox), "cpu", torch.float32)
    assert str(e.value) == expected

    vae.with_suffix(".moved").rename(vae)
    transformer.unlink()
    assert failure(demo_config(model=str(cogvideox)), "train") == (
        f"model: {transformer} is missing (the transformer weights)"
    )
    with pytest.raises(ModelLoadError, match="transformer weights"):
        load_transformer(str(cogvideox), "cpu", torch.float32)


def test_a_sharded_model_needs_every_shard_its_index_lists(demo_config, cogvideox):
    from safetensors.torch import load_file, save_file

    folder = cogvideox / "transformer"
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(weights)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    preflight(demo_config(model=str(cogvideox)), "train")
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    assert failure(demo_config(model=str(cogvideox)), "train") == (
        f"model: {folder}/diffusion_pytorch_model-00002-of-00002.safetensors is missing (the"
        " transformer weights, listed in diffusion_pytorch_model.safetensors.index.json)"
    )


def test_a_folder_of_another_model_names_the_field_and_the_type(
    demo_config, tiny_models, cogvideox
):
    from cogpipe.vlm import load_captioner

    clip = tiny_models["clip"]
    expected = (
        f"caption.model: {clip}/config.json has model type 'clip', not a supported captioner (llava,"
        " llava_next, llava_next_video, llava_onevision)"
    )
    assert failure(demo_config(caption={"model": str(clip)}), "caption") == expected
    with pytest.raises(ModelLoadError) as e:  # the loader names the field too
        load_captioner(str(clip), None, "cpu", "auto")
    assert str(e.value) == expected and is_permanent(e.value)
    assert failure(demo_config(evaluate={"clip_model": str(tiny_models["llava"])})) == (
        f"evaluate.clip_model: {tiny_models['llava']}/config.json has model type 'llava', not a"
        " CLIP model (clip)"
    )
    config = cogvideox / "transformer" / "config.json"
    config.write_text(
        json.dumps(json.loads(config.read_text()) | {"_class_name": "FluxTransformer2DModel"})
    )
    assert failure(demo_config(model=str(cogvideox)), "precompute") == (
        f"model: {config} has class 'FluxTransformer2DModel', not CogVideoXTransformer3DModel"
    )
    (cogvideox / "model_index.json").unlink()
    assert failure(demo_config(model=str(cogvideox)), "precompute") == (
        f"model: {cogvideox}/model_index.json is missing (the config of a CogVideoX pipeline)"
    )
    missing = cogvideox.parent / "nowhere"
    assert failure(demo_config(caption={"model": str(missing)}), "caption") == (
        f"caption.model: {missing} does not exist (neither a folder nor a hub id)"
    )


def test_models_are_checked_only_for_the_stages_to_run(demo_config, hub_cache):
    cfg = demo_config(evaluate={"clip_model": "openai/clip-vit-base-patch32"})
    preflight(cfg, "train")  # evaluate's model is not needed before evaluate
    assert failure(cfg).startswith("evaluate.clip_model: openai/clip-vit-base-patch32 is neither")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_models) -> Path:
    """A hub cache holding `org/llava` (the tiny LLaVA) as the hub's layout stores it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--llava"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_models["llava"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_offline_must_be_in_the_local_cache(demo_config, hub_cache):
    preflight(demo_config(caption={"model": "org/llava"}), "caption")
    assert failure(demo_config(caption={"model": "org/other"}), "caption") == (
        f"caption.model: org/other is neither a folder nor in the local hub cache ({hub_cache}),"
        " and HF_HUB_OFFLINE is set"
    )
    snapshot = next((hub_cache / "models--org--llava" / "snapshots").iterdir())
    (snapshot / "model.safetensors").unlink()
    assert failure(demo_config(caption={"model": "org/llava"}), "caption") == (
        "caption.model: org/llava has no model.safetensors in the local hub cache (the weights),"
        " and HF_HUB_OFFLINE is set"
    )


def test_a_hub_id_online_fails_fast_when_the_hub_cannot_be_reached(
    demo_config, hub_cache, monkeypatch
):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    assert failure(demo_config(caption={"model": "org/other"}), "caption") == (
        f"caption.model: org/other is neither a folder nor in the local hub cache ({hub_cache}),"
        " and the hub (http://127.0.0.1:9) cannot be reached: connection refused"
    )
    assert time.monotonic() - started < 10
    preflight(demo_config(caption={"model": "org/llava"}), "caption")  # cached: no hub needed


# --------------------------------------------------------------------------- workspace


def _unshared(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`script` (sh) in a private mount namespace; skips where mounting is not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", str(tmp_path)], capture_output=True
    )
    if probe.returncode:
        pytest.skip(f"cannot mount in a private namespace: {probe.stderr.decode().strip()}")
    env = os.environ | {"PYTHON": sys.executable}
    return subprocess.run(
        ["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_read_only_workspace_fails_before_any_work(demo_config, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_config(workspace=workspace).model_dump(mode="json")))
    proc = _unshared(
        f"mount --bind {workspace} {workspace}; mount -o remount,ro,bind {workspace}\n"
        f'exec "$PYTHON" -m cogpipe.cli ingest {path}',
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == f"cogpipe: error: workspace: {workspace} is not writable (read-only file system)\n"
    )
    assert not any(workspace.iterdir())


def test_a_workspace_this_user_may_not_write_fails_naming_it(tmp_path):
    """Root writes anywhere, so the check runs in a child that became 'nobody'."""
    from cogpipe.preflight import check_workspace

    folder = Path(tempfile.mkdtemp(prefix="cogpipe-ws-"))
    try:
        folder.chmod(0o555)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop root, check, report, exit
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                check_workspace(folder / "ws")
                os.write(write_end, b"passed")
            except BaseException as e:  # the parent's assertion shows it
                os.write(write_end, str(e).encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            assert f.read() == f"workspace: {folder / 'ws'} is not writable (permission denied)"
    finally:
        shutil.rmtree(folder)


def test_a_full_disk_is_named_with_the_file_and_the_space_left(tmp_path):
    """Writes to a 256 KiB file system: a Parquet table (pyarrow's error has no file name)
    and a torch file (torch says only `unexpected pos`) both read as a full disk."""
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        import pandas as pd, torch
        from cogpipe.errors import describe, is_permanent, writing
        from cogpipe.workspace import write_table

        root = Path(sys.argv[1])
        table = pd.DataFrame({"a": [os.urandom(1024) for _ in range(1024)]})  # 1 MiB
        writes = {"t.parquet": lambda path: write_table(path, table),
                  "w.pt": lambda path: torch.save({"w": torch.randn(200_000)}, path)}
        for name, write in writes.items():
            try:
                with writing(root / name):
                    write(root / name)
            except Exception as e:
                print(describe(e), is_permanent(e))
    """)
    (tmp_path / "full.py").write_text(script)
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = _unshared(
        f'mount -t tmpfs -o size=256k tmpfs {disk}\nexec "$PYTHON" {tmp_path / "full.py"} {disk}',
        tmp_path,
    )
    assert proc.stdout.splitlines() == [
        f"disk full writing {disk / 't.parquet'} (0 MiB free) True",
        f"disk full writing {disk / 'w.pt'} (0 MiB free) True",
    ], proc.stderr


def test_describe_names_the_file_of_a_read_only_or_forbidden_path():
    assert describe(OSError(errno.EROFS, "Read-only file system", "/ws/x")) == (
        "/ws/x: read-only file system"
    )
    assert describe(PermissionError(errno.EACCES, "Permission denied", "/ws/x")) == (
        "/ws/x: permission denied"
    )
    wrapped = RuntimeError("caption failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/ws/caption/part")
    assert describe(wrapped) == "/ws/caption/part: permission denied" and is_permanent(wrapped)
    assert not is_permanent(ConnectionError("reset by peer"))


def test_no_task_retries_a_permanent_failure():
    """A read-only workspace failed caption three times (reloading the model each time)."""
    from prefect import Task
    from prefect.states import Failed

    import cogpipe_tasks.caption
    import cogpipe_tasks.evaluate
    import cogpipe_tasks.precompute
    import cogpipe_tasks.recaption
    import cogpipe_tasks.remote
    import cogpipe_tasks.train
    from cogpipe.sources import SourceError

    modules = [
        cogpipe_tasks.caption,
        cogpipe_tasks.evaluate,
        cogpipe_tasks.precompute,
        cogpipe_tasks.recaption,
        cogpipe_tasks.remote,
        cogpipe_tasks.train,
    ]
    tasks = [t for m in modules for t in vars(m).values() if isinstance(t, Task) and t.retries]
    assert len(tasks) >= 8
    permanent = [
        PermissionError(errno.EACCES, "Permission denied", "/ws/caption/k/part-000.parquet"),
        OSError(errno.EROFS, "Read-only file system", "/ws/caption"),
        OSError(errno.ENOSPC, "No space left on device", "/ws/train"),
        ModelLoadError("caption.model: cannot load x"),
        SourceError("ingest.source /x is a binary file"),
        EmptyStage("check: no clip kept"),
    ]
    for task in tasks:
        assert task.retry_condition_fn is not None, task.name
        for error in permanent:
            assert not task.retry_condition_fn(task, None, Failed(data=error)), (task.name, error)
        assert task.retry_condition_fn(task, None, Failed(data=ConnectionError("reset")))
        transient = ModelLoadError("caption.model: cannot load x: couldn't connect", transient=True)
        assert task.retry_condition_fn(task, None, Failed(data=transient)), task.name


# --------------------------------------------------------------------------- rejections clear


def test_a_longer_timeout_probes_again_the_files_that_timed_out(videos, tmp_path):
    from cogpipe.pipeline import run_stage, status

    def ingest(timeout: float):
        cfg = PipelineConfig(
            workspace=tmp_path / "ws", ingest={"source": videos, "timeout": timeout, "workers": 1}
        )
        result = run_stage(cfg, "ingest")
        table = read_table(Path(result.path) / "videos.parquet").set_index("path")
        return cfg, result, table

    first = sorted(videos.iterdir())[0]
    moved = first.rename(tmp_path / first.name)  # probed later, under a tiny timeout
    ingest(120)
    moved.rename(first)
    cfg, short, table = ingest(1e-4)  # the others come from the probe cache
    assert table.loc[str(first), "reason"] == "probe failed: timed out after 0.0001s"
    assert short.counts["probed"] == 1 and status(cfg)["ingest"]["done"]

    cfg, longer, table = ingest(120)  # a longer timeout: a new key, that file probed again
    assert longer.key != short.key and not longer.reused and longer.counts["probed"] == 1
    assert (table.status == "ok").all()
    assert status(cfg)["ingest"]["key"] == longer.key and status(cfg)["ingest"]["done"]
    _, again, _ = ingest(1e-4)  # the short timeout's result stays what it was
    assert again.key == short.key and again.reused


def test_a_fixed_permission_probes_the_file_again(videos, tmp_path):
    """An unreadable file is a listing error (so fixing it changes the key), and a failed
    read cached by an earlier version is probed again. Root reads anything, so the listing
    is made in a child that became 'nobody'."""
    from cogpipe.ingest import PROBE_COLUMNS, key_of
    from cogpipe.pipeline import run_stage
    from cogpipe.workspace import write_table

    shared = Path(tempfile.mkdtemp(prefix="cogpipe-perm-"))
    try:
        shared.chmod(0o755)
        source = Path(shutil.copytree(videos, shared / "videos"))
        locked = sorted(source.iterdir())[0]
        cfg = PipelineConfig(workspace=tmp_path / "ws", ingest={"source": source})

        def as_nobody() -> tuple[str, str]:
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    from cogpipe.sources import list_source

                    errors = {p: e for p, *_, e in list_source(cfg)}
                    os.write(write_end, json.dumps([errors[str(locked)], key_of(cfg)]).encode())
                except BaseException as e:
                    os.write(write_end, json.dumps([repr(e), ""]).encode())
                os._exit(0)
            os.close(write_end)
            os.waitpid(pid, 0)
            with os.fdopen(read_end) as f:
                return tuple(json.load(f))

        if os.geteuid() == 0:
            locked.chmod(0o000)
            error, before = as_nobody()
            locked.chmod(0o644)
            fixed, after = as_nobody()
            assert (error, fixed) == ("permission denied", "") and before != after

        st = locked.stat()  # a failed read in the probe cache, as an older version kept it
        row = dict.fromkeys(PROBE_COLUMNS) | {
            "status": "rejected",
            "reason": "cannot read file: Permission denied",
        }
        cache = tmp_path / "ws" / "cache" / "probe" / "probes.parquet"
        import pandas as pd

        write_table(
            cache,
            pd.DataFrame(
                [{"path": str(locked), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **row}]
            ),
        )
        result = run_stage(cfg, "ingest")
        table = read_table(Path(result.path) / "videos.parquet").set_index("path")
        assert table.loc[str(locked), "status"] == "ok" and result.counts["probed"] == 3
    finally:
        shutil.rmtree(shared)
