# The unbroken gateway: a slim, non-root image with a health check.
#   docker build -t unbroken .
#   docker run -p 8788:8788 -e DEEPSEEK_API_KEY -e UNBROKEN_GATEWAY_KEY=sk-choose-one unbroken
# Settings come from the environment (UNBROKEN_*) or a TOML file passed with --config.

FROM python:3.11-slim AS build
# A C compiler for the chunk path compiled with mypyc (tools/compile_native.py), in this
# stage only.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY tools ./tools
# The gateway's chunk path compiled into src/unbroken/_compiled/ (the wheel carries it);
# --require: a build that cannot compile it fails rather than ship the sources silently.
RUN pip install --no-cache-dir ".[gateway,redis,cli,otel]" "mypy>=2.4" \
    && python tools/compile_native.py --require
# Wheels for unbroken and its dependencies, so the final image needs no compiler or cache.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gateway,redis,cli,otel]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/unbroken --create-home unbroken
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "unbroken[gateway,redis,cli,otel]" \
    && rm -rf /wheels
USER unbroken
WORKDIR /var/lib/unbroken
ENV PYTHONUNBUFFERED=1 \
    XDG_DATA_HOME=/var/lib/unbroken \
    UNBROKEN_GATEWAY_HOST=0.0.0.0 \
    UNBROKEN_GATEWAY_PORT=8788
EXPOSE 8788
# /healthz answers while the process serves; /readyz also checks the store and draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UNBROKEN_GATEWAY_PORT', '8788'), timeout=2)"]
# SIGTERM drains: in-flight answers get gateway.drain_timeout_s (30 s) to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["unbroken"]
CMD ["serve", "--log-format", "json"]
