"""Each private API of another library that cogpipe.compat uses is still there and still
does what compat relies on; and no module outside compat reaches for one. An upgrade that
moves one fails here, by name."""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from cogpipe import compat

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"cogpipe/compat.py"}
OWN = {"self", "cls", "os"}  # os._exit is documented public API


def private_uses(path: Path) -> list[str]:
    """`x._name` attribute reads on anything but self/cls (and a namedtuple's _replace)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        base = ast.unparse(node.value)
        if node.attr.startswith("__") or node.attr == "_replace" or base in OWN:
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {base}.{node.attr}")
    return found


def test_no_private_library_attribute_outside_compat():
    libraries = ("torch", "argparse", "pipe", "transformers", "diffusers", "peft", "prefect")
    hits = []
    for folder in ("cogpipe", "tasks", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if str(path.relative_to(ROOT)) not in ALLOWED:
                hits += [h for h in private_uses(path) if h.split(": ")[1].startswith(libraries)]
    assert not hits, hits


def test_diffusers_execution_device_is_where_the_modules_are():
    from diffusers import DiffusionPipeline, ModelMixin

    class Net(ModelMixin):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    class Tiny(DiffusionPipeline):
        def __init__(self, net):
            super().__init__()
            self.register_modules(net=net)

    assert isinstance(inspect.getattr_static(DiffusionPipeline, "_execution_device"), property)
    assert compat.execution_device(Tiny(Net())) == torch.device("cpu")


def test_dynamo_config_holds_the_recompile_limit():
    assert isinstance(compat.dynamo_config().recompile_limit, int)


def test_help_formatter_keeps_long_command_names_beside_their_help():
    parser = argparse.ArgumentParser(prog="x", formatter_class=compat.HelpFormatter)
    sub = parser.add_subparsers(metavar="COMMAND")
    sub.add_parser("evaluate-checkpoints", help="its one line of help")  # argparse: 2 lines
    sub.add_parser("b", help="short")
    assert "    evaluate-checkpoints    its one line of help" in parser.format_help()
    for name in ("_current_indent", "_indent_increment", "_action_max_length"):
        assert hasattr(compat.HelpFormatter("x"), name), name


def test_prefect_file_lease_storage_lists_its_leases(tmp_path):
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    storage = ConcurrencyLeaseStorage(tmp_path)
    assert asyncio.run(compat.lease_expiration_index(storage)) == {}


def test_numpy_frames_overrides_match_the_video_processor_methods():
    from transformers.video_processing_utils import BaseVideoProcessor

    for name in ("_prepare_input_videos", "_preprocess"):
        theirs = set(inspect.signature(getattr(BaseVideoProcessor, name)).parameters)
        ours = inspect.signature(getattr(compat.NumpyFrames, name)).parameters
        named = {p for p, v in ours.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
        assert named <= theirs | {"self"}, f"{name}: {named - theirs} no longer passed"
        assert theirs - {"self", "kwargs"} <= set(ours) | {"kwargs"}, f"{name}: new parameters"


def test_numpy_frames_prepares_channels_first_rgb():
    frames = np.zeros((2, 5, 6, 1), np.uint8)  # [F, H, W, C] grey
    (out,) = compat.NumpyFrames()._prepare_input_videos([frames])
    assert out.shape == (2, 3, 5, 6)


@pytest.mark.parametrize("module", ["cogpipe.vlm", "cogpipe.sampling", "tasks.lease_storage"])
def test_callers_import_their_private_uses_from_compat(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    imported = [
        n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
    ]
    assert "cogpipe.compat" in imported
