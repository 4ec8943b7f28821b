#!/usr/bin/env bash
# mount, dd writes during the bulk copy, wait ready, echo complete > ctl, cmp source target
. "$(dirname "$0")/lib.sh"
head -c 48M /dev/urandom > "$T/vm.img"
mkdir "$T/mnt"
"$MFS" mount "$T/vm.img" "$T/new.img" "$T/mnt" --speed 16M
grep -q '"state": "copying"' "$T/mnt/.mirror/ctl" || die "not copying: $(cat "$T/mnt/.mirror/ctl")"
dd_writer "$T/mnt/vm.img" 2 & w1=$!
dd_writer "$T/mnt/vm.img" 2 & w2=$!
wait $w1 $w2
"$MFS" wait "$T/mnt" ready --timeout 60
echo complete > "$T/mnt/.mirror/ctl"
"$MFS" wait "$T/mnt" done --timeout 60
grep -q '"state": "completed"' "$T/mnt/.mirror/ctl" || die "not completed"
cmp "$T/vm.img" "$T/new.img"
echo "after the pivot" | dd of="$T/mnt/vm.img" bs=1 seek=1000 conv=notrunc status=none
"$MFS" umount "$T/mnt"
cmp -s "$T/vm.img" "$T/new.img" && die "a post-pivot write reached the source"
dd if="$T/new.img" bs=1 skip=1000 count=15 status=none | grep -q "after the pivot" \
	|| die "post-pivot write missing from the target"
