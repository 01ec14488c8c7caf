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
# Outside oracles for the chart tests, each in its own folder under .tools/ (not project dependencies:
# checkov pins boto3/packaging versions that would downgrade ours; the readme generator is an npm tool).
mkdir -p .tools
if [ ! -x .tools/checkov/bin/checkov ]; then
  (python3.11 -m venv .tools/checkov && .tools/checkov/bin/pip install -q "checkov==3.3.30") >/dev/null 2>&1 \
    || echo "warning: could not install checkov; the Checkov test will be skipped"
fi
[ -x .tools/checkov/bin/checkov ] && export CHECKOV="$PWD/.tools/checkov/bin/checkov"
if [ ! -x .tools/npm/node_modules/.bin/readme-generator ] && command -v npm >/dev/null 2>&1; then
  npm install --silent --prefix .tools/npm "@bitnami/readme-generator-for-helm@2.7.2" >/dev/null 2>&1 \
    || echo "warning: could not install the chart readme generator; its test will be skipped"
fi
[ -x .tools/npm/node_modules/.bin/readme-generator ] && export README_GENERATOR="$PWD/.tools/npm/node_modules/.bin/readme-generator"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=2 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec .venv/bin/python -m pytest "$@"
