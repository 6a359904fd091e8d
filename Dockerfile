# syntax=docker/dockerfile:1.7
# One image recipe for the suite. SERVICE selects the service's extra, so the gateway image never
# carries the model server's torch. Two final targets:
#   cpu  (default)  docker build --build-arg SERVICE=gateway -t aistack/gateway .
#   cuda            docker build --build-arg SERVICE=model --target cuda -t aistack/model:cuda .
# Bases are pinned to exact versions; pin digests too in your registry mirror if you have one.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# -- build: a virtualenv with the service's extra, no compilers or caches in the final image ------
FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services

FROM build-base AS build-cpu
ARG SERVICE=gateway
# The CPU build of torch (the model extra pins torch==2.13.0) comes from PyTorch's CPU index.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[${SERVICE}]" \
 && python -m compileall -q /opt/venv

FROM build-base AS build-cuda
ARG SERVICE=model
# PyTorch's CUDA wheels bundle the CUDA runtime and cuDNN (nvidia-* wheels); the host only needs
# the NVIDIA driver and container toolkit. Pick another CUDA line with TORCH_INDEX.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --extra-index-url ${TORCH_INDEX} ".[${SERVICE}]" \
 && python -m compileall -q /opt/venv

# -- runtime: slim, non-root, nothing but the virtualenv ---------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE=gateway
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/aistack aistack \
 && mkdir -p /models /data && chown aistack:aistack /models /data
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SERVICE=${SERVICE} \
    HF_HUB_OFFLINE=1 MODEL_REPOSITORY=/models
WORKDIR /home/aistack
USER 10001:10001
STOPSIGNAL SIGTERM
# Every service listens on 0.0.0.0 in a container; the port comes from <SERVICE>_PORT.
CMD ["sh", "-c", "exec python -m services.${SERVICE}"]

FROM runtime AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
# Read by the NVIDIA container toolkit: expose the GPU and the driver's compute libraries.
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The default target (last stage): the CPU image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
