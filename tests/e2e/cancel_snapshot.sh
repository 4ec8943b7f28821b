#!/usr/bin/env bash
# a consistent point-in-time copy: mirror until ready, build a backlog, `cancel` while a
# writer keeps writing through the drain; the target must be the disk as it was when the
# cancel ended: every write acknowledged before that is in it, none begun after it is; later
# writes go to the source only
. "$(dirname "$0")/lib.sh"
export LC_ALL=C # EPOCHREALTIME with a decimal point
MiB=$((1 << 20))
head -c 32M /dev/urandom > "$T/vm.img"
mkdir "$T/mnt"
CTL=$T/mnt/.mirror/ctl
"$MFS" mount "$T/vm.img" "$T/snap.img" "$T/mnt"
"$MFS" wait "$T/mnt" ready --timeout 60
dd_writer "$T/mnt/vm.img" 1
# a backlog in [4, 16) MiB that a slow copy drains for seconds after the cancel
"$MFS" speed "$T/mnt" 4M
dd if=/dev/urandom of="$T/mnt/vm.img" bs=1M count=12 seek=4 conv=notrunc status=none
# [24, 32) MiB as it is now (the source holds every acknowledged write)
dd if="$T/vm.img" of="$T/region.orig" bs=1M skip=24 count=8 status=none

# Block i of [24, 32) MiB gets "w<i>" repeated, one dd each; its log line says when the
# write began and when it had been acknowledged (dd had exited).
block_writer() {
	local i t0 b
	for ((i = 0; i < 2048; i++)); do
		[ -e "$T/stop" ] && return 0
		b="w$i"$'\n'
		while ((${#b} < 4096)); do b+=$b; done
		t0=$EPOCHREALTIME
		printf %s "${b:0:4096}" | dd of="$T/mnt/vm.img" bs=4096 seek=$((24 * 256 + i)) \
			iflag=fullblock conv=notrunc status=none || return 1
		echo "$i $t0 $EPOCHREALTIME" >> "$T/writes.log"
	done
}
block_writer & writer=$!
sleep 0.3 # writes before the cancel too
t_cmd=$EPOCHREALTIME
"$MFS" cancel "$T/mnt" --no-wait
# t_drain: just before the last read of ctl that still said cancelling (the cancel had not
# ended then, so what was acknowledged before is in the copy); t_end: once it said cancelled
t_drain=
while :; do
	t=$EPOCHREALTIME
	st=$(cat "$CTL")
	case $st in
	*'"state": "cancelled"'*) t_end=$EPOCHREALTIME; break ;;
	*'"state": "cancelling"'*) t_drain=$t ;;
	*) die "not cancelling: $st" ;;
	esac
	sleep 0.01
done
sleep 0.3 # writes after the cancel: the source only
touch "$T/stop"
wait $writer || die "the block writer failed"
[ -n "$t_drain" ] || die "the cancel never drained (no backlog?)"
grep -q '"target_consistent": true' <<< "$st" || die "not consistent: $st"
echo "later" | dd of="$T/mnt/vm.img" bs=1 seek=5 conv=notrunc status=none
"$MFS" status "$T/mnt" | grep -q "state:     cancelled" || die "status view wrong"
"$MFS" umount "$T/mnt"

# [0, 24) MiB: the target is the source as it was (but for the later write at byte 5)
cmp -s "$T/vm.img" "$T/snap.img" && die "the snapshot followed a later write"
cmp -i 100 -n $((24 * MiB - 100)) "$T/vm.img" "$T/snap.img"
# [24, 32) MiB, block by block
python3 - "$T" "$t_cmd" "$t_drain" "$t_end" <<'EOF' || die "the target is not the disk at the cancel's end"
import sys
T, t_cmd, t_drain, t_end = sys.argv[1], *map(float, sys.argv[2:])
MiB, B = 1 << 20, 4096
orig = open(f"{T}/region.orig", "rb").read()
src = open(f"{T}/vm.img", "rb").read()[24 * MiB:]
snap = open(f"{T}/snap.img", "rb").read()[24 * MiB:]
log = [line.split() for line in open(f"{T}/writes.log")]
written = {int(i): (float(t0), float(t1)) for i, t0, t1 in log}
n = {"before": 0, "drain": 0, "window": 0, "after": 0}
bad = []
for i in range(len(orig) // B):
    old, new = orig[i * B:(i + 1) * B], (f"w{i}\n" * B).encode()[:B]
    s, t = src[i * B:(i + 1) * B], snap[i * B:(i + 1) * B]
    if i not in written:
        if s != old or t != old:
            bad.append(f"block {i}: never written, changed")
        continue
    t0, t1 = written[i]
    if s != new:
        bad.append(f"block {i}: an acknowledged write is not in the source")
    if t1 < t_drain:  # acknowledged before the cancel ended: in the copy
        n["drain" if t0 > t_cmd else "before"] += 1
        ok = t == new
    elif t0 > t_end:  # begun after the cancel ended: not in the copy
        n["after"] += 1
        ok = t == old
    else:  # either (a block is written by one request)
        n["window"] += 1
        ok = t in (old, new)
    if not ok:
        bad.append(f"block {i} (written {t0:.6f}-{t1:.6f}; cancel sent {t_cmd:.6f}, "
                   f"draining at {t_drain:.6f}, ended by {t_end:.6f}): wrong in the target")
print(f"blocks written: {n}")
if bad:
    sys.exit("\n".join(bad[:10]))
if n["drain"] == 0 or n["after"] == 0:
    sys.exit(f"no write during the cancel's drain or after its end: {n}")
EOF
