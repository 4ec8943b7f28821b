#!/usr/bin/env bash
# A real mirror of a sample image while a writer is busy: mount, watch the copy, complete
# (pivot onto the target), and show that source and target are identical.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
MFS=$PWD/.venv/bin/mirrorfs
D=$(mktemp -d /tmp/mirrorfs-demo.XXXX)
W=""
cleanup() {
	[ -n "$W" ] && kill "$W" 2> /dev/null || true
	mountpoint -q "$D/mnt" 2> /dev/null && fusermount3 -u -z "$D/mnt"
	rm -rf --one-file-system "$D"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a 256 MiB sample disk image with random data: $D/vm.img"
head -c 256M /dev/urandom > "$D/vm.img"
mkdir "$D/mnt"

say "mirrorfs mount $D/vm.img $D/new.img $D/mnt --speed 32M"
"$MFS" mount "$D/vm.img" "$D/new.img" "$D/mnt" --speed 32M
ls -l "$D/mnt"

say "a writer keeps writing to the live image during the bulk copy (dd, 5 s, random offsets)"
(
	end=$((SECONDS + 5))
	while [ $SECONDS -lt $end ]; do
		dd if=/dev/urandom of="$D/mnt/vm.img" bs=64K count=4 \
			seek=$((RANDOM % 4000)) conv=notrunc status=none
	done
) &
W=$!
for _ in 1 2 3; do sleep 1; "$MFS" status "$D/mnt"; echo; done

wait "$W"; W=""
say "the writer is done; mirrorfs wait $D/mnt ready"
"$MFS" wait "$D/mnt" ready
"$MFS" status "$D/mnt"

say "echo complete > $D/mnt/.mirror/ctl"
echo complete > "$D/mnt/.mirror/ctl"
"$MFS" wait "$D/mnt" done
"$MFS" status "$D/mnt"

say "events"
cat "$D/mnt/.mirror/events"

say "the image is now served from the target; unmount and compare"
"$MFS" umount "$D/mnt"
sha256sum "$D/vm.img" "$D/new.img"
if cmp "$D/vm.img" "$D/new.img"; then
	echo "source and target are identical: no write made during the copy was lost"
else
	echo "DIFFERENT" >&2
	exit 1
fi
