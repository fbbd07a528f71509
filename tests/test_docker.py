"""docker/: what can be checked without a Docker daemon. Both images install through
scripts/setup.sh (which `make` runs, so CI runs their install steps), every cogpipe command
in compose.yaml parses with this checkout's CLI, GPU workers hold distinct slots, and the
build context leaves environments, data and history out. `make docker-test`
(scripts/docker_test.sh, run by .ci/run) builds the images and runs the stack for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cogpipe.cli import build_parser
from cogpipe.gpus import GPU_IDS_ENV, slot_names

ROOT = Path(__file__).resolve().parent.parent


def stages(dockerfile: str) -> dict[str, str]:
    """{target name: its instructions}."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", dockerfile, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cpu_and_gpu_images_install_through_the_setup_script():
    targets = stages((ROOT / "docker" / "Dockerfile").read_text())
    assert set(targets) == {"source", "deps", "cpu", "gpu"}
    copied = {}  # {stage: the checkout's paths it copies}
    for name in ["source", "deps"]:
        lines = re.findall(r"^COPY ([^-]\S*(?: \S+)*) \S+$", targets[name], flags=re.M)
        copied[name] = {path for line in lines for path in line.split()}
        for path in copied[name]:
            assert (ROOT / path).exists(), f"COPY {path} is not in the checkout"
    assert {"scripts", "cogpipe"} <= copied["source"]
    # The dependency layer reads no source, so a source change reuses it.
    assert copied["deps"] == {
        "pyproject.toml",
        "scripts/setup.sh",
        "docker/install.sh",
        "docker/standins.py",
    }
    install = (ROOT / "docker" / "install.sh").read_text()
    assert re.search(r"^PIP_FIND_LINKS=/wheels VENV=/opt/venv scripts/setup\.sh$", install, re.M)
    for name in ["cpu", "gpu"]:
        body = targets[name]
        deps = body.index("COPY --from=deps /opt/cogpipe ./")
        run = re.search(r"^RUN (?:.*\\\n)*.*docker/install\.sh$", body, flags=re.M).start()
        source = body.index("COPY --from=source /opt/cogpipe /opt/cogpipe")
        assert deps < run < source, name
    assert "--index-url https://download.pytorch.org/whl/cpu" in targets["cpu"]
    assert 'EXTRAS="dev,gpu"' in targets["gpu"]


def gpu_workers(compose: dict) -> dict[str, dict]:
    return {k: v for k, v in compose["services"].items() if k.startswith("gpu-worker")}


def test_compose_runs_server_on_postgres_setup_and_one_worker_per_pool():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    server = services["server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    assert all(p.startswith("127.0.0.1:") for p in server["ports"])  # loopback unless changed
    workers = gpu_workers(compose)
    assert list(workers) == ["gpu-worker-0"]
    for name in ["setup", "cpu-worker", *workers]:
        command = services[name]["command"]
        assert command[0] == "cogpipe", name
        build_parser().parse_args(command[1:])  # exits (fails the test) if it does not parse
    assert services["cpu-worker"]["command"][-1] == "cpu"
    worker = workers["gpu-worker-0"]
    assert worker["command"][-1] == "gpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # The token comes from the environment, never baked into the file.
    assert worker["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"


def worker_slots(service: dict) -> list[str]:
    """The GPU slots a gpu-worker service's worker names: each container sees its GPUs as
    0..n-1 (what `cogpipe worker` finds there), under the service's hostname."""
    (reserved,) = service["deploy"]["resources"]["reservations"]["devices"]
    seen = [str(i) for i in range(len(reserved["device_ids"]))]
    return slot_names(seen, host=service["hostname"], env=service["environment"])


def test_each_gpu_worker_holds_its_own_slot_named_after_the_hosts_gpu():
    """One worker per GPU, as compose.yaml's header says to add them: every container sees
    its GPU as device 0, yet each names the host's GPU it holds, so their slots differ and
    N workers run N jobs at once (the same name would serialise them)."""
    text = (ROOT / "docker" / "compose.yaml").read_text()
    first = gpu_workers(yaml.safe_load(text))["gpu-worker-0"]
    assert worker_slots(first) == ["gpu:gpu-0:0"]
    # The header's recipe for a second GPU, pasted under `services:` as it says.
    recipe = re.search(r"^#   (gpu-worker-1:\n(?:#     .*\n)+)", text, flags=re.M).group(1)
    service = "".join("  " + line.removeprefix("#   ") + "\n" for line in recipe.splitlines())
    two = yaml.safe_load(text.replace("\nservices:\n", "\nservices:\n" + service, 1))
    second = gpu_workers(two)["gpu-worker-1"]
    assert worker_slots(second) == ["gpu:gpu-1:1"]
    assert second["command"] == first["command"]
    assert second["environment"]["PREFECT_API_URL"] == first["environment"]["PREFECT_API_URL"]
    assert second["hostname"] != first["hostname"]  # temporaries and locks name their host
    assert second["deploy"] != first["deploy"]


def test_gpu_ids_name_the_slots_and_must_match_the_workers_gpus():
    assert slot_names(["0"], host="h", env={}) == ["gpu:h:0"]
    assert slot_names(["0", "1"], host="h", env={GPU_IDS_ENV: "2,3"}) == ["gpu:h:2", "gpu:h:3"]
    assert slot_names([], host="h", env={}) == ["gpu:h:cpu"]
    with pytest.raises(ValueError, match=f"{GPU_IDS_ENV}='2,3' names 2 GPU"):
        slot_names(["0"], host="h", env={GPU_IDS_ENV: "2,3"})


def in_context(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative, /-separated) is sent to the build by .dockerignore's
    `patterns`, as Docker reads them: the last matching pattern wins, `!` re-includes, a
    pattern matching a folder matches what is in it, `*` stays within one folder."""
    parts = path.split("/")
    sent = True
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            sent = keep
    return sent


def test_build_context_leaves_out_environments_data_caches_and_history():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (?!--)(.+) \S+$", dockerfile, flags=re.M)
    mounted = re.findall(r"source=([\w/]+)", dockerfile)
    wanted = [p for line in copied for p in line.split()] + mounted
    wanted += ["cogpipe/cli.py", "docker/postgres-entrypoint.sh", "docker/wheels/torch.whl"]
    for path in wanted:
        assert in_context(path, patterns), f"{path} is not in the build context"
    left_out = [
        ".venv/bin/python",
        "demo/demo.yaml",
        "workspace/ingest",
        ".git/HEAD",
        ".whl/torch.whl",
        "build/docker-test/compose.yaml",
        ".cogpipe-serve/prefect",
        "cogpipe/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
        ".pytest_cache",
    ]
    for path in left_out:
        assert not in_context(path, patterns), f"{path} is sent to the build"
