# LesionTrack production image, built from the wheel that tests/test_packaging.py installs and runs outside the tree.
#   docker build -t lesiontrack .                                       # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu126 -t lesiontrack:cuda .  # CUDA torch (run with --gpus all)
# Run: docker run -p 11112:11112 -p 8080:8080 -v lesiontrack-data:/data lesiontrack
# Scale-out site (SCP + HTTP, workers, PostgreSQL, Redis): deploy/compose.yaml, docs/deploy.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- stage 1: the wheel (only what pyproject.toml packages goes in; .dockerignore keeps tests/docs/benches out) ---
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- stage 2: the runtime: torch of the chosen variant, the wheel with its dependencies, nothing from the tree ---
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA build of the PyTorch index (cu126, cu128, ...): the wheel brings its CUDA libraries; the host
# needs only the NVIDIA driver and the container toolkit.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LESIONTRACK_DATA_DIR=/data \
    LESIONTRACK_HTTP__BIND_ADDRESS=0.0.0.0 \
    LESIONTRACK_HTTP__PORT=8080 \
    LESIONTRACK_DICOM__PORT=11112

# dcmtk: DICOM tools for operators inside the container; curl: the health check. The base image tag fixes the
# Debian release; its security updates are wanted, so the packages are not pinned to a version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk curl \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 lesiontrack \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/lesiontrack --create-home lesiontrack \
 && mkdir -p /data && chown 10001:10001 /data

COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /tmp/wheels
# torch first from the chosen index (never a resolver's CUDA pick for the CPU image), then the wheel with its
# dependencies, then the engines that declare torchvision but import only torch (installed without dependencies).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && wheel="$(find /tmp/wheels -name 'lesiontrack-*.whl')" \
 && pip install --no-cache-dir -c /tmp/constraints.txt "${wheel}[scale,models]" \
 && pip install --no-cache-dir -c /tmp/constraints.txt --no-deps 'dynamic-network-architectures>=0.3' \
      'icon-registration==1.1.9' 'unigradicon==1.0.6' \
 && rm -rf /tmp/wheels /tmp/constraints.txt \
 && lesiontrack --version

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${LESIONTRACK_HTTP__PORT}/health || exit 1"]
ENTRYPOINT ["lesiontrack"]
# One container owns its database: bring the schema up to this version's head (Alembic) at start. The scale-out
# deployment (deploy/compose.yaml) runs `lesiontrack db upgrade` once instead, before any service starts.
CMD ["serve", "--upgrade-db"]
