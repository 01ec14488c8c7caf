# syntax=docker/dockerfile:1.7
# GPU image of spleen-deepedit for KubeRay: the RayJob (training) and RayService (serving) charts run it
# on the head and every worker. Base: Ray's own image, pinned to the project's versions —
# Ray 2.60.0, Python 3.11, CUDA 12.8 — so the cluster and the package agree (rayVersion in the charts).
#
#   docker build -t registry.example.com/ml/spleen-deepedit:0.1.0 .
#
# Layers: the dependencies (multi-GB: torch CUDA, MONAI, ...) are resolved from pyproject.toml alone and
# installed before the code, so a code change rebuilds only the small package layer.
# For a reproducible production build, pin the base by digest as well:
#   FROM rayproject/ray:2.60.0-py311-cu128@sha256:<digest shown by `docker buildx imagetools inspect`>

# ---- build: a wheel of the package only (no tests, data or docs reach the image)
FROM rayproject/ray:2.60.0-py311-cu128 AS build
WORKDIR /home/ray/src
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 trainer ./trainer
COPY --chown=1000:100 k8s ./k8s
COPY --chown=1000:100 charts ./charts
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

# The base image gives `ray` passwordless sudo: remove sudo altogether (the charts also forbid privilege
# escalation, but the image should not offer it).
USER 0
RUN apt-get purge -y --auto-remove sudo \
    && rm -rf /etc/sudoers /etc/sudoers.d /var/lib/apt/lists/* \
    && ! command -v sudo

# Ray's image runs as the non-root user `ray` (uid 1000, group users/100), which owns its Python.
USER 1000:100

# Dependency layer: the `runtime` extra (ray, s3, serve, bundle; no Helm SDK, Kubernetes client or
# matplotlib), constrained by the transitive versions Ray was built and tested with
# (~/requirements_compiled.txt in Ray's image), minus the packages we pin exactly ourselves (torch==2.13.0
# comes from PyPI as its CUDA build); a range of ours that the compiled versions miss fails the build. `ray[...]==2.60.0` is restated so pip can never replace the base's Ray.
COPY --chown=1000:100 pyproject.toml /tmp/deps/pyproject.toml
RUN python - <<'EOF'
import re, tomllib
project = tomllib.load(open("/tmp/deps/pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
def expand(names):
    for name in names:
        for req in extras[name]:
            inner = re.fullmatch(r"spleen-deepedit\[(.+)\]", req)
            yield from (expand(inner.group(1).split(",")) if inner else [req])
def name(req):
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")
reqs = [*project["dependencies"], *expand(["runtime"])]
ours = {name(r) for r in reqs if "==" in r}  # our exact pins win (torch: the CUDA wheel)
compiled = open("/home/ray/requirements_compiled.txt").read().splitlines()
constraints = [c for c in compiled if c.strip() and not c.lstrip().startswith("#") and name(c) not in ours]
open("/tmp/deps/requirements.txt", "w").write("\n".join(reqs) + "\n")
open("/tmp/deps/constraints.txt", "w").write("\n".join(constraints) + "\n")
EOF
RUN pip install -r /tmp/deps/requirements.txt -c /tmp/deps/constraints.txt "ray[train,serve,default]==2.60.0" \
    && python -c "import sys, ray, torch, monai; assert ray.__version__ == '2.60.0', ray.__version__; assert sys.version_info[:2] == (3, 11); assert torch.__version__.startswith('2.13.0'), torch.__version__; assert torch.version.cuda, 'torch is a CPU build: the image needs the CUDA wheel'" \
    && rm -rf /tmp/deps

# Code layer: the package only, its dependencies are already there. The wheel is bind-mounted: it never
# becomes a layer.
RUN --mount=type=bind,from=build,source=/home/ray/wheels,target=/tmp/wheels \
    pip install --no-deps "$(ls /tmp/wheels/spleen_deepedit-*.whl)" \
    && python -c "import trainer, trainer.serve.app" \
    && spleen-deepedit --help > /dev/null

WORKDIR /home/ray
USER 1000:100
