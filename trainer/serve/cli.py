"""`spleen-deepedit serve` and the `start_local` / `stop_local` helpers (README demo, tests, benchmarks).

`start_local` starts an embedded single-node Ray (unless one is already connected), Ray Serve on
`host:port`, deploys `build_app(ServeArgs(...))` and waits until `/readyz` answers 200.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from trainer import env

APP_NAME = "deepedit"


#: Applications this driver deployed, as `serveConfigV2` entries (a config deploy is declarative:
#: every apply lists all of them).
_APPS: dict[str, dict] = {}
_BASE: dict[str, str] = {}


def app_config(args, *, app_name: str = APP_NAME, route_prefix: str = "/", checkpoint: str | None = None) -> dict:
    """One `applications[]` entry of a Serve config / KubeRay `serveConfigV2` for `ServeArgs`.

    The checkpoint to serve goes in the deployment's `user_config` override: changing only that is a
    lightweight update (Serve calls `reconfigure` on the live replicas). Changing `args` changes the
    application's code version, and Serve replaces the replicas instead.
    """
    return {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": "trainer.serve.app:build_app",
        "args": args.model_dump(mode="json"),
        "deployments": [
            {"name": "DeepEdit", "user_config": {"checkpoint": checkpoint or args.checkpoint, "profile": args.profile}}
        ],
    }


def _apply() -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # The same call `serve deploy` and KubeRay make (through the dashboard's REST API) with a config file.
    _get_global_client().deploy_apps(ServeDeploySchema(applications=list(_APPS.values())))


def wait_ready(
    base: str,
    timeout_s: float = 180.0,
    expect_version_not: str | None = None,
    app_name: str | None = None,
    expect_checkpoint: str | None = None,
) -> dict:
    """Poll `base/readyz` until it answers 200 (and, optionally, a version other than the given one).

    Raises RuntimeError at once if Serve reports the application as failed (e.g. a bad checkpoint).
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(f"{base}/readyz", timeout=5)
            ready = r.json() if r.status_code == 200 else {}
            if ready and ready.get("model_version") != expect_version_not:
                return ready
            error = ready.get("last_reload_error")
            if expect_version_not is not None and error and error.get("checkpoint") == expect_checkpoint:
                raise RuntimeError(
                    f"the service kept {expect_version_not}: loading {error['checkpoint']} failed ({error['error']})"
                )
        except (httpx.HTTPError, ValueError):
            pass
        if app_name is not None:
            _raise_if_failed(app_name)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the DeepEdit service at {base} was not ready after {timeout_s:.0f}s")
        time.sleep(0.5)


def _raise_if_failed(app_name: str) -> None:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return
    failed = [f"{name}: {d.message}" for name, d in app.deployments.items() if str(d.status).endswith("UNHEALTHY")]
    if str(app.status).endswith("DEPLOY_FAILED") or failed:
        detail = (failed[0] if failed else app.message).strip().splitlines()
        # The last line of a replica's traceback is the error (e.g. CheckpointError: ... does not exist).
        raise RuntimeError(f"application {app_name!r} failed to deploy: {detail[-1] if detail else 'see the Ray logs'}")


def check_checkpoint_uri(uri: str) -> None:
    """Fail before starting Ray: a missing local file, or an unreachable S3 endpoint or bucket."""
    from trainer import storage
    from trainer.checkpoint import CheckpointError

    if storage.is_s3(uri):
        storage.check_storage(uri)  # seconds, with a message that says what to set
    elif not os.path.isfile(storage.fetch(uri)):  # local or file://: the path, nothing fetched
        raise CheckpointError(f"checkpoint {uri!r} does not exist: pass the path of a .pt file written by training")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def check_bind(host: str, args, insecure: bool) -> None:
    """Refuse a non-loopback bind without a bearer token unless the operator passed `insecure`.

    Also reads the token now (in the driver), so a missing or short token fails before Ray starts.

    Raises:
        ValueError: naming the host and the fix.
    """
    token = args.auth_token() if (args.auth_token_env or args.auth_token_file) else None
    if token is None and host not in LOOPBACK_HOSTS and not insecure:
        raise ValueError(
            f"refusing to serve on {host} without a bearer token: anyone who can reach it could use it. "
            "Pass --token-file FILE (or --token-env VAR) with a token of 32+ characters "
            "(`openssl rand -hex 32`), or --insecure to serve without one"
        )


def start_local(
    checkpoint: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    metrics_export_port: int | None = None,
    num_cpus: int | None = None,
    route_prefix: str = "/",
    app_name: str = APP_NAME,
    ready_timeout_s: float = 180.0,
    insecure: bool = False,
    **opts,
) -> str:
    """Serve `checkpoint` on a local Ray; returns the base URL once the model answers `/readyz`.

    The application is deployed from a config (`import_path` + typed `args`), exactly as a KubeRay
    RayService deploys its `serveConfigV2`. A second call adds another application to the same Serve.

    Args:
        checkpoint: local path or s3:// URI of the checkpoint.
        port, host: where Serve's HTTP proxy listens (keep the loopback default unless you mean it).
        metrics_export_port: fixed Prometheus export port of Ray's metrics agent (default: Ray picks).
        num_cpus: logical CPUs of the local Ray (default: the machine's).
        route_prefix, app_name: where the application is mounted.
        ready_timeout_s: give up (and raise TimeoutError) after this long.
        insecure: allow a non-loopback `host` without a bearer token (`check_bind`).
        **opts: further `ServeArgs` fields (device, max_batch_size, auth_token_env, ...).
    """
    env.quiet_ray()
    import ray
    from ray import serve

    from .settings import ServeArgs

    args = ServeArgs(checkpoint=checkpoint, **opts)  # validate before starting anything
    check_bind(host, args, insecure)
    if not ray.is_initialized():
        # address="local": always a fresh cluster, never one another process on this machine started.
        init: dict = {
            "address": "local",
            "include_dashboard": False,
            "num_cpus": num_cpus,
            "configure_logging": False,
            # Report metrics every second instead of every 10 s, so scrapes see them quickly.
            "_system_config": {"metrics_report_interval_ms": 1000},
        }
        if metrics_export_port is not None:
            init["_metrics_export_port"] = metrics_export_port
        ray.init(**init)
        _APPS.clear()
        serve.start(http_options={"host": host, "port": port})
        _BASE["root"] = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    _APPS[app_name] = app_config(args, app_name=app_name, route_prefix=route_prefix)
    _apply()
    base = _BASE["root"] + route_prefix.rstrip("/")
    wait_ready(base, ready_timeout_s, app_name=app_name)
    return base


def swap_checkpoint(checkpoint: str, *, app_name: str = APP_NAME, timeout_s: float = 120.0) -> dict:
    """Serve another checkpoint without downtime: a `user_config` update (`reconfigure` in place).

    Returns `/readyz` of the application once it reports the new version. Raises RuntimeError if
    the new checkpoint fails to load (the service keeps the old one).
    """
    import httpx

    entry = _APPS[app_name]
    base = _BASE["root"] + entry["route_prefix"].rstrip("/")
    old = httpx.get(f"{base}/readyz", timeout=10).json().get("model_version")
    entry["deployments"][0]["user_config"]["checkpoint"] = checkpoint
    _apply()
    return wait_ready(
        base,
        timeout_s,
        expect_version_not=old,
        app_name=app_name,
        expect_checkpoint=checkpoint.rstrip("/").rsplit("/", 1)[-1],
    )


def remove_app(app_name: str) -> None:
    """Delete one application deployed by `start_local` (the others keep running)."""
    if _APPS.pop(app_name, None) is not None:
        _apply()


def stop_local() -> None:
    """Shut down Serve and the local Ray started by `start_local` (safe to call twice)."""
    import ray
    from ray import serve

    _APPS.clear()
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    """`spleen-deepedit serve --checkpoint URI [--host H] [--port P] [--device D]`: serve until Ctrl-C."""
    checkpoint = args.checkpoint
    check_checkpoint_uri(checkpoint)
    opts = {"device": args.device} if getattr(args, "device", None) else {}
    if getattr(args, "click_radius", None) is not None:
        opts["click_radius"] = args.click_radius
    if getattr(args, "refine", None) is not None:
        opts["refine"] = args.refine
    if getattr(args, "token_file", None):
        opts["auth_token_file"] = os.path.abspath(args.token_file)
    if getattr(args, "token_env", None):
        opts["auth_token_env"] = args.token_env
    try:
        from .settings import ServeArgs

        check_bind(args.host, ServeArgs(checkpoint=checkpoint, **opts), getattr(args, "insecure", False))
    except ValueError as exc:
        import sys

        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = start_local(checkpoint, host=args.host, port=args.port, insecure=getattr(args, "insecure", False), **opts)
    print(f"serving {checkpoint} at {url} (native API /v1/..., MONAI Label API /info/); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stop_local()
    return 0
