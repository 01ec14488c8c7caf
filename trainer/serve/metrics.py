"""Every metric of the service, declared once, through `ray.serve.metrics`.

Ray exports them on its metrics port (`ray start --metrics-export-port`, 8080 on KubeRay) with a
`ray_` prefix and the `application`, `deployment` and `replica` labels added for us; counters gain a
`_total` suffix. Names carry units; `route` is reserved by Serve, so the route label is `endpoint`
(the route template, e.g. `/v1/sessions/{session_id}/segment`, which keeps cardinality bounded).

Scraped names: `ray_deepedit_requests_total{endpoint,method,status}`,
`ray_deepedit_request_latency_seconds_*{endpoint}`, `ray_deepedit_stage_latency_seconds_*{stage}`,
`ray_deepedit_batch_size_*`, `ray_deepedit_input_voxels_*`, `ray_deepedit_live_sessions`,
`ray_deepedit_session_cache_bytes`, `ray_deepedit_model_info{version,profile}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32]
VOXEL_BUCKETS = [32**3, 64**3, 128**3, 256**3, 512 * 512 * 128, 512 * 512 * 256, 512 * 512 * 512, 512 * 512 * 1024]
#: Stage names used in the stage histogram and the `Server-Timing` header.
STAGES = ("decode", "preprocess", "forward", "window", "postprocess", "encode")


@dataclass(slots=True)
class ServiceMetrics:
    requests: Any
    request_latency: Any
    stage_latency: Any
    batch_size: Any
    input_voxels: Any
    live_sessions: Any
    cache_bytes: Any
    model_info: Any
    _model_tags: dict[str, str] | None = None

    def set_model(self, version: str, profile: str) -> None:
        """`model_info` is 1 for the loaded version and 0 for the one it replaced."""
        if self._model_tags is not None:
            self.model_info.set(0, tags=self._model_tags)
        self._model_tags = {"version": version, "profile": profile}
        self.model_info.set(1, tags=self._model_tags)


def create_metrics() -> ServiceMetrics:
    """Create the metrics; call once per replica (in the deployment's `__init__`)."""
    from ray.serve import metrics

    return ServiceMetrics(
        requests=metrics.Counter(
            "deepedit_requests",
            description="HTTP requests by endpoint, method and status code",
            tag_keys=("endpoint", "method", "status"),
        ),
        request_latency=metrics.Histogram(
            "deepedit_request_latency_seconds",
            description="end-to-end request latency inside the replica",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("endpoint",),
        ),
        stage_latency=metrics.Histogram(
            "deepedit_stage_latency_seconds",
            description="latency of one stage: " + ", ".join(STAGES),
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("stage",),
        ),
        batch_size=metrics.Histogram(
            "deepedit_batch_size",
            description="volumes per batched forward pass",
            boundaries=BATCH_BUCKETS,
        ),
        input_voxels=metrics.Histogram(
            "deepedit_input_voxels",
            description="voxels per uploaded volume",
            boundaries=VOXEL_BUCKETS,
        ),
        live_sessions=metrics.Gauge("deepedit_live_sessions", description="interactive sessions held by the replica"),
        cache_bytes=metrics.Gauge("deepedit_session_cache_bytes", description="bytes of preprocessed volumes cached"),
        model_info=metrics.Gauge(
            "deepedit_model_info",
            description="1 for the loaded checkpoint version",
            tag_keys=("version", "profile"),
        ),
    )
