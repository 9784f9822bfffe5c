#!/usr/bin/env bash
# Checks the chart's Grafana dashboard against Grafana's own schema: the `Dashboard` type of the
# @grafana/schema npm package (the types Grafana's frontend is built with), by compiling the JSON as
# a TypeScript object literal, so a field of the wrong type, a missing required one or an unknown
# one fails. tests/dashboards.rs checks the rest (the variables, the PromQL and the metric names).
# Both packages are pinned and installed from npm into target/dashboard-schema the first time.
#   scripts/check-dashboard.sh [dashboard.json]
set -euo pipefail
cd "$(dirname "$0")/.."

GRAFANA_SCHEMA_VERSION=13.2.3
TYPESCRIPT_VERSION=5.9.3
dashboard=${1:-charts/epic-export-operator/dashboards/epic-export.json}
dir=target/dashboard-schema

installed() { node -p "require('./$dir/node_modules/$1/package.json').version" 2>/dev/null || true; }
if [[ "$(installed @grafana/schema)" != "$GRAFANA_SCHEMA_VERSION" || "$(installed typescript)" != "$TYPESCRIPT_VERSION" ]]; then
  echo "installing @grafana/schema@$GRAFANA_SCHEMA_VERSION and typescript@$TYPESCRIPT_VERSION into $dir" >&2
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
    "@grafana/schema@$GRAFANA_SCHEMA_VERSION" "typescript@$TYPESCRIPT_VERSION" >&2
fi

# Compiles `file` (a dashboard's JSON) as a `Dashboard`; prints tsc's findings.
check() {
  local ts="$dir/check.ts"
  { echo "import type { Dashboard } from '@grafana/schema';"
    printf 'const dashboard: Dashboard = '
    cat "$1"
    echo ';'
    echo 'export default dashboard;'; } > "$ts"
  "$dir/node_modules/.bin/tsc" --noEmit --strict --moduleResolution bundler --module esnext \
    --target es2022 "$ts"
}

# The check itself must catch a mistake: a panel with a field Grafana does not know.
python3 - "$dashboard" "$dir/wrong.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
next(p for p in d["panels"] if p.get("type") != "row")["colour"] = "red"
json.dump(d, open(sys.argv[2], "w"))
EOF
if check "$dir/wrong.json" >/dev/null 2>&1; then
  echo "the dashboard check did not catch an unknown panel field" >&2; exit 1
fi

if ! check "$dashboard"; then
  echo "$dashboard does not match @grafana/schema's Dashboard type (the lines above are of $dir/check.ts: the dashboard after one line of header)" >&2
  exit 1
fi
echo "$dashboard matches @grafana/schema@$GRAFANA_SCHEMA_VERSION's Dashboard type"
