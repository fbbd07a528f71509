"""`cogpipe du` and `cogpipe gc`: a workspace with two kept configs' outputs and a stale
third's; gc frees exactly what only the third made (its stage keys, recaption pass, text
embeddings, training states; its LoRA checkpoints only with --checkpoints), and both kept
configs then run with every stage reused. Then what a user gets wrong: configs of two
workspaces, an empty or missing workspace, a path that is not a config, a running stage,
symlinks out of the workspace."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cogpipe.cli import main
from cogpipe.config import PipelineConfig, dump_config
from cogpipe.disk import in_use
from cogpipe.pipeline import run_all
from cogpipe.workspace import Workspace, read_table

# B's and C's gates reject some of the tiny captioner's random words: a recaption pass each.
KEPT_B = {"filter": {"refusal_phrases": ["vivid"]}, "train": {"learning_rate": 5e-4}}
STALE_C = {
    "caption": {"prompt": "Say what happens in the clip."},
    "filter": {"refusal_phrases": ["quick"]},
}


def write(cfg: PipelineConfig, path: Path) -> str:
    path.write_text(dump_config(cfg))
    return str(path)


def listing(root: Path) -> dict[str, int]:
    """Every file under the workspace (links as links) with its size; lock files aside."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if not rel.startswith(".locks/"):
                out[rel] = path.lstat().st_size
    return out


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gc_frees_exactly_the_stale_configs_outputs(demo_config, tmp_path, capsys):
    a, b, c = demo_config(), demo_config(**KEPT_B), demo_config(**STALE_C)
    files = {n: write(cfg, tmp_path / f"{n}.yaml") for n, cfg in zip("abc", (a, b, c), strict=True)}
    run_all(a)
    run_all(b)
    root = Workspace(a.workspace).root
    kept = listing(root)
    run_all(c)
    stale = {f: s for f, s in listing(root).items() if f not in kept}
    assert any(f.startswith("cache/text/") for f in stale)  # C's own captions' embeddings
    assert any(f.startswith("cache/recaption/") for f in stale)  # C's gate's pass
    assert any(f.startswith("cache/recaption/") for f in kept)  # B's: it stays

    code, out, _ = run_cli(capsys, "du", files["a"], files["b"], "--json")
    usage = json.loads(out)
    assert code == 0 and set(usage["configs"]) == {files["a"], files["b"]}
    used = {i["path"] for i in usage["items"] if i["used_by"]}
    for keys in usage["configs"].values():
        assert f"precompute/{keys['precompute']}" in used and f"train/{keys['train']}" in used
    assert not any(p.startswith(f"caption/{plan_key(c, 'caption')}") for p in used)

    before = listing(root)
    code, out, _ = run_cli(capsys, "gc", files["a"], files["b"], "--dry-run")
    assert code == 0 and listing(root) == before  # a dry run removes nothing
    assert f"would remove caption/{plan_key(c, 'caption')}" in out

    code, out, _ = run_cli(capsys, "gc", files["a"], files["b"])
    left = listing(root)
    run = f"train/{plan_key(c, 'train')}/"
    lora = {f for f in stale if f.startswith(run) and not f.endswith("training_state.pt")}
    evaluation = {
        f for f in stale if f.startswith("evaluate/") and f"/{plan_key(c, 'train')}/" in f
    }
    assert set(left) - set(kept) == lora | evaluation  # no --checkpoints: C's run keeps them
    assert not set(kept) - set(left), set(kept) - set(left)  # nothing the kept configs use
    assert all(left[f] == kept[f] for f in kept if f != "evaluate/index.parquet")
    freed = sum(s for f, s in stale.items() if f not in left)
    assert f"freed {_size(freed)}" in out, out

    code, out, _ = run_cli(capsys, "gc", files["a"], files["b"], "--checkpoints")
    assert code == 0 and set(listing(root)) == set(kept)
    runs = set(read_table(root / "evaluate" / "index.parquet").run)
    assert runs == {plan_key(a, "train"), plan_key(b, "train")}

    for cfg in (a, b):  # both kept configs: every stage reused
        assert all(r.reused for r in run_all(cfg)), [(r.stage, r.reused) for r in run_all(cfg)]


def plan_key(cfg: PipelineConfig, stage: str) -> str:
    from cogpipe.pipeline import stage_keys

    return stage_keys(cfg)[stage]


def _size(n: int) -> str:
    from cogpipe.disk import size

    return size(n)


# --------------------------------------------------------------------------- edge cases


def test_configs_of_two_workspaces_are_refused(demo_config, tmp_path, capsys):
    one = write(demo_config(), tmp_path / "one.yaml")
    other = write(demo_config(workspace=tmp_path / "elsewhere"), tmp_path / "other.yaml")
    (tmp_path / "workspace").mkdir()
    for command in ("du", "gc"):
        code, out, err = run_cli(capsys, command, one, other)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{other}: its workspace {tmp_path / 'elsewhere'} is not" in err


def test_an_empty_or_missing_workspace(demo_config, tmp_path, capsys):
    path = write(demo_config(), tmp_path / "demo.yaml")
    code, _, err = run_cli(capsys, "du", path)
    assert code == 2 and f"workspace {tmp_path / 'workspace'} does not exist" in err
    (tmp_path / "workspace").mkdir()
    code, out, _ = run_cli(capsys, "du", path)
    assert code == 0 and out == f"du: workspace {tmp_path / 'workspace'} is empty\n"
    code, out, _ = run_cli(capsys, "gc", path)
    assert code == 0 and out.strip() == f"gc: freed 0 B in 0 items of {tmp_path / 'workspace'}"


def test_a_path_that_is_not_a_config_is_one_line(tmp_path, capsys, sample_videos):
    prefect = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"
    video = next(iter(sample_videos.values()))
    for path in (tmp_path, tmp_path / "missing.yaml", prefect, video):
        code, _, err = run_cli(capsys, "gc", str(path))
        assert code == 2 and err.startswith(f"cogpipe: error: {path}:"), err
        assert err.count("\n") == 1, err


def test_gc_refuses_while_a_stage_holds_a_lock(demo_config, tmp_path, capsys):
    cfg = demo_config()
    path = write(cfg, tmp_path / "demo.yaml")
    ws = Workspace(cfg.workspace)
    stale = ws.root / "check" / "0123456789ab"
    stale.mkdir(parents=True)
    (stale / "clips.parquet").write_bytes(b"x" * 100)
    with ws.hold("check-0123456789ab"):
        code, _, err = run_cli(capsys, "gc", path)
        assert code == 2 and "check-0123456789ab.lock: held by pid" in err, err
        assert stale.is_dir()
        code, out, _ = run_cli(capsys, "gc", path, "--dry-run")  # reading is fine
        assert code == 0 and "would remove check/0123456789ab (1 file, 100 B)" in out
    with in_use(ws):  # a whole run holds the workspace, between its stages too
        code, _, err = run_cli(capsys, "gc", path)
        assert code == 2 and "workspace.lock: a run or another gc is using" in err, err
    code, out, _ = run_cli(capsys, "gc", path)
    assert code == 0 and not stale.exists() and "freed 100 B in 1 item of" in out, out


def test_gc_removes_links_never_what_they_point_to(demo_config, tmp_path, capsys):
    cfg = demo_config()
    path = write(cfg, tmp_path / "demo.yaml")
    root = Workspace(cfg.workspace).root
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "big.bin").write_bytes(b"y" * 5000)
    (outside / "file.bin").write_bytes(b"z" * 3000)
    stale = root / "filter" / "0123456789ab"
    stale.mkdir(parents=True)
    (stale / "link-to-file").symlink_to(outside / "file.bin")
    (stale / "link-to-folder").symlink_to(outside / "folder")
    (root / "precompute").mkdir()
    (root / "precompute" / "fedcba987654").symlink_to(outside / "folder")
    (root / "cache" / "latents" / "ab").mkdir(parents=True)
    (root / "cache" / "latents" / "ab" / "ab12.safetensors").symlink_to(outside / "file.bin")
    code, out, _ = run_cli(capsys, "du", path)
    assert code == 0 and "5000" not in out and "4.9 KiB" not in out  # links are not followed
    code, out, _ = run_cli(capsys, "gc", path)
    assert code == 0, out
    assert not stale.exists() and not (root / "precompute" / "fedcba987654").is_symlink()
    assert not (root / "cache" / "latents" / "ab" / "ab12.safetensors").is_symlink()
    assert (outside / "folder" / "big.bin").stat().st_size == 5000
    assert (outside / "file.bin").stat().st_size == 3000


def test_an_eval_keys_real_features_stay_while_a_config_evaluates_there(
    demo_config, tmp_path, capsys
):
    from cogpipe.pipeline import UPSTREAM, stage_keys, stage_path

    cfg = demo_config()
    path = write(cfg, tmp_path / "demo.yaml")
    ws = Workspace(cfg.workspace)
    keys = stage_keys(cfg)
    inputs = {up: keys[up] for up in UPSTREAM["evaluate"]}
    used = stage_path(ws, cfg, "evaluate", keys["evaluate"], inputs).parent  # evaluate/<ekey>
    stale = ws.root / "evaluate" / "0123456789ab"
    for folder in (used, stale):
        folder.mkdir(parents=True)
        (folder / "real-features-abc.npy").write_bytes(b"f" * 64)
    code, out, _ = run_cli(capsys, "gc", path)
    assert code == 0 and "removed evaluate/0123456789ab/real-features-abc.npy" in out, out
    assert (used / "real-features-abc.npy").is_file() and not stale.exists()
