#!/usr/bin/env bash
# Installs what mirrorfs needs on a Debian machine (as root) and builds .venv.
# Idempotent: quick when everything is there. Used by demo.sh, test.sh and bench.py.
#   SETUP_EXTRA="qemu-system-x86 ..." adds Debian packages (the VM test and benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."

# strace: tests/mounted/test_sync_open.py watches the daemon flush before it replies.
APT_PKGS=(fuse3 libfuse3-dev pkg-config fio qemu-utils python3-venv gcc patch util-linux e2fsprogs
	nbdkit gnutls-bin libnbd-bin strace
	${SETUP_EXTRA:-})
missing=()
for p in "${APT_PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "setup: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
		exit 1
	fi
	echo "setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: FUSE cannot work here" >&2; exit 1; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
	echo "setup: creating .venv"
	"$PY" -m venv .venv
fi
# pyfuse3 3.5.0 with the patch series in third_party/pyfuse3/ (its `series` file gives the
# order; each patch's header says what it does and why). Each patch adds its name to
# pyfuse3.MIRRORFS_PATCHES: pyfuse3 is rebuilt unless the installed one has exactly the
# series' names, so a patch added to the series or left out of it triggers a rebuild.
PYFUSE3_VERSION=3.5.0
PYFUSE3_PATCHES=third_party/pyfuse3
mapfile -t pyfuse3_series < <(grep -v -e '^#' -e '^[[:space:]]*$' "$PYFUSE3_PATCHES/series")
mapfile -t pyfuse3_markers < <(cd "$PYFUSE3_PATCHES" &&
	sed -n "s/^+MIRRORFS_PATCHES = .* + ('\([^']*\)',)\$/\1/p" "${pyfuse3_series[@]}")
if [ ${#pyfuse3_markers[@]} -ne ${#pyfuse3_series[@]} ]; then
	echo "setup: each patch in $PYFUSE3_PATCHES/series must add one name to MIRRORFS_PATCHES" >&2
	exit 1
fi
pyfuse3_patched() {
	.venv/bin/python -c 'import pyfuse3, sys
sys.exit(sorted(getattr(pyfuse3, "MIRRORFS_PATCHES", ())) != sorted(sys.argv[1:]))' \
		"${pyfuse3_markers[@]}" 2> /dev/null
}
if ! pyfuse3_patched; then
	echo "setup: building pyfuse3 $PYFUSE3_VERSION with mirrorfs's patches"
	.venv/bin/pip install -q --upgrade pip > /dev/null
	work=$(mktemp -d)
	.venv/bin/pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$work"
	tar xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
	for p in "${pyfuse3_series[@]}"; do
		patch -s -p1 -d "$work/pyfuse3-$PYFUSE3_VERSION" < "$PYFUSE3_PATCHES/$p" ||
			{ echo "setup: $PYFUSE3_PATCHES/$p does not apply" >&2; exit 1; }
	done
	rm -f "$work/pyfuse3-$PYFUSE3_VERSION/src/pyfuse3/__init__.c"  # regenerate with Cython
	.venv/bin/pip install -q "$work/pyfuse3-$PYFUSE3_VERSION"
	rm -rf "$work"
	pyfuse3_patched || { echo "setup: the patched pyfuse3 did not install" >&2; exit 1; }
fi
# Editable, as a path in a .pth file ("compat"): the default mode installs an import hook
# that every start of Python in the venv pays for (10 ms of each mirrorfs command).
stamp=.venv/.mirrorfs-installed-compat
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
	echo "setup: installing mirrorfs and its test tools into .venv"
	.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat 2> /dev/null ||
		.venv/bin/pip install -q -e '.[test]'  # a setuptools without that mode
	touch "$stamp"
fi
# Bytecode for the package, written even where PYTHONDONTWRITEBYTECODE is set: without it
# the daemon compiles every module from source at each mount (40 ms). Stale files are
# detected by their source's mtime, so an edit is never run from old bytecode.
.venv/bin/python -m compileall -q mirrorfs > /dev/null
