# normserve runtime image: onnxruntime serving the BN-folded default models over V2 and V1.
#
#   docker build -t normserve:dev .                                # trains and exports the models
#   docker build --build-arg MODELS=context -t normserve:dev .     # or copies ./model_repository
#   docker run -p 8000:8000 normserve:dev [--workers 2 ...]
#
# torch lives only in the `models-train` stage; the runtime stage holds the pinned serving
# dependencies (requirements/serve.txt), the `service` package and the repository.

# Fully qualified so that every engine (docker, podman, buildah) resolves the same image.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
# "train": a build stage with CPU torch trains and exports the repository (needs no host
# set-up). "context": copy ./model_repository from the build context, as built on the host.
ARG MODELS=train

# ---- serving dependencies, in a virtual environment that the runtime stage copies whole ----
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only the lock file first: code changes do not invalidate this (slow) layer.
COPY requirements/serve.txt /tmp/serve.txt
# --no-deps: the lock is the whole closure, so pip installs exactly it and nothing more.
# pip and setuptools go afterwards; the runtime never installs anything.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps --requirement /tmp/serve.txt \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && find /opt/venv -depth -type d \( -name tests -o -name __pycache__ \) -path '*/site-packages/*' -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- the model repository, trained and exported with CPU torch (MODELS=train) ----
FROM ${PYTHON_IMAGE} AS models-train
# Where CPU torch comes from. The default index serves the CPU build; PyPI's torch for Linux
# is a multi-GB CUDA build. A local wheel: --build-arg TORCH_PIP_ARGS="--find-links DIR".
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first, alone: the largest download gets its own cached layer. The pin is pyproject's.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install ${TORCH_PIP_ARGS} torch==2.13.0
# The rest of the export closure (onnx, onnxscript, scikit-learn, ...), pinned like the serving
# one (`make lock` writes both): the same sources train and export the same models.
# --no-deps installs exactly the lock; `pip check` proves it is whole, torch's needs included.
COPY requirements/export.txt /tmp/export.txt
RUN /opt/build/bin/pip install --no-deps --requirement /tmp/export.txt \
 && /opt/build/bin/pip check
# Run from the source tree (WORKDIR /src), not installed: nothing of this stage but /models
# reaches the runtime image.
COPY models ./models
COPY export ./export
COPY service ./service
RUN /opt/build/bin/python -m export build --repository /models --checkpoints /tmp/checkpoints

# ---- or the repository built on the host (MODELS=context) ----
FROM ${PYTHON_IMAGE} AS models-context
COPY model_repository /models

# A stage chosen by MODELS, not an image from a registry: there is no tag to pin.
# hadolint ignore=DL3006
FROM models-${MODELS} AS models

# ---- runtime: slim Python, serving dependencies, service code, models; non-root ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="normserve" \
      org.opencontainers.image.description="BatchNorm/LayerNorm models on onnxruntime over the Open Inference Protocol (V2) and V1 JSON"
# A fixed numeric user: Kubernetes' runAsNonRoot can verify a number, not a name.
RUN groupadd --system --gid 10001 normserve \
 && useradd --system --uid 10001 --gid normserve --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin normserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NORMSERVE_HOST=0.0.0.0 \
    NORMSERVE_PORT=8000 \
    NORMSERVE_GRPC_PORT=8001 \
    NORMSERVE_REPOSITORY=/models \
    NORMSERVE_LOG_FORMAT=json \
    ORT_DISABLE_TELEMETRY=1
COPY --from=deps /opt/venv /opt/venv
COPY --from=models /models /models
COPY service /app/service
# Byte-code compiled at build time: faster cold start, nothing written at run time, so the
# root file system can be mounted read-only. Files stay root-owned: the server cannot alter them.
# Installed into the venv, not found through the working directory: a .pth file in its
# site-packages puts /app on sys.path for the venv's python3 in any directory (the ENTRYPOINT,
# the HEALTHCHECK, `docker exec`, a pod's workingDir).
RUN python3 -m compileall -q /app/service \
 && python3 -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_path('purelib'), 'normserve.pth').write_text('/app\n')"
WORKDIR /
USER 10001:10001
# HTTP (REST) and the Open Inference Protocol's gRPC API.
EXPOSE 8000 8001
# The slim image has no curl: a standard-library probe of /v2/health/ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-m", "service.healthcheck"]
# Exec form: python is PID 1 and receives SIGTERM itself, so uvicorn drains and exits 0.
# Threads per onnxruntime session follow the container's CPU quota (cgroup cpu.max) unless
# NORMSERVE_INTRA_OP_THREADS says otherwise. Arguments after the image name are flags.
ENTRYPOINT ["python3", "-m", "service"]
