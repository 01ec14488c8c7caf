#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), install the system services the integration tests start
# (Debian's prometheus; dicom3tools' dciodvfy checks DICOM output), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v prometheus >/dev/null 2>&1 && [ -x /usr/bin/apt-get ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
    || echo "warning: could not install prometheus; the Prometheus test will be skipped"
fi
if ! command -v dciodvfy >/dev/null 2>&1 && [ -x /usr/bin/apt-get ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dicom3tools) >/dev/null 2>&1 \
    || echo "warning: could not install dicom3tools; the dciodvfy checks of DICOM output will be skipped"
fi
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=2 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec .venv/bin/python -m pytest "$@"
