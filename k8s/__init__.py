"""Kubernetes delivery of spleen-deepedit: KubeRay RayJob / RayService operations (`spleen-deepedit k8s`).

`rayjobs` follows training RayJobs (status, progress, cancel, list), `logs` reads their driver log, `objects` applies and
deletes a release's objects (server-side apply, release labels), `retry` rides out transient API
errors, `pods` explains Pending pods, `dashboard` forwards a cluster's Ray dashboard, `rayservices`
promotes checkpoints on a RayService, `chart_readme` generates the chart READMEs' parameter tables,
`cli` holds the command line. The official `kubernetes` client is imported lazily, so importing this
package (and `--help`) works without it. The Helm charts are in `charts/` (shipped in the wheel as
`k8s/charts`), cluster prerequisites in `k8s/manifests/`.
"""
