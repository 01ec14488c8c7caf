"""Where checkpoints and datasets live: a local path or an `s3://bucket/prefix` URI.

Locations stay plain strings (a `Path` would collapse the `//` of `s3://`). S3 goes through boto3,
imported lazily so local runs never need it; credentials and endpoint come from the standard
environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`), so AWS, MinIO, SeaweedFS and Ceph all work without code changes. Ray Train
itself reads and writes `s3://` through pyarrow, which honours the same variables.

Every S3 call here uses short timeouts and a single retry: an unreachable endpoint or a missing
bucket is reported in seconds with a message that says what to set, never a hang.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from . import env
from .errors import StorageError as StorageError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
#: What a checkpoint or init-from location may be besides a plain local path.
SCHEMES = (S3_SCHEME, FILE_SCHEME)
#: Seconds allowed to open a connection to the S3 endpoint (and to read one answer in a check).
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def check_uri(uri: str | os.PathLike) -> str:
    """`uri` as a string if it is a plain path, `file://` or `s3://`; a StorageError naming it otherwise."""
    text = str(uri)
    if "://" in text and not text.startswith(SCHEMES):
        raise StorageError(f"{text!r}: only local paths, file:// and s3:// URIs are supported")
    return text


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI, keeping the scheme's `//` intact."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> (`bucket`, `some/key`); the key may be empty."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name: use s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def endpoint() -> str:
    """The S3 endpoint in use, for messages (AWS itself when `AWS_ENDPOINT_URL` is unset)."""
    return env.s3_endpoint() or "AWS S3 (default endpoint)"


def s3_client(timeout_s: float = CONNECT_TIMEOUT_S):
    """A boto3 S3 client from the `AWS_*` environment with short timeouts and one retry."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError("s3:// storage needs boto3: pip install 'spleen-deepedit[s3]'") from None
    cfg = Config(
        connect_timeout=timeout_s,
        read_timeout=READ_TIMEOUT_S,
        retries={"total_max_attempts": 2, "mode": "standard"},
        # Path-style addressing: MinIO, SeaweedFS and Ceph do not serve bucket-named host names.
        s3={"addressing_style": "path"},
    )
    # A fresh session each time: the default one caches the credentials it first resolved.
    return boto3.session.Session().client("s3", config=cfg)


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Translate botocore failures into StorageErrors that say what to fix."""
    from botocore import exceptions as bx

    try:
        yield
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError) as exc:
        raise StorageError(
            f"cannot reach the S3 endpoint {endpoint()} for {uri} ({type(exc).__name__}): "
            "check AWS_ENDPOINT_URL and that the server is running"
        ) from None
    except (bx.NoCredentialsError, bx.PartialCredentialsError):
        raise StorageError(f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
    except bx.ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and exc.operation_name == "HeadBucket"):
            bucket = split_s3(uri)[0]
            raise StorageError(
                f"bucket {bucket!r} does not exist at {endpoint()} (for {uri}): create it first"
            ) from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise StorageError(f"{uri} does not exist at {endpoint()}") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise StorageError(
                f"access to {uri} denied by {endpoint()} ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        raise StorageError(
            f"S3 request for {uri} failed at {endpoint()}: {code} {err.get('Message', '')}".strip()
        ) from None


def check_storage(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (seconds) if `uri` cannot hold a run: endpoint unreachable, bucket missing, no access.

    A local path is created if needed and must be writable.
    """
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        with _s3_errors(uri):
            s3_client(timeout_s).head_bucket(Bucket=bucket)
        return
    path = Path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create storage directory {uri!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"storage directory {uri!r} is not writable")


def list_objects(uri: str) -> dict[str, dict]:
    """Objects under an s3:// prefix: {relative key: {"size", "etag"}}."""
    bucket, prefix = split_s3(uri)
    prefix = f"{prefix}/" if prefix else ""
    out: dict[str, dict] = {}
    with _s3_errors(uri):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    out[rel] = {"size": int(obj["Size"]), "etag": str(obj.get("ETag", ""))}
    return out


def cache_root() -> Path:
    """Local cache for fetched objects and datasets (`SPLEEN_DEEPEDIT_CACHE`, else ~/.cache)."""
    return Path(env.cache_dir())


def _download(client, bucket: str, key: str, dest: Path) -> None:
    """Download to a temporary name next to `dest`, then rename: readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(uri: str | os.PathLike, dest: str | os.PathLike | None = None) -> str:
    """A local file for `uri`: the one rule for every reader of a checkpoint or init-from file.

    A plain path is returned as is; `file:///abs/path` gives `/abs/path` (the text after `file://`); an
    `s3://bucket/key` object is downloaded (atomically); any other scheme is refused (StorageError).
    Without `dest` the S3 copy goes to `<cache>/s3/<bucket>/<key>`: it keeps the object's key, so an
    error about the file (e.g. a checkpoint that fails its checksum) still says which object it is.
    """
    uri = check_uri(uri)
    if uri.startswith(FILE_SCHEME):
        return uri[len(FILE_SCHEME) :]
    if not is_s3(uri):
        return uri
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri} names a bucket, not an object")
    dest = Path(dest) if dest is not None else cache_root() / "s3" / bucket / key
    with _s3_errors(uri):
        _download(s3_client(), bucket, key, dest)
    return str(dest)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sync_dataset(uri: str, root: str | os.PathLike | None = None) -> str:
    """A local directory holding the dataset at `uri`.

    A local path is returned as is. An s3:// prefix is copied once per node into
    `<cache>/datasets/<bucket>/<prefix>`: workers on the same node take a file lock, and the copy is
    reused while its manifest (keys, sizes, ETags) matches the bucket listing.
    """
    uri = str(uri)
    if not is_s3(uri):
        return uri
    bucket, prefix = split_s3(uri)
    target = Path(root) if root is not None else cache_root() / "datasets" / bucket / (prefix or "_root")
    manifest_path = target / ".manifest.json"
    with _file_lock(target.with_name(target.name + ".lock")):
        listing = list_objects(uri)
        if not listing:
            raise StorageError(f"no objects under {uri}: upload the dataset (imagesTr/, labelsTr/, dataset.json) there")
        if manifest_path.is_file() and json.loads(manifest_path.read_text()) == listing:
            return str(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            client = s3_client()
            with _s3_errors(uri):
                for rel in sorted(listing):
                    _download(client, bucket, f"{prefix}/{rel}" if prefix else rel, staging / rel)
            (staging / ".manifest.json").write_text(json.dumps(listing, sort_keys=True))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return str(target)


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file to an s3:// object (a PUT: readers see the old object or the whole new one)."""
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri} names a bucket, not an object")
    with _s3_errors(uri):
        s3_client().upload_file(str(local), bucket, key)
