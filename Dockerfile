# syntax=docker/dockerfile:1
# The control-plane image: one image for web, gateway, worker, beat and the migrations Job; the
# Helm chart picks the process by command. No torch here: inference runs in the runtime image.
#
#   docker build -t sirocco/controlplane:0.1.0 .

# An exact tag (patch release and Debian release); bump both stages together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
# The runtime dependencies pinned in pyproject.toml (not the dev or runtime extras), as wheels
# only: the image needs no compiler, and a dependency without a wheel fails the build loudly.
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r requirements.txt

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_SETTINGS_MODULE=controlplane.settings.base \
    SIROCCO_VAR_DIR=/var/lib/sirocco \
    STATIC_ROOT=/app/staticfiles \
    WHITENOISE_USE_FINDERS=false
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it (the chart runs as 10001).
RUN groupadd --system --gid 10001 sirocco \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin sirocco \
 && install -d -o 10001 -g 10001 /var/lib/sirocco
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# .dockerignore lets in only what the processes need.
COPY . .
# Static files are collected once, here, and served by WhiteNoise from STATIC_ROOT; the source
# tree is compiled so that a read-only root filesystem costs nothing at start. SECRET_KEY is
# a throwaway for these two commands only: the settings refuse to load without one.
RUN SECRET_KEY=build-only SIROCCO_VAR_DIR=/tmp/build-var python manage.py collectstatic --noinput \
 && python -m compileall -q /app \
 && rm -rf /tmp/build-var
USER 10001:10001
EXPOSE 8000
CMD ["uvicorn", "controlplane.asgi:application", "--host", "0.0.0.0", "--port", "8000"]
