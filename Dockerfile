# syntax=docker/dockerfile:1.7
# GPU image of spleen-deepedit for KubeRay: the RayJob (training) and RayService (serving) charts run it
# on the head and every worker. Base: Ray's own image, pinned to the project's versions —
# Ray 2.60.0, Python 3.11, CUDA 12.8 — so the cluster and the package agree (rayVersion in the charts).
#
#   docker build -t ghcr.io/example/spleen-deepedit:0.1.0 .
#
# For a reproducible production build, pin the base by digest as well:
#   FROM rayproject/ray:2.60.0-py311-cu128@sha256:<digest shown by `docker buildx imagetools inspect`>

# ---- build: a wheel of the package only (no tests, charts or data reach the image)
FROM rayproject/ray:2.60.0-py311-cu128 AS build
WORKDIR /home/ray/src
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 trainer ./trainer
COPY --chown=1000:100 k8s ./k8s
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /home/ray/wheels .

# ---- runtime
FROM rayproject/ray:2.60.0-py311-cu128

LABEL org.opencontainers.image.title="spleen-deepedit" \
      org.opencontainers.image.description="DeepEdit spleen segmentation: Ray Train training and Ray Serve inference" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# Ray's image already runs as the non-root user `ray` (uid 1000, group users/100) and owns its Python
# environment, so the install needs no root. The wheel is bind-mounted: it never becomes a layer.
# `ray[...]==2.60.0` is restated so pip can never replace the base image's Ray; torch==2.13.0 (pinned in
# pyproject.toml) comes from PyPI as its CUDA build.
USER 1000:100
RUN --mount=type=bind,from=build,source=/home/ray/wheels,target=/tmp/wheels \
    pip install "$(ls /tmp/wheels/spleen_deepedit-*.whl)[all]" "ray[train,serve,default]==2.60.0" \
    && python -c "import sys, ray, torch, monai, trainer; assert ray.__version__ == '2.60.0', ray.__version__; assert sys.version_info[:2] == (3, 11); assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    && spleen-deepedit --help > /dev/null

WORKDIR /home/ray
USER 1000:100
