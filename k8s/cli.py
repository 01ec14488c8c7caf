"""`spleen-deepedit k8s ...`: run training and serving on a Kubernetes cluster with the KubeRay operator.

    spleen-deepedit k8s submit  --values my-train.yaml --release spleen-r1 -n ml [--follow]
    spleen-deepedit k8s submit  --manifest rendered.yaml -n ml          # e.g. `helm template` output
    spleen-deepedit k8s status  spleen-r1 -n ml                         # phase, attempt, epoch, val Dice, Pending pods + why
    spleen-deepedit k8s follow  spleen-r1 -n ml
    spleen-deepedit k8s logs    spleen-r1 -n ml [-f]
    spleen-deepedit k8s cancel  spleen-r1 -n ml [--delete]           # --delete: every object of the release
    spleen-deepedit k8s list    -n ml                               # RayJobs and RayServices, phase, release
    spleen-deepedit k8s dashboard spleen-r1 -n ml [--show-token]    # port-forward the Ray dashboard, with its token
    spleen-deepedit k8s promote deepedit -n ml --checkpoint s3://bucket/run/checkpoint_epoch_0042/checkpoint.pt --wait

Registered in `trainer/cli.py` with `add_parser(sub)`; only argparse is imported here, the
`kubernetes` client is loaded when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.config import PROFILES

EXIT_USER_ERROR = 2
#: The training chart shipped in the package (k8s/charts -> ../charts in a checkout, package data in the
#: wheel), so `submit -f values.yaml` works from any directory.
DEFAULT_TRAIN_CHART = str(Path(__file__).resolve().parent / "charts" / "spleen-deepedit-train")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `k8s` command (with its subcommands) to a parent `add_subparsers()` object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-n", "--namespace", default=None, help="namespace (default: the kubeconfig context's, else default)"
    )
    common.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)"
    )
    common.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")

    parser = subparsers.add_parser(
        "k8s", help="train and serve on Kubernetes (KubeRay): submit, status, follow, logs, cancel, promote"
    )
    sub = parser.add_subparsers(dest="k8s_command", required=True, metavar="K8S_COMMAND")

    _add_submit(sub, common)

    p = sub.add_parser(
        "status",
        parents=[common],
        help="phase, attempt, latest epoch and validation Dice of a RayJob (or a RayService)",
    )
    p.add_argument("name")
    p.add_argument("--kind", choices=("rayjob", "rayservice"), default="rayjob")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(k8s_func=_status)

    p = sub.add_parser(
        "follow", parents=[common], help="print status changes of a RayJob until it finishes (exit 1 if it failed)"
    )
    p.add_argument("name")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    p.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds (the job keeps running)"
    )
    p.set_defaults(k8s_func=_follow)

    p = sub.add_parser("logs", parents=[common], help="the training driver's log (rank 0's epoch lines included)")
    p.add_argument("name")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job finishes")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between log reads with --follow")
    p.set_defaults(k8s_func=_logs)

    p = sub.add_parser("cancel", parents=[common], help="stop a RayJob (suspend: cluster deleted, run kept in storage)")
    p.add_argument("name")
    p.add_argument(
        "--delete",
        action="store_true",
        help="delete the RayJob and every object of its release instead of suspending it",
    )
    p.set_defaults(k8s_func=_cancel)

    p = sub.add_parser("list", parents=[common], help="RayJobs and RayServices in the namespace: phase and release")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(k8s_func=_list)

    _add_dashboard(sub, common)
    _add_promote(sub, common)

    parser.set_defaults(func=run)
    return parser


def _add_submit(sub, common: argparse.ArgumentParser) -> None:
    """`k8s submit`: apply a training RayJob from the chart or rendered manifests."""
    p = sub.add_parser(
        "submit",
        parents=[common],
        help="apply a training RayJob (server-side apply) from the chart (values files) or rendered manifests",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-f", "--values", action="append", metavar="FILE", help="values file for the training chart (repeatable)"
    )
    source.add_argument("--manifest", metavar="FILE", help="rendered manifests (`helm template` output; - for stdin)")
    p.add_argument(
        "--chart",
        default=DEFAULT_TRAIN_CHART,
        help="chart directory for --values (default: the training chart shipped with this package)",
    )
    p.add_argument(
        "--release",
        default="spleen-deepedit",
        help="release name = RayJob name = Ray run name (a resubmission with the same name resumes)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="server-side dry run: the API server validates, nothing is created"
    )
    p.add_argument("--follow", action="store_true", help="follow the job after creating it")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls with --follow")
    p.set_defaults(k8s_func=_submit)


def _add_dashboard(sub, common: argparse.ArgumentParser) -> None:
    """`k8s dashboard`: port-forward a Ray dashboard."""
    p = sub.add_parser(
        "dashboard",
        parents=[common],
        help="port-forward the Ray dashboard of a RayJob/RayService (kubectl) and show its Ray token",
    )
    p.add_argument("name")
    p.add_argument("--kind", choices=("rayjob", "rayservice"), default="rayjob")
    p.add_argument("--port", type=int, default=8265, help="local port (default 8265)")
    p.add_argument("--show-token", action="store_true", help="print the Ray token (it is a cluster credential)")
    p.add_argument("--print-only", action="store_true", help="print the port-forward command instead of running it")
    p.set_defaults(k8s_func=_dashboard)


def _add_promote(sub, common: argparse.ArgumentParser) -> None:
    """`k8s promote`: serve another checkpoint on a RayService."""
    p = sub.add_parser("promote", parents=[common], help="serve another checkpoint on a RayService without downtime")
    p.add_argument("name", help="RayService name")
    p.add_argument(
        "--checkpoint", required=True, help="s3://bucket/run/checkpoint_epoch_NNNN/checkpoint.pt (or an absolute path)"
    )
    p.add_argument("--app", default=None, help="Serve application name (default: the one with the DeepEdit deployment)")
    p.add_argument("--profile", default=None, choices=sorted(PROFILES), help="override the checkpoint's profile")
    p.add_argument(
        "--wait", action="store_true", help="wait until the operator has applied it and the application is RUNNING"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls with --wait")
    p.set_defaults(k8s_func=_promote)


def run(args: argparse.Namespace) -> int:
    """Entry point of every `k8s` subcommand: connect, run, turn API errors into one-line messages."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from .rayjobs import K8sError, api_error, connect

    try:
        api, namespace = connect(args.kubeconfig, args.context, args.namespace)
        with api:
            try:
                return int(args.k8s_func(api, namespace, args) or 0)
            except HTTPError as exc:  # connection refused, DNS, TLS: after the client's retries
                raise K8sError(
                    f"cannot reach the Kubernetes API server at {api.configuration.host}: {exc}; "
                    "check --kubeconfig / --context and your network"
                ) from None
            except ApiException as exc:
                raise api_error(exc, f"k8s {args.k8s_command}") from None
    except K8sError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _submit(api, namespace: str, args: argparse.Namespace) -> int:
    from . import objects as release_objects
    from . import rayjobs

    if args.manifest:
        objects = rayjobs.load_manifests(args.manifest)
    else:
        if not Path(args.chart, "Chart.yaml").is_file():
            raise rayjobs.K8sError(f"--chart {args.chart}: no Chart.yaml there; pass the chart directory")
        objects = rayjobs.render_chart(args.chart, args.values, release=args.release, namespace=namespace)
    release_objects.check_kinds(objects)
    if not args.dry_run:
        for job in (o for o in objects if o["kind"] == "RayJob"):
            replaced = release_objects.replace_finished_rayjob(api, job, namespace)
            if replaced:
                print(
                    f"deleted the {replaced} RayJob {job['metadata']['name']} (its run stays in storage: the new one resumes it)"
                )
    applied = release_objects.apply_objects(api, objects, namespace, dry_run=args.dry_run)
    print(("validated (dry run): " if args.dry_run else "applied: ") + ", ".join(applied))
    jobs = [o["metadata"]["name"] for o in objects if o["kind"] == "RayJob"]
    if args.follow and jobs and not args.dry_run:
        return _follow_job(api, namespace, jobs[0], args.interval, None)
    if jobs and not args.dry_run:
        print(f"follow it with: spleen-deepedit k8s follow {jobs[0]} -n {namespace}")
    return 0


def _status(api, namespace: str, args: argparse.Namespace) -> int:
    if args.kind == "rayservice":
        from .rayservices import get_service_status

        service = get_service_status(api, args.name, namespace)
        print(json.dumps(service.as_dict()) if args.json else service.line())
        return 0
    from .rayjobs import get_status

    status = get_status(api, args.name, namespace, pods=True)
    print(json.dumps(status.as_dict()) if args.json else status.line())
    if not args.json and status.pending:
        print("pending pods:\n" + "\n".join(f"  {line}" for line in status.pending))
    return 0


def _follow_job(api, namespace: str, name: str, interval: float, timeout: float | None) -> int:
    from .rayjobs import follow

    final = follow(
        api, name, namespace, interval_s=interval, timeout_s=timeout, out=lambda line: print(line, flush=True)
    )
    return 0 if final.succeeded else 1


def _follow(api, namespace: str, args: argparse.Namespace) -> int:
    return _follow_job(api, namespace, args.name, args.interval, args.timeout)


def _logs(api, namespace: str, args: argparse.Namespace) -> int:
    from .logs import follow_logs, read_logs
    from .rayjobs import get_rayjob

    if args.follow:
        final = follow_logs(
            api,
            args.name,
            namespace,
            interval_s=args.interval,
            tail=args.tail,
            out=lambda text: print(text, end="", flush=True),
        )
        return 0 if final.succeeded else 1
    text = read_logs(api, get_rayjob(api, args.name, namespace))
    if args.tail is not None:
        text = "\n".join(text.splitlines()[-args.tail :])
    print(text or f"(no log yet for RayJob {namespace}/{args.name})")
    return 0


def _cancel(api, namespace: str, args: argparse.Namespace) -> int:
    from .rayjobs import cancel

    print(cancel(api, args.name, namespace, delete=args.delete))
    return 0


def _list(api, namespace: str, args: argparse.Namespace) -> int:
    from .rayjobs import list_jobs_and_services

    rows = list_jobs_and_services(api, namespace)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no RayJob or RayService in namespace {namespace}")
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(
                f"{r['kind']:<10}  {r['name']:<{width}}  {r['phase']:<14}  {r['detail']:<9}  release {r['release'] or '-'}"
            )
    return 0


def _dashboard(api, namespace: str, args: argparse.Namespace) -> int:
    from .dashboard import open_dashboard

    return open_dashboard(
        api,
        args.kind,
        args.name,
        namespace,
        local_port=args.port,
        kubeconfig=args.kubeconfig,
        context=args.context,
        show_token=args.show_token,
        run=not args.print_only,
    )


def _promote(api, namespace: str, args: argparse.Namespace) -> int:
    from .rayservices import promote

    result = promote(
        api,
        args.name,
        namespace,
        args.checkpoint,
        app=args.app,
        profile=args.profile,
        wait=args.wait,
        timeout_s=args.timeout,
        interval_s=args.interval,
    )
    print(f"RayService {namespace}/{args.name}: checkpoint {result['previous']} -> {result['checkpoint']}")
    if result["status"] is not None:
        print(result["status"].line())
    else:
        print(
            "the replicas reload it in place; check with: "
            f"spleen-deepedit k8s status {args.name} -n {namespace} --kind rayservice"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m k8s.cli ...`), same commands as `spleen-deepedit k8s ...`."""
    parser = argparse.ArgumentParser(prog="spleen-deepedit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
