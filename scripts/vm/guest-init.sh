#!/bin/sh
# /init of the VM test's guest (built into the initramfs by build-guest.sh; busybox sh).
#
# The disk is /dev/vda, the image inside the mirrorfs mount. The host drives the test over
# /dev/ttyS1 (a socket on the host): the guest writes "MFS <word> ..." lines and waits for
# "go" lines. The kernel console (ttyS0) gets a copy of every line.
#
# Layout, from the kernel command line (MiB):
#   [0, mfs.fs)               an ext4 file system (mke2fs given that size)
#   [mfs.pa, +mfs.plen)       raw pattern A, written before the pivot
#   [mfs.pb, +mfs.plen)       raw pattern B, written after the pivot
#
# Protocol (guest -> host, host -> guest):
#   BOOTED <sectors>                    the disk is there
#   PHASE1                              pattern A, mkfs, files d1/*, synced: pivot now;
#                                       a writer keeps creating live/* files meanwhile
#   go                                  (host) the mirror has completed
#   LIVE <n>                            the writer stopped after n files
#   SUM <name> <sha256>                 one per file (path in the fs) and raw:A, raw:B,
#                                       read back after dropping the caches
#   WROTE <name> <sha256>               raw:A and raw:B as written
#   DONE                                umounted; the guest powers off
#   FAIL <why>                          anything went wrong; the guest powers off
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec < /dev/console > /dev/console 2>&1

exec 3<> /dev/ttyS1
stty -F /dev/ttyS1 raw -echo 115200 || echo "stty on ttyS1 failed"

say() {
	echo "MFS $*" >&3
	echo "MFS $*"
}
bye() {
	sync
	poweroff -f
	sleep 60
}
fail() {
	say "FAIL $*"
	bye
}
sum() { sha256sum | cut -d' ' -f1; }

for w in $(cat /proc/cmdline); do
	case $w in
	mfs.*=*)
		k=${w#mfs.}
		eval "MFS_${k%%=*}=\${w#*=}"
		;;
	esac
done
: "${MFS_fs:?}" "${MFS_pa:?}" "${MFS_pb:?}" "${MFS_plen:?}" "${MFS_nfiles:=12}"

for m in $(cat /lib/modules/modules.list); do
	insmod "/lib/modules/$m" && continue
	case $m in
	crc32c-intel.ko) ;; # needs SSE4.2, which the emulated CPU may lack: crc32c_generic does
	*) fail "insmod $m" ;;
	esac
done
i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	[ $i -gt 600 ] && fail "no /dev/vda"
	sleep 0.1
done
say BOOTED "$(cat /sys/block/vda/size)"

# A file of random data: rnd FILE 4K-BLOCKS
rnd() { dd if=/dev/urandom of="$1" bs=4k count="$2" 2> /dev/null || fail "dd $1"; }
# Pattern: pattern NAME OFFSET_MIB
pattern() {
	rnd "/tmp/$1" $((MFS_plen * 256))
	dd if="/tmp/$1" of=/dev/vda bs=1M seek="$2" conv=fsync 2> /dev/null || fail "dd raw:$1"
	say WROTE "raw:$1" "$(sum < "/tmp/$1")"
	rm "/tmp/$1"
}

# ---------------------------------------------------------------- phase 1: the bulk copy
pattern A "$MFS_pa"
/usr/sbin/mke2fs -t ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 \
	/dev/vda "${MFS_fs}M" || fail mke2fs
mount -t ext4 /dev/vda /mnt || fail "mount"
mkdir -p /mnt/d1/sub /mnt/live
i=0
while [ $i -lt "$MFS_nfiles" ]; do
	rnd "/mnt/d1/f$i" $((i * 37 % 97 + 1))
	i=$((i + 1))
done
rnd /mnt/d1/sub/big 1024
# some rewrites in place: the same blocks written twice while the copy runs
dd if=/dev/urandom of=/mnt/d1/sub/big bs=4k seek=100 count=50 conv=notrunc 2> /dev/null
sync
say PHASE1

# ---------------------------------------------------------------- the pivot, under writes
rm -f /tmp/stop
(
	n=0
	while [ ! -e /tmp/stop ]; do
		dd if=/dev/urandom of="/mnt/live/f$n" bs=4k count=$((n % 7 + 1)) conv=fsync \
			2> /dev/null || { echo "live write $n failed" > /tmp/stop-err; break; }
		n=$((n + 1))
	done
	echo "$n" > /tmp/live-count
) &
writer=$!
line=
while [ "$line" != go ]; do
	read -r line <&3 || fail "control channel closed"
	line=$(echo "$line" | tr -d '\r')
done
touch /tmp/stop
wait $writer
[ -e /tmp/stop-err ] && fail "$(cat /tmp/stop-err)"
say LIVE "$(cat /tmp/live-count)"

# ---------------------------------------------------------------- phase 2: on the target
mkdir -p /mnt/d2
i=0
while [ $i -lt "$MFS_nfiles" ]; do
	rnd "/mnt/d2/g$i" $((i * 53 % 89 + 1))
	i=$((i + 1))
done
rm /mnt/d1/f1 /mnt/d1/f2
dd if=/dev/urandom of=/mnt/d1/sub/big bs=4k seek=500 count=64 conv=notrunc 2> /dev/null
mv /mnt/d1/f3 /mnt/d2/moved
pattern B "$MFS_pb"
sync
echo 3 > /proc/sys/vm/drop_caches
# everything read back from the disk (now the target)
(cd /mnt && find . -type f ! -path './lost+found/*' | sort) > /tmp/files
while read -r f; do
	say SUM "${f#.}" "$(sum < "/mnt/$f")"
done < /tmp/files
umount /mnt || fail umount
echo 3 > /proc/sys/vm/drop_caches
say SUM raw:A "$(dd if=/dev/vda bs=1M skip="$MFS_pa" count="$MFS_plen" 2> /dev/null | sum)"
say SUM raw:B "$(dd if=/dev/vda bs=1M skip="$MFS_pb" count="$MFS_plen" 2> /dev/null | sum)"
say DONE
bye
