# pmfl coordinator: the SuperLink (TLS + site authentication, state in /coordinator/state) and the
# `pmfl coordinator` commands. Build from the repository root:
#   docker build -f docker/coordinator.Dockerfile -t pmfl-coordinator .
FROM python:3.11-slim

# CPU-only torch keeps the image small; pass --build-arg TORCH_INDEX=... for another build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The whole source tree (see coordinator.Dockerfile.dockerignore): `flwr run` builds the study app
# from /opt/pmfl, and the sites approve the hash of exactly this tree.
WORKDIR /opt/pmfl
COPY . /opt/pmfl
RUN pip install /opt/pmfl \
    && useradd --system --uid 10001 --home-dir /coordinator pmfl \
    && mkdir -p /coordinator /ca && chown pmfl:pmfl /coordinator /ca

USER pmfl
VOLUME ["/coordinator"]
# One HTTPS port carries Flower's Fleet, Control and Runtime APIs.
EXPOSE 8000
ENTRYPOINT ["pmfl", "coordinator"]
CMD ["start", "/coordinator", "--host", "0.0.0.0", "--port", "8000"]
