#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: lint, unit tests, mounted tests,
# shell end-to-end tests, and the interface contract checks (../shared/contract).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

echo "=== ruff"
.venv/bin/ruff check mirrorfs tests
echo "=== pytest"
.venv/bin/python -m pytest -q -ra "$@"
if [ $# -gt 0 ]; then exit 0; fi  # a selection of tests was asked for: nothing more

echo "=== shell end-to-end tests"
for t in tests/e2e/*.sh; do
	[ "$(basename "$t")" = lib.sh ] || bash "$t"
done

if [ -x ../shared/contract/run.sh ]; then
	echo "=== interface contract (../shared/contract)"
	../shared/contract/run.sh
else
	echo "=== interface contract: ../shared/contract/run.sh not found, skipped"
fi
