#!/usr/bin/env bash
# Checks the Helm chart and the example manifests offline, without a cluster or a helm binary: lint,
# render with each charts/epic-export-operator/ci/*-values.yaml, strict schema validation of every
# rendered object and every example, the EpicExports against the CRD's schema and CEL rules, the
# chart's CRD and RBAC against crds/epicexport.yaml and examples/operator.yaml (scripts/check_manifests.py).
# Needs python3 (3.10+, with venv) and PyPI the first time; the venv is kept in target/manifest-venv and
# remade when scripts/manifest-requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

python=$(scripts/venv.sh target/manifest-venv scripts/manifest-requirements.txt)
exec "$python" scripts/check_manifests.py "$@"
