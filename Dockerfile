# syntax=docker/dockerfile:1.7
# One image recipe for the suite; SERVICE selects the service's extra, so the gateway image
# never carries the model server's torch. Build: docker build --build-arg SERVICE=model .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG SERVICE=gateway
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# The CPU build of torch (the model extra pins torch==2.13.0) comes from PyTorch's CPU index.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[${SERVICE}]"

FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE=gateway
RUN useradd --system --uid 10001 --create-home --home-dir /home/aistack aistack \
 && mkdir -p /models /data && chown aistack:aistack /models /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 SERVICE=${SERVICE} HF_HUB_OFFLINE=1 \
    MODEL_REPOSITORY=/models
WORKDIR /home/aistack
USER 10001
# Every service listens on 0.0.0.0 in a container; the port comes from <SERVICE>_PORT.
CMD ["sh", "-c", "exec python -m services.${SERVICE}"]
