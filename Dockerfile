# syntax=docker/dockerfile:1
# The mirror node agent: python:3.11-slim with the exact versions of requirements.lock in a
# virtual environment, and the project wheel installed with --no-deps so nothing unpinned gets in.
#
#   docker build -t registry.example.com/mirror:0.1.0 .
#   docker run --rm registry.example.com/mirror:0.1.0 run --help
#
# The image runs as the unprivileged user "mirror" (uid 10001) by default, which is enough for
# `--store cache`. Serving a node's containerd or Docker store needs their sockets, which are
# root-owned (mode 0660, group root or docker) and whose access is root on the node anyway: the
# Helm chart and the Nomad job run the container as root with every capability dropped. To stay
# non-root instead, run as uid 10001 with the socket's group added (docker run --group-add GID,
# securityContext.supplementalGroups) and make sure that group can read containerd's content
# directory, or the agent streams blobs through containerd's API instead of sendfile.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# Dependencies first, in their own layer: rebuilt only when the pins change. Every package is in
# requirements.lock, so --no-deps installs exactly the lock. The venv has no pip of its own: the
# base image's pip installs into it (--python), and the final image has no installer in it.
COPY requirements.lock ./
RUN python -m venv --without-pip /opt/mirror \
 && pip --python /opt/mirror/bin/python install --no-deps --only-binary=:all: -r requirements.lock \
 # The lock also pins the test and code-generation tools; they are not needed to run.
 && pip --python /opt/mirror/bin/python uninstall -y \
        pytest pytest-asyncio pluggy iniconfig packaging Pygments ruff grpcio-tools \
        kubernetes-validate jsonschema jsonschema-specifications referencing rpds-py \
        importlib_resources PyYAML

# The project itself, as a wheel, without dependencies: they are all installed above.
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip --python /opt/mirror/bin/python install --no-deps /wheels/mirror-*.whl \
 # Fails the build if the lock lacks anything the project (or a dependency) requires.
 && pip --python /opt/mirror/bin/python check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mirror" \
      org.opencontainers.image.description="A cluster-local OCI registry mirror node agent" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/mirror/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# No compiler or build tool was ever installed: every dependency comes as a wheel
# (--only-binary), and only the finished virtual environment is copied from the build stage.
COPY --from=build /opt/mirror /opt/mirror
RUN groupadd --system --gid 10001 mirror \
 && useradd --system --uid 10001 --gid mirror --no-create-home --home-dir /var/lib/mirror \
        --shell /usr/sbin/nologin mirror \
 && install -d -o mirror -g mirror -m 0750 /var/lib/mirror \
 && mirror --version
USER 10001:10001
WORKDIR /var/lib/mirror
# 5000/tcp registry API, 5001/udp DHT router, 9090/tcp metrics.
EXPOSE 5000/tcp 5001/udp 9090/tcp
ENTRYPOINT ["mirror"]
CMD ["run"]
