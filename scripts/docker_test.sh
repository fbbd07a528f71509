#!/usr/bin/env bash
# `make docker-test`: build the images of docker/ and run the compose stack here, with no
# container registry and no GPU. Installs Docker when missing (Debian's docker.io, and
# docker-compose when no `docker compose` plugin is there), starts dockerd when it is not
# running, then:
#   1. the base image `cogpipe-base:bookworm` (Debian bookworm made with debootstrap from the
#      host's Debian mirror, carrying the host's CA certificates; kept, built once),
#   2. the cpu image, and the gpu target built with the CPU torch (its Dockerfile stage is
#      checked; its image serves the CPU-backed "gpu" worker), and a PostgreSQL image,
#   3. docker/compose.yaml as this machine can run it (build/docker-test/compose.yaml: the
#      local PostgreSQL image, no GPU reservation): PostgreSQL, the Prefect server on it,
#      setup, a cpu worker and a gpu worker,
#   4. the demo data in the shared volume, the demo pipeline submitted through the API and
#      waited for (its run and every GPU stage run must complete),
#   5. the stack and its volumes removed, also on failure (trap).
# Each step prints its time. A second run reuses the base image and Docker's build cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${COGPIPE_DOCKER_PROJECT:-cogpipe-docker-test}
BASE_IMAGE=cogpipe-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=build/docker-test
RUN_TIMEOUT_S=${COGPIPE_DOCKER_RUN_TIMEOUT_S:-900}  # the demo pipeline, submitted to its end
PY=${PYTHON:-.venv/bin/python}
export DOCKER_BUILDKIT=1
# Debian's docker CLI builds with BuildKit itself; a newer CLI without buildx would not.
DOCKER=$(command -v /usr/bin/docker || command -v docker || true)
t0=$SECONDS

step() { echo "docker-test: $* (at $((SECONDS - t0)) s)"; }

install_docker() {
  local missing=()
  command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ! { [ -n "$DOCKER" ] && "$DOCKER" compose version >/dev/null 2>&1; } \
    && ! command -v docker-compose >/dev/null; then
    missing+=(docker-compose)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
  DOCKER=$(command -v /usr/bin/docker || command -v docker)
  if "$DOCKER" compose version >/dev/null 2>&1; then
    COMPOSE=("$DOCKER" compose)
  else
    COMPOSE=(docker-compose)
  fi
  echo "docker-test: compose is ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null))"
}

start_dockerd() {
  "$DOCKER" info >/dev/null 2>&1 && return
  step "starting dockerd (log: /var/log/cogpipe-dockerd.log)"
  nohup "$(command -v dockerd || echo /usr/sbin/dockerd)" >>/var/log/cogpipe-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    "$DOCKER" info >/dev/null 2>&1 && return
    sleep 1
  done
  tail -20 /var/log/cogpipe-dockerd.log >&2
  echo "docker-test: dockerd did not start within 60 s" >&2
  exit 1
}

base_image() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    return
  fi
  step "building $BASE_IMAGE with debootstrap from $MIRROR"
  local root
  root=$(mktemp -d /var/tmp/cogpipe-base.XXXXXX)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  # The host's own CAs (a TLS-inspecting mirror's included), so pip and apt trust what it does.
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null
  rm -rf "$root"/usr/share/{doc,man,locale}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  tar -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["bash"]' \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$root" "$root.log"
}

torch_wheel() {
  # The CPU torch for the images when this host's pip finds one (a local wheel folder):
  # PyPI's own torch for Linux is the CUDA build, several GB more.
  rm -f docker/wheels/*.whl
  "$PY" -m pip download -q --no-deps -d docker/wheels "torch==2.13.0" 2>/dev/null || true
  if ls docker/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
    TORCH_SPEC="torch==2.13.0"
  else
    rm -f docker/wheels/*.whl
    TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
  fi
}

build_images() {
  local args=(--build-arg "BASE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC")
  step "building cogpipe-cpu"
  "$DOCKER" build -q -f docker/Dockerfile --target cpu "${args[@]}" -t cogpipe-cpu . >/dev/null
  step "building cogpipe-gpu (the gpu target with the CPU torch)"
  "$DOCKER" build -q -f docker/Dockerfile --target gpu "${args[@]}" \
    --build-arg "GPU_BASE=$BASE_IMAGE" -t cogpipe-gpu . >/dev/null
  step "building cogpipe-postgres"
  "$DOCKER" build -q -f docker/postgres.Dockerfile --build-arg "BASE=$BASE_IMAGE" \
    -t cogpipe-postgres . >/dev/null
  # the images these names had before (untagged now), not other projects'
  "$DOCKER" image prune -f --filter label=org.opencontainers.image.title=cogpipe >/dev/null
}

local_compose() {
  # docker/compose.yaml as this machine runs it: images built above (no `build`, no pulls),
  # PostgreSQL from cogpipe-postgres, the gpu workers CPU-backed (no GPU reservation, no
  # host GPU numbers), no host port, and no `name` (the project is given with -p).
  mkdir -p "$WORK"
  "$PY" - docker/compose.yaml "$WORK/compose.yaml" <<'EOF'
import sys

import yaml

compose = yaml.safe_load(open(sys.argv[1]))
compose.pop("name", None)
for key in [k for k in compose if k.startswith("x-")]:
    compose.pop(key)
for name, service in compose["services"].items():
    service.pop("build", None)
    service.pop("ports", None)
    if name.startswith("gpu-worker"):
        service.pop("deploy", None)
        service["environment"].pop("COGPIPE_GPU_IDS", None)
compose["services"]["db"]["image"] = "cogpipe-postgres"
yaml.safe_dump(compose, open(sys.argv[2], "w"), sort_keys=False)
EOF
}

down() {
  "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose.yaml" down -v --remove-orphans >/dev/null 2>&1 || true
}

on_exit() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -f "$WORK/compose.yaml" ]; then
    echo "docker-test: failed (exit $rc); the stack's last log lines:" >&2
    "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose.yaml" logs --tail=40 >&2 2>/dev/null || true
  fi
  [ -f "$WORK/compose.yaml" ] && down
  rm -f docker/wheels/*.whl
  step "done, exit $rc"
}

run_demo() {
  local compose=("${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose.yaml")
  step "starting the stack (PostgreSQL, server, setup, cpu worker, gpu worker)"
  "${compose[@]}" up -d --no-build cpu-worker gpu-worker-0
  step "writing the demo's videos, tiny models and demo.yaml to /data/demo"
  "${compose[@]}" run --rm -T --no-deps cpu-worker \
    python -c "from pathlib import Path; from cogpipe.demo import prepare_demo; prepare_demo(Path('/data/demo'))"
  step "running the demo pipeline through the API (cogpipe submit --wait)"
  timeout "$RUN_TIMEOUT_S" "${compose[@]}" run --rm -T --no-deps cpu-worker \
    cogpipe submit /data/demo/demo.yaml --wait
  step "checking the run and its GPU stage runs"
  "${compose[@]}" run --rm -T --no-deps cpu-worker python - <<'EOF'
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

with get_client(sync_client=True) as api:
    runs = api.read_flow_runs()
    (pipeline,) = [r for r in runs if r.parent_task_run_id is None and r.work_pool_name == "cpu"]
    flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline.id]))
    stages = api.read_flow_runs(flow_run_filter=flt)
    assert pipeline.state.is_completed(), f"pipeline run: {pipeline.state.name}"
    assert stages and {r.work_pool_name for r in stages} == {"gpu"}, stages
    assert all(r.state.is_completed() for r in stages), [(r.name, r.state.name) for r in stages]
    print(f"docker-test: pipeline Completed; GPU stage runs on the gpu worker: "
          f"{', '.join(sorted(r.name for r in stages))}")
EOF
}

install_docker
start_dockerd
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
base_image
torch_wheel
build_images
local_compose
down  # what an interrupted earlier run left
run_demo
