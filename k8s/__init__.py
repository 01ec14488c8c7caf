"""Kubernetes delivery of spleen-deepedit: KubeRay RayJob / RayService operations (`spleen-deepedit k8s`).

`rayjobs` submits and follows training RayJobs, `rayservices` promotes checkpoints on a RayService,
`cli` holds the command line. The official `kubernetes` client is imported lazily, so importing this
package (and `--help`) works without it. Helm charts are in `charts/`, prerequisites in `k8s/manifests/`.
"""
