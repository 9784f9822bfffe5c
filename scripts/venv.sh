#!/usr/bin/env bash
# Makes (or reuses) the Python venv VENV with the pinned REQUIREMENTS and prints its python's path.
# The venv is remade when the requirements file changes (a copy is kept in VENV/requirements.txt).
#   python=$(scripts/venv.sh target/NAME-venv scripts/NAME-requirements.txt)
set -euo pipefail
venv=$1
requirements=$2
stamp="$venv/requirements.txt"
if [[ ! -x "$venv/bin/python" ]] || ! cmp -s "$requirements" "$stamp"; then
  echo "making $venv from $requirements" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
  cp "$requirements" "$stamp"
fi
echo "$PWD/$venv/bin/python"
