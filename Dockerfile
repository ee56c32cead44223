# Tally's image: `tally serve` on :8000, the store's files in the volume /var/lib/tally.
# Built from the uv lock (uv sync --frozen --no-dev: exactly the locked runtime dependencies,
# no test tools); run as the unprivileged user `tally`. docs/operations.md#deployable-topology
#   docker build -t tally:0.1.0 .
#   docker run -p 8000:8000 -v tally-data:/var/lib/tally tally:0.1.0

FROM python:3.11.11-slim-bookworm AS build
# the uv that made uv.lock (make install uses the same), from PyPI
RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/tally
WORKDIR /src
# the dependencies first (a layer that changes only with the lock); the workspace member
# clients/python must be there for uv to read the workspace (--no-dev leaves it out)
COPY pyproject.toml uv.lock README.md ./
COPY clients/python/ clients/python/
RUN uv sync --frozen --no-dev --no-install-project
COPY src/ src/
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11.11-slim-bookworm
RUN groupadd --system --gid 10001 tally \
    && useradd --system --uid 10001 --gid tally --home-dir /var/lib/tally \
       --no-create-home --shell /usr/sbin/nologin tally \
    && install -d -o tally -g tally -m 0700 /var/lib/tally
COPY --from=build /opt/tally /opt/tally
ENV PATH=/opt/tally/bin:$PATH PYTHONUNBUFFERED=1 TALLY_DATA_DIR=/var/lib/tally
USER tally:tally
WORKDIR /var/lib/tally
VOLUME ["/var/lib/tally"]
EXPOSE 8000
# liveness only (/healthz): readiness (/readyz, 503 under back-pressure) is the proxy's business
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["tally", "serve", "--host", "0.0.0.0", "--port", "8000"]
