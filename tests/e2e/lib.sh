# shellcheck shell=bash
# Helpers for the shell end-to-end tests: what an operator's script would do.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MFS=${MIRRORFS:-$ROOT/.venv/bin/mirrorfs}
T=$(mktemp -d /tmp/mirrorfs-e2e.XXXX)
export MIRRORFS_STATE_DIR=$T/registry  # pivots recorded by these tests stay with them
NAME=$(basename "$0" .sh)
cleanup() {
	local rc=$?
	for m in "$T"/mnt*; do
		[ -d "$m" ] && mountpoint -q "$m" && fusermount3 -u -z "$m"
	done
	sleep 0.2
	rm -rf --one-file-system "$T"
	if [ $rc = 0 ]; then echo "PASS $NAME"; else echo "FAIL $NAME (exit $rc)"; fi
}
trap cleanup EXIT
die() { echo "$NAME: $*" >&2; exit 1; }
# random writes with dd at byte offsets for SECONDS
dd_writer() {
	local img=$1 secs=$2 size end len off
	size=$(stat -c %s "$img"); end=$((SECONDS + secs))
	while [ $SECONDS -lt $end ]; do
		len=$((4096 + RANDOM * 16)); off=$(((RANDOM << 15 | RANDOM) % (size - len)))
		dd if=/dev/urandom of="$img" bs=$len count=1 seek=$off oflag=seek_bytes conv=notrunc \
			status=none
	done
}
