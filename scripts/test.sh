#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: lint, type checks (mypy --strict), the
# unit, integration, mounted and VM tests, shell end-to-end tests, and the interface contract
# checks (../shared/contract).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

echo "=== ruff"
.venv/bin/ruff check mirrorfs tests
echo "=== mypy"
.venv/bin/mypy --strict mirrorfs
echo "=== pytest"
.venv/bin/python -m pytest -q -ra "$@"
if [ $# -gt 0 ]; then exit 0; fi  # a selection of tests was asked for: nothing more

echo "=== shell end-to-end tests"
for t in tests/e2e/*.sh; do
	[ "$(basename "$t")" = lib.sh ] || bash "$t"
done

# The contract lives beside the project (../shared). In CI (CI set, as CI services set it:
# CI=true) it must run: a missing contract fails the run rather than passing it unchecked.
contract=../shared/contract/run.sh
case ${CI:-} in "" | 0 | false | False | FALSE | no) in_ci=false ;; *) in_ci=true ;; esac
if [ -f "$contract" ]; then
	echo "=== interface contract (../shared/contract)"
	"$contract"
elif $in_ci; then
	echo "=== interface contract: $contract not found; CI=${CI} requires it: FAIL" >&2
	exit 1
else
	echo "=== interface contract: $contract not found: SKIPPED (not checked; in CI, with"
	echo "    CI=true, a missing contract fails the run)"
fi
