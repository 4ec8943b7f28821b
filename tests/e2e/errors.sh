#!/usr/bin/env bash
# what a shell user sees for mistakes: one clear line and a non-zero exit
. "$(dirname "$0")/lib.sh"
head -c 8M /dev/urandom > "$T/vm.img"
mkdir "$T/mnt"
if out=$("$MFS" mount "$T/nope.img" "$T/t.img" "$T/mnt" 2>&1); then die "missing source accepted"; fi
[[ $out == *"does not exist"* ]] || die "unclear error: $out"
"$MFS" mount "$T/vm.img" "$T/t.img" "$T/mnt" --speed 1M
if echo complete > "$T/mnt/.mirror/ctl" 2> "$T/err"; then die "complete accepted while copying"; fi
grep -q "Device or resource busy" "$T/err" || die "complete before ready: $(cat "$T/err")"
if echo bogus > "$T/mnt/.mirror/ctl" 2> "$T/err"; then die "garbage accepted"; fi
grep -q "Invalid argument" "$T/err" || die "garbage: $(cat "$T/err")"
if out=$("$MFS" complete "$T/mnt" 2>&1); then die "mirrorfs complete accepted before ready"; fi
[[ $out == *"refused"* ]] || die "unclear CLI error: $out"
# a reader that stops early (grep -q, head) is no error, and no traceback
for _ in 1 2 3 4 5; do
	"$MFS" status "$T/mnt" 2> "$T/err" | head -c 1 > /dev/null || die "status | head failed"
	[ ! -s "$T/err" ] || die "status | head printed: $(cat "$T/err")"
done
"$MFS" speed "$T/mnt" 0
"$MFS" complete "$T/mnt"
cmp "$T/vm.img" "$T/t.img"
"$MFS" umount "$T/mnt"
