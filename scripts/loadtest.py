#!/usr/bin/env python
"""Bounded load test of a DeepEdit service on loopback: N requests at concurrency C.

    python scripts/loadtest.py --url http://127.0.0.1:8000 --image ct.nii.gz -n 64 -c 8
    python scripts/loadtest.py --url ... --image ct.nii.gz --mode session --clicks '{"spleen": [[30, 30, 15]]}'

Modes: `segment` (full upload per request, POST /v1/segment) or `session` (one upload, then clicks on
POST /v1/sessions/{id}/segment). Prints p50/p95/p99 latency, throughput and errors (by status), and
with --json the same as JSON. Refuses non-loopback targets and more than --max-requests requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ipaddress
import json
import os
import socket
import sys
import time
from collections import Counter
from urllib.parse import urlparse

HARD_MAX_REQUESTS = 10_000
HARD_MAX_CONCURRENCY = 64


def check_loopback(url: str) -> None:
    """Raise ValueError unless every address `url`'s host resolves to is a loopback address."""
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"{url!r} has no host")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{url!r} resolves to {sorted(addresses)}: this load test only targets loopback addresses")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def run(
    url: str,
    body: bytes,
    *,
    requests: int,
    concurrency: int,
    mode: str = "segment",
    clicks: dict | None = None,
    token: str | None = None,
    timeout_s: float = 120.0,
) -> dict:
    """Send `requests` requests with `concurrency` workers; returns the summary dict."""
    import httpx

    check_loopback(url)
    if not 1 <= requests <= HARD_MAX_REQUESTS or not 1 <= concurrency <= HARD_MAX_CONCURRENCY:
        raise ValueError(f"requests must be in 1..{HARD_MAX_REQUESTS} and concurrency in 1..{HARD_MAX_CONCURRENCY}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(
        base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency)
    )
    session_path = None
    if mode == "session":
        r = client.post("/v1/sessions", content=body)
        r.raise_for_status()
        session_path = f"/v1/sessions/{r.json()['session_id']}/segment"
    params = {"clicks": json.dumps(clicks)} if clicks and mode == "segment" else None

    def one(_: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            if session_path:
                r = client.post(session_path, json=clicks or {})
            else:
                r = client.post("/v1/segment", content=body, params=params)
            status = r.status_code
        except httpx.HTTPError as exc:
            status = f"error:{type(exc).__name__}"
        return status, time.perf_counter() - t0

    t_start = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t_start
    client.close()
    ok = [dt for status, dt in results if status == 200]
    statuses = Counter(str(status) for status, _ in results)
    summary = {
        "mode": mode,
        "requests": requests,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "ok": len(ok),
        "errors": requests - len(ok),
        "statuses": dict(statuses),
    }
    if ok:
        summary.update({f"p{q}_s": round(percentile(ok, q), 4) for q in (50, 95, 99)})
        summary["mean_s"] = round(sum(ok) / len(ok), 4)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (loopback only)")
    p.add_argument("--image", required=True, help=".nii/.nii.gz volume to send")
    p.add_argument("-n", "--requests", type=int, default=32, help=f"requests (at most {HARD_MAX_REQUESTS})")
    p.add_argument(
        "-c", "--concurrency", type=int, default=4, help=f"concurrent clients (at most {HARD_MAX_CONCURRENCY})"
    )
    p.add_argument("--mode", choices=("segment", "session"), default="segment")
    p.add_argument("--clicks", default=None, help='JSON clicks, e.g. {"spleen": [[i, j, k]]}')
    p.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    try:
        with open(args.image, "rb") as f:
            body = f.read()
        clicks = json.loads(args.clicks) if args.clicks else None
        token = os.environ.get(args.token_env) if args.token_env else None
        s = run(
            args.url,
            body,
            requests=args.requests,
            concurrency=args.concurrency,
            mode=args.mode,
            clicks=clicks,
            token=token,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        lat = (
            " ".join(f"p{q}={s[f'p{q}_s'] * 1000:.1f}ms" for q in (50, 95, 99)) if s["ok"] else "no successful requests"
        )
        print(
            f"{s['requests']} requests ({s['mode']}) at concurrency {s['concurrency']} in {s['wall_s']:.2f}s: "
            f"{lat}; throughput {s['throughput_rps']:.2f} req/s; errors {s['errors']} {s['statuses']}"
        )
    return 0 if s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
