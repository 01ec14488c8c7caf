"""Every environment variable the project reads or sets, in one place: what it means and its default.

Standard variables of other tools keep their names (torchrun's `LOCAL_RANK`, the AWS SDK's endpoint,
Ray's `RAY_ADDRESS`, kubectl's `KUBECONFIG`) and are read here too; boto3 and Ray also read their own
(`AWS_ACCESS_KEY_ID`, ...) themselves. The serve app's bearer token comes from a variable the
operator names (`ServeArgs.auth_token_env`), read with `named`.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Local cache of fetched S3 objects and synced datasets (default `~/.cache/spleen-deepedit`).
CACHE_DIR = "SPLEEN_DEEPEDIT_CACHE"
#: Ray training run name when `--run-name` is not given (the train chart sets it).
RUN_NAME = "SPLEEN_DEEPEDIT_RUN_NAME"
#: This process's GPU on its node, set by torchrun (0 without it).
LOCAL_RANK = "LOCAL_RANK"
#: S3 endpoint for messages: the S3-specific variable first, as boto3 reads them.
S3_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: The Ray cluster to join (Ray reads it in `ray.init()`); unset: a local Ray is started.
RAY_ADDRESS = "RAY_ADDRESS"
#: Set to "0" unless the user chose: a local Ray started by this package sends no usage statistics.
RAY_USAGE_STATS = "RAY_USAGE_STATS_ENABLED"
#: Ray Train settings the launcher turns on unless the user set them: the dashboard's Train view needs
#: state tracking; the print patch duplicates every worker line.
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
#: cuBLAS's deterministic workspace, needed before its first call for deterministic GPU kernels.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
#: kubeconfig files (the first is used), as kubectl reads it; default `~/.kube/config`.
KUBECONFIG = "KUBECONFIG"
#: Set by Kubernetes in every pod: the k8s CLI then uses the pod's service account.
KUBERNETES_SERVICE_HOST = "KUBERNETES_SERVICE_HOST"
#: The chart README generator's command (default: `readme-generator` on PATH).
README_GENERATOR = "README_GENERATOR"


def cache_dir() -> str:
    return os.environ.get(CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "spleen-deepedit")


def run_name() -> str | None:
    return os.environ.get(RUN_NAME) or None


def local_rank() -> int:
    return int(os.environ.get(LOCAL_RANK, "0"))


def s3_endpoint() -> str | None:
    return next((os.environ[name] for name in S3_ENDPOINTS if os.environ.get(name)), None)


def ray_address() -> str | None:
    return os.environ.get(RAY_ADDRESS) or None


def quiet_ray() -> None:
    """No usage statistics from a Ray this process starts, unless the user set the variable."""
    os.environ.setdefault(RAY_USAGE_STATS, "0")


def ray_train_defaults() -> None:
    """`RAY_TRAIN_DEFAULTS` for this process and the Ray it starts, where the user set nothing."""
    for key, value in RAY_TRAIN_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cublas_deterministic() -> None:
    """cuBLAS's deterministic workspace setting, unless the user set one."""
    os.environ.setdefault(*CUBLAS_WORKSPACE)


def kubeconfig(flag: str | None = None) -> str:
    """The kubeconfig file: `--kubeconfig`, else the first of `$KUBECONFIG`, else `~/.kube/config`."""
    return flag or os.environ.get(KUBECONFIG, "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")


def in_kubernetes_pod() -> bool:
    return bool(os.environ.get(KUBERNETES_SERVICE_HOST))


def readme_generator() -> str | None:
    return os.environ.get(README_GENERATOR) or None


def named(name: str) -> str:
    """The value of a variable the user named in a setting (e.g. `ServeArgs.auth_token_env`); "" if unset."""
    return os.environ.get(name, "")
