#!/usr/bin/env bash
# Builds the VM test's guest: a Debian kernel and a busybox initramfs whose /init is
# scripts/vm/guest-init.sh. Everything comes from Debian packages through apt:
#   qemu-system-x86  the emulator (installed here if missing, --no-install-recommends)
#   linux-image-amd64  the kernel: `apt-get download` + `dpkg-deb -x` into the cache, so the
#                    host's /boot and /lib/modules are untouched
#   busybox-static   the guest's userland
#   e2fsprogs        the host's mke2fs (and its shared libraries) is copied into the guest:
#                    busybox's mke2fs makes ext2 only; debugfs/e2fsck check the result
#   kmod             modprobe --show-depends orders the kernel modules
#   cpio, gzip       the initramfs (cpio newc, gzip)
#
# The cache (MIRRORFS_VM_CACHE, default /var/cache/mirrorfs-vm, outside the repository)
# keeps the kernel and the initramfs; a rerun only checks stamps. The initramfs is rebuilt
# when this script, guest-init.sh, the kernel or the copied programs change.
# MIRRORFS_VM_REFRESH=1 looks for a newer kernel package.
#
# Prints two lines on stdout, for the test: KERNEL=<path> and INITRD=<path>.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${MIRRORFS_VM_CACHE:-/var/cache/mirrorfs-vm}
log() { echo "build-guest: $*" >&2; }

# ---------------------------------------------------------------- host packages
APT_PKGS=(qemu-system-x86 busybox-static e2fsprogs kmod cpio gzip)
missing=()
for p in "${APT_PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
done
apt_updated=
apt_update() {
	[ -n "$apt_updated" ] && return
	apt-get update -qq >&2
	apt_updated=1
}
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		log "missing Debian packages: ${missing[*]} (run as root, or install them)"
		exit 1
	fi
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt_update
	apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

mkdir -p "$CACHE"
exec 9> "$CACHE/.lock"
flock 9  # one build at a time (parallel test runs)

# ---------------------------------------------------------------- the kernel
# $CACHE/kernel/current names the unpacked kernel package: $CACHE/kernel/<package>/ holds
# vmlinuz, release and the modules the guest needs (modules.list: load order).
MODS=(virtio_pci virtio_blk crc32c_generic ext4)
kdir=
if [ -z "${MIRRORFS_VM_REFRESH:-}" ] && [ -s "$CACHE/kernel/current" ]; then
	kdir="$CACHE/kernel/$(cat "$CACHE/kernel/current")"
	[ -s "$kdir/modules.list" ] && [ -s "$kdir/vmlinuz" ] || kdir=
fi
if [ -z "$kdir" ]; then
	kpkg_of() { apt-cache depends linux-image-amd64 2> /dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'; }
	kpkg=$(kpkg_of)
	if [ -z "$kpkg" ]; then
		apt_update
		kpkg=$(kpkg_of)
	fi
	[ -n "$kpkg" ] || { log "cannot resolve linux-image-amd64 (apt-get update?)"; exit 1; }
	kdir="$CACHE/kernel/$kpkg"
	if ! [ -s "$kdir/modules.list" ]; then
		log "fetching $kpkg"
		work=$(mktemp -d "$CACHE/.work.XXXXXX")
		trap 'rm -rf "$work"' EXIT
		# _apt must be able to write where apt-get download puts the file
		chmod 755 "$work"
		(cd "$work" && apt-get download -qq "$kpkg" > /dev/null 2>&1) || {
			apt_update
			(cd "$work" && apt-get download -qq "$kpkg" > /dev/null)
		}
		dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/root"
		kver=$(ls "$work/root/lib/modules")
		depmod -b "$work/root" "$kver"
		rm -rf "$kdir.new"
		mkdir -p "$kdir.new/modules"
		cp "$work/root/boot/vmlinuz-$kver" "$kdir.new/vmlinuz"
		echo "$kver" > "$kdir.new/release"
		modprobe -d "$work/root" -S "$kver" --show-depends -a "${MODS[@]}" |
			while read -r kind path _; do
				case $kind in
				insmod) ;;
				builtin) continue ;;
				*) log "unexpected modprobe output: $kind $path"; exit 1 ;;
				esac
				name=$(basename "$path")
				grep -qx "$name" "$kdir.new/modules.list" 2> /dev/null && continue
				case $name in
				*.ko) cp "$path" "$kdir.new/modules/$name" ;;
				*.ko.xz) xz -dc "$path" > "$kdir.new/modules/${name%.xz}"; name=${name%.xz} ;;
				*.ko.zst) zstd -qdc "$path" > "$kdir.new/modules/${name%.zst}"; name=${name%.zst} ;;
				*) log "unknown module format: $path"; exit 1 ;;
				esac
				echo "$name" >> "$kdir.new/modules.list"
			done
		[ -s "$kdir.new/modules.list" ] || { log "no modules found for ${MODS[*]}"; exit 1; }
		rm -rf "$kdir" "$work"
		trap - EXIT
		mv "$kdir.new" "$kdir"
	fi
	echo "$kpkg" > "$CACHE/kernel/current"
fi
kver=$(cat "$kdir/release")

# ---------------------------------------------------------------- the initramfs
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
BUSYBOX=/bin/busybox
stamp=$( {
	cat "$HERE/build-guest.sh" "$HERE/guest-init.sh" "$kdir/modules.list"
	echo "$kver"
	sha256sum "$BUSYBOX" "$MKE2FS"
	ldd "$MKE2FS" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }' | xargs sha256sum
} | sha256sum | cut -c1-16)
initrd="$CACHE/initramfs-$kver-$stamp.cpio.gz"
if ! [ -s "$initrd" ]; then
	log "building $(basename "$initrd")"
	work=$(mktemp -d "$CACHE/.work.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	r="$work/root"
	mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,lib/modules,root}
	cp "$BUSYBOX" "$r/bin/busybox"
	for applet in $("$BUSYBOX" --list); do
		case $applet in busybox | mke2fs | mkfs.ext2) continue ;; esac
		ln -s busybox "$r/bin/$applet"
	done
	# The host's mke2fs (ext4) with the libraries it links and the loader.
	cp "$MKE2FS" "$r/usr/sbin/mke2fs"
	for lib in $(ldd "$MKE2FS" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'); do
		mkdir -p "$r$(dirname "$lib")"
		cp -L "$lib" "$r$lib"
	done
	[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$r/etc/"
	cp "$kdir"/modules/*.ko "$r/lib/modules/"
	cp "$kdir/modules.list" "$r/lib/modules/"
	cp "$HERE/guest-init.sh" "$r/init"
	chmod 755 "$r/init"
	mknod -m 600 "$r/dev/console" c 5 1
	mknod -m 666 "$r/dev/null" c 1 3
	(cd "$r" && find . -print0 | LC_ALL=C sort -z |
		cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 > "$work/initrd"
	mv "$work/initrd" "$initrd"
	rm -rf "$work"
	trap - EXIT
	# older initramfs builds of this kernel are of no further use
	find "$CACHE" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -newer "$initrd" \
		! -name "$(basename "$initrd")" -delete
fi

echo "KERNEL=$kdir/vmlinuz"
echo "INITRD=$initrd"
