# loraplex gateway image: the gateway only (no torch, no engine). Pair it with the upstream
# vLLM image (vllm/vllm-openai) on GPU nodes; see docs/deploy.md.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY router ./router
COPY adapters ./adapters
COPY loadtest ./loadtest
RUN pip install --no-cache-dir --prefix=/install . \
    && rm -rf /install/lib/python3.11/site-packages/adapters/tools

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="loraplex" \
      org.opencontainers.image.description="OpenAI-compatible multi-adapter LoRA gateway for vLLM"
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin loraplex \
    && mkdir -p /var/lib/loraplex/adapters \
    && chown -R 10001 /var/lib/loraplex
# Registry (SQLite by default; PostgreSQL via LORAPLEX_REGISTRY__URL for several replicas) and
# the adapter cache live on a volume the engine pods mount at the same path. The adapters
# directory exists in the image so that a fresh Docker volume mounted there is owned by the
# gateway user (deploy/docker-compose.yml).
WORKDIR /var/lib/loraplex
USER 10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LORAPLEX_REGISTRY__URL=sqlite+aiosqlite:////var/lib/loraplex/registry.db \
    LORAPLEX_REGISTRY__CACHE_DIR=/var/lib/loraplex/adapters \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8080 \
    LORAPLEX_ENGINE__MODE=remote
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["loraplex", "serve"]
