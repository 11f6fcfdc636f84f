# pmfl hospital site: the SuperNode (outbound HTTPS to the coordinator, authenticated by the site's
# key) and the site's gate, which runs only the study app the hospital approved.
# Build from the repository root:
#   docker build -f docker/site.Dockerfile -t pmfl-site .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The source tree travels with the image so that the hospital can review it and compute the hash
# it approves (`pmfl site approve /site --app /opt/pmfl`); the code that runs is the approved FAB.
WORKDIR /opt/pmfl
COPY . /opt/pmfl
RUN pip install /opt/pmfl \
    && useradd --system --uid 10001 --home-dir /site pmfl \
    && mkdir -p /site && chown pmfl:pmfl /site

USER pmfl
# The site directory: site.toml, keys/, state/ (accountant + ledger), flwr-home/. Keep it on a
# volume: the privacy budget and ledger must survive restarts and upgrades.
VOLUME ["/site"]
# No EXPOSE: a site only dials out to the coordinator; its runtime port is loopback-only.
ENTRYPOINT ["pmfl", "site"]
CMD ["start", "/site"]
