"""Every environment variable the trainer reads, in one place: what it means and its default.

Standard variables of other tools keep their names (torchrun's `LOCAL_RANK`, the AWS SDK's endpoint);
boto3 and Ray read their own (`AWS_ACCESS_KEY_ID`, `RAY_ADDRESS`, ...) themselves. The serve app's
bearer token comes from a variable the operator names (`ServeArgs.auth_token_env`), read there.
"""

from __future__ import annotations

import os

#: Local cache of fetched S3 objects and synced datasets (default `~/.cache/spleen-deepedit`).
CACHE_DIR = "SPLEEN_DEEPEDIT_CACHE"
#: Ray training run name when `--run-name` is not given (the train chart sets it).
RUN_NAME = "SPLEEN_DEEPEDIT_RUN_NAME"
#: This process's GPU on its node, set by torchrun (0 without it).
LOCAL_RANK = "LOCAL_RANK"
#: S3 endpoint for messages: the S3-specific variable first, as boto3 reads them.
S3_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def cache_dir() -> str:
    return os.environ.get(CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "spleen-deepedit")


def run_name() -> str | None:
    return os.environ.get(RUN_NAME) or None


def local_rank() -> int:
    return int(os.environ.get(LOCAL_RANK, "0"))


def s3_endpoint() -> str | None:
    return next((os.environ[name] for name in S3_ENDPOINTS if os.environ.get(name)), None)
