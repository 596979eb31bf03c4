# syntax=docker/dockerfile:1
# tenantserve: build with `docker build -t tenantserve .`, run with
#   docker run -p 8000:8000 -e TENANTSERVE_ENV=production \
#     -e TENANTSERVE_JWT_SECRET=... -e TENANTSERVE_API_KEY_PEPPER=... tenantserve
# SQLite lives in /app/data (mount a volume there), or point TENANTSERVE_DATABASE_URL at PostgreSQL.

# --- build: wheels of the project and its dependencies, and the default model versions ---
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock requirements-train.lock ./
COPY service/ service/
COPY auth/ auth/
COPY tenants/ tenants/
# The locked versions only: the image runs on exactly what the tests ran on.
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.lock \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && cp requirements.lock /wheels/
# Trained here, with the [train] extra's locked scikit-learn and skl2onnx, and checked against
# ONNX Runtime: the runtime stage gets the ONNX registry and never installs them.
RUN pip install --no-cache-dir -r requirements-train.lock \
    && python -m service.serving.training /models

# --- runtime: the wheels installed, the model registry copied in, a non-root user ---
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TENANTSERVE_HOST=0.0.0.0 \
    TENANTSERVE_PORT=8000 \
    TENANTSERVE_MODEL_DIR=/app/models \
    TENANTSERVE_DATABASE_URL=sqlite:////app/data/tenantserve.db \
    TENANTSERVE_USAGE_JOURNAL_DIR=/app/data/usage-journal
RUN groupadd --system --gid 10001 tenantserve \
    && useradd --system --uid 10001 --gid tenantserve --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin tenantserve
WORKDIR /app
# The wheels are bind-mounted, not copied: they never become a layer of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels \
        -r /wheels/requirements.lock /wheels/tenantserve-*.whl
# Owned by root: the server reads its models and cannot change them.
COPY --from=build /models /app/models
# Every version loads here as in a worker (sha256, contract), or the build fails.
RUN python -c "import os, pathlib; \
from service.serving.registry import list_versions; \
from service.serving.runtime import load_model; \
registry = pathlib.Path(os.environ['TENANTSERVE_MODEL_DIR']); \
print([load_model(registry, m.version).version for m in list_versions(registry)])" \
    && mkdir /app/data \
    && chown tenantserve:tenantserve /app/data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TENANTSERVE_PORT', '8000') + '/health', timeout=4)"]
# Exec form: uvicorn is PID 1 and gets SIGTERM itself, so in-flight requests and queued usage
# records are drained (allow ~30 s: `docker stop --time 35`).
CMD ["tenantserve", "serve"]
