"""docker/: what can be checked without a Docker daemon or registry here. Both images
install through scripts/setup.sh (which `make` runs, so CI runs their install steps), and
every cogpipe command in compose.yaml parses with this checkout's CLI."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cogpipe.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def stages(dockerfile: str) -> dict[str, str]:
    """{target name: its instructions}."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", dockerfile, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cpu_and_gpu_images_install_through_the_setup_script():
    targets = stages((ROOT / "docker" / "Dockerfile").read_text())
    assert set(targets) == {"source", "cpu", "gpu"}
    for copied in re.findall(r"^COPY ([^-]\S*(?: \S+)*) \S+$", targets["source"], flags=re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), f"COPY {path} is not in the checkout"
    assert "COPY scripts" in targets["source"] and "COPY cogpipe" in targets["source"]
    for name in ["cpu", "gpu"]:
        body = targets[name]
        assert "COPY --from=source /opt/cogpipe /opt/cogpipe" in body, name
        assert re.search(r"^RUN .*scripts/setup\.sh", body, flags=re.M | re.S), name
    assert "--index-url https://download.pytorch.org/whl/cpu" in targets["cpu"]
    assert 'EXTRAS="dev,gpu"' in targets["gpu"]


def test_compose_runs_server_on_postgres_setup_and_one_worker_per_pool():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    server = services["server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    assert all(p.startswith("127.0.0.1:") for p in server["ports"])  # loopback unless changed
    for name in ["setup", "cpu-worker", "gpu-worker"]:
        command = services[name]["command"]
        assert command[0] == "cogpipe", name
        build_parser().parse_args(command[1:])  # exits (fails the test) if it does not parse
    assert services["cpu-worker"]["command"][-1] == "cpu"
    assert services["gpu-worker"]["command"][-1] == "gpu"
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # The token comes from the environment, never baked into the file.
    assert services["gpu-worker"]["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
