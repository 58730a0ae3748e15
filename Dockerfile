# MammoFL image for every role of the federation (SuperLink with its ServerApp, hospital SuperNodes, the
# coordinator's `flwr` CLI): Python 3.11, the pinned dependencies of requirements.lock and the project itself.
# Used by docker-compose.yml. Nothing is installed at run time: Flower's runtime dependency installation is off.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    OMP_NUM_THREADS=1

WORKDIR /opt/mammofl
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations ./simulations
RUN pip install --no-deps --no-build-isolation . && mammofl-coordinator --help > /dev/null

# An unprivileged user owning the folders that named volumes are created from (node state, SuperLink database,
# run directories). Build with --build-arg UID=<uid> so that mounted key files readable only by their owner
# (mode 0600, as `mammofl-coordinator` writes them) belong to this user.
ARG UID=1000
RUN useradd --uid "${UID}" --create-home --shell /usr/sbin/nologin mammofl \
    && mkdir -p /state /work/runs \
    && chown mammofl:mammofl /state /work/runs
USER mammofl
ENV FLWR_HOME=/home/mammofl/.flwr
WORKDIR /work
