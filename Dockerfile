# LesionTrack production image.
#   docker build -t lesiontrack .                                  # CPU torch wheel (default)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t lesiontrack:cuda .
# Run: docker run -p 11112:11112 -p 8080:8080 -v lesiontrack-data:/data lesiontrack
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
# Empty = PyPI's default wheel for the platform; set to a PyTorch CPU/CUDA index to choose the build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    LESIONTRACK_DATA_DIR=/data \
    LESIONTRACK_HTTP__BIND_ADDRESS=0.0.0.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk curl \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --system --create-home --uid 10001 lesiontrack \
 && mkdir -p /data && chown lesiontrack:lesiontrack /data

WORKDIR /opt/lesiontrack
COPY constraints.txt pyproject.toml README.md ./
COPY lesiontrack ./lesiontrack
COPY dicom_node ./dicom_node
COPY pipeline ./pipeline
COPY models ./models
COPY db ./db
COPY config ./config
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -c constraints.txt '.[scale,models]' \
 && pip install --no-cache-dir -c constraints.txt --no-deps 'dynamic-network-architectures>=0.3' \
      'icon-registration==1.1.9' 'unigradicon==1.0.6'

USER lesiontrack
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["lesiontrack", "serve"]
