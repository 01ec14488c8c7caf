"""HTTP inference service on Ray Serve (see docs/serving.md).

Modules: `settings` (typed application arguments), `app` (deployment, native routes, application
builder), `core` (model holder, pipeline stages, batching, model swap), `ingress` (FastAPI app and
the guard middleware: auth, limits, CORS, metrics, errors), `monailabel` (MONAI Label compatible
routes for 3D Slicer), `sessions` (cache of preprocessed volumes), `codecs` (NIfTI in, NIfTI/NRRD
out, limits), `metrics` (Prometheus metrics through `ray.serve.metrics`), `errors` (the JSON error
shape), `cli` (`spleen-deepedit serve`, `start_local` / `swap_checkpoint` / `stop_local`), `client`
(a small Python client).

Importing this package imports nothing heavy: Ray, FastAPI and torch load only with the submodules.
"""
