#!/usr/bin/env bash
# a consistent point-in-time copy: mirror until ready, `mirrorfs cancel`, cmp; later writes
# go to the source only
. "$(dirname "$0")/lib.sh"
head -c 32M /dev/urandom > "$T/vm.img"
mkdir "$T/mnt"
"$MFS" mount "$T/vm.img" "$T/snap.img" "$T/mnt"
"$MFS" wait "$T/mnt" ready --timeout 60
dd_writer "$T/mnt/vm.img" 1
"$MFS" cancel "$T/mnt"
"$MFS" status "$T/mnt" --json | grep -q '"target_consistent": true' || die "not consistent"
cmp "$T/vm.img" "$T/snap.img"
echo "later" | dd of="$T/mnt/vm.img" bs=1 seek=5 conv=notrunc status=none
"$MFS" status "$T/mnt" | grep -q "state:     cancelled" || die "status view wrong"
"$MFS" umount "$T/mnt"
cmp -s "$T/vm.img" "$T/snap.img" && die "the snapshot followed a later write"
cmp <(tail -c +100 "$T/vm.img") <(tail -c +100 "$T/snap.img")
