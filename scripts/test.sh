#!/usr/bin/env bash
# The project's test command (README.md): formatting, lints, the one-TLS-provider rule, the module
# layers, the chart and manifests, the Grafana dashboard's schema, the user guide's build and links, and
# every test.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== one rustls crypto provider (aws-lc-rs): ring must not be in the tree"
if cargo tree --locked -e normal -i ring 2>/dev/null | grep -q '^ring'; then
  echo "ring is in the dependency tree: two rustls providers panic at run time"; cargo tree -e normal -i ring; exit 1
fi

echo "== module layers: dependencies point one way, no module cycles"
python3 scripts/check_layers.py

echo "== chart and manifests"
scripts/check-manifests.sh

echo "== Grafana dashboard against @grafana/schema"
scripts/check-dashboard.sh

echo "== user guide (mdBook) and its links"
scripts/check-book.sh

echo "== SMTP test server venv (aiosmtpd, for tests/notify.rs)"
EPIC_EXPORT_TEST_PYTHON=$(scripts/venv.sh target/smtp-venv scripts/smtp-test-requirements.txt)
export EPIC_EXPORT_TEST_PYTHON

echo "== object-store test servers (moto, Azurite; for tests/stores.rs and tests/object_output.rs)"
store_env=$(scripts/stores.sh)
eval "$store_env"

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi
