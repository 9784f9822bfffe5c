#!/usr/bin/env bash
# Installs the object-store emulators that tests/stores.rs (tests/support/stores.rs) starts, cached under
# target/, and prints the `export` lines that point the tests at them:
#   eval "$(scripts/stores.sh)"
# - S3 and GCS: moto in server mode (PyPI, pinned in scripts/store-test-requirements.txt) in the venv
#   target/store-venv. GCS runs object_store's GCS client, which speaks GCS's S3-compatible XML API, against
#   a moto server: the registry GCS emulators do not work with that client (gcp-storage-emulator's XML API
#   has PUT and GET only and sends no ETag; fake-gcs-server has no XML PUT nor XML multipart).
# - Azure Blob: Azurite (npm) in target/azurite; 3.35.0 is the newest release that runs on Node 20.
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

AZURITE_VERSION=3.35.0

python=$(scripts/venv.sh target/store-venv scripts/store-test-requirements.txt)

azurite_dir=target/azurite
installed=$(node -p "require('./$azurite_dir/node_modules/azurite/package.json').version" 2>/dev/null || true)
if [[ "$installed" != "$AZURITE_VERSION" ]]; then
  echo "installing azurite@$AZURITE_VERSION into $azurite_dir" >&2
  npm install --prefix "$azurite_dir" "azurite@$AZURITE_VERSION" --no-audit --no-fund --loglevel=error >&2
fi
azurite="$PWD/$azurite_dir/node_modules/.bin/azurite-blob"
[[ -x "$azurite" ]] || { echo "no $azurite after npm install" >&2; exit 1; }

printf 'export EPIC_EXPORT_TEST_STORE_PYTHON=%q\n' "$python"
printf 'export EPIC_EXPORT_TEST_AZURITE=%q\n' "$azurite"
