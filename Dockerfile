# One image for every role of gpt2-jobs: api (gunicorn), worker and flower (celery), migrate (alembic).
# The role is chosen by the container's command (see docker-compose.yml).
#
# torch comes from PyTorch's own index, chosen by build arguments. The default is the CPU build:
#   docker compose build
# For GPU workers build with a CUDA wheel index instead (the wheels bundle the CUDA runtime; the host needs an
# NVIDIA driver new enough for that CUDA version and the NVIDIA Container Toolkit), e.g.:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 docker compose build
# or: docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t gpt2-jobs .
# Pick the cuXXX variant that PyTorch publishes for TORCH_VERSION. The worker logs the device it sees at start.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Defaults for a bare `docker run` (SQLite, filesystem broker and artifacts under /data);
    # docker-compose.yml sets DATABASE_URL, BROKER_URL and ARTIFACT_DIR.
    GPT2JOBS_VAR_DIR=/data

WORKDIR /app

# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project (gpt2core, jobs, api, workers; alembic.ini and migrations/ stay in /app for `alembic upgrade head`).
COPY . /app
RUN pip install /app \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/artifacts \
    && chown -R app:app /data

# A named volume mounted on /data/artifacts starts out owned by app (Docker copies the image's ownership).
USER app
EXPOSE 8000 5555
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "api:create_app()"]
