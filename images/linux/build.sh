#!/usr/bin/env bash
# images/linux/build.sh: build skiff's minimal Linux guest from Debian packages.
#
# Produces vmlinux (ELF, PVH entry), bzImage, the busybox initramfs as
# initramfs.cpio.gz and plain initramfs.cpio, a few-KiB initramfs-min.cpio
# (static /init that only prints a marker and powers off; see README.md), and
# config, in ${SKIFF_CACHE:-$HOME/.cache/skiff}/linux/<hash>/
# where <hash> covers every input. A second run with the same inputs only
# prints the directory. Progress goes to stderr; the last line on stdout is
# the output directory:   dir=$(images/linux/build.sh | tail -1)
#
# Environment: SKIFF_CACHE (cache root), SKIFF_JOBS (make -j, default 2),
# SKIFF_KEEP_BUILD=1 (keep the temporary build tree for debugging).
set -euo pipefail

# All progress to stderr; fd 3 is the real stdout for the final path.
exec 3>&1 1>&2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${SKIFF_CACHE:-$HOME/.cache/skiff}/linux
jobs=${SKIFF_JOBS:-2}
srcpkg=linux-source-6.1
tarball=/usr/src/$srcpkg.tar.xz
make_args=(ARCH=x86_64 KBUILD_BUILD_USER=skiff KBUILD_BUILD_HOST=skiff)

log() { printf 'images/linux: %s\n' "$*"; }
die() { printf 'images/linux: error: %s\n' "$*"; exit 1; }

# --- 1. Host packages (apt-get only when something is missing) -------------
pkgs=("$srcpkg" build-essential patch flex bison bc libelf-dev libssl-dev
      xz-utils lz4 gzip busybox-static)
missing=()
for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    [[ $status == ii* ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi
[[ -f $tarball ]] || die "$tarball missing although $srcpkg is installed"
busybox_files=$(dpkg -L busybox-static)
busybox=$(grep -E '/bin/busybox$' <<<"$busybox_files" || true)
busybox=${busybox%%$'\n'*}
[[ -x $busybox ]] || die "busybox binary from busybox-static not found"

# --- 2. Cache key -----------------------------------------------------------
patches=()
for f in "$here"/patches/*.patch; do [[ -e $f ]] && patches+=("$f"); done
inputs=("$here/build.sh" "$here/config.fragment" "$here/init" "$here/init-min.c"
        "${patches[@]}")
src_ver=$(dpkg-query -W -f='${Version}' "$srcpkg")
key_versions() {
    echo "$srcpkg $src_ver"
    echo "busybox-static $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "gcc $(gcc -dumpfullversion)"
}
key_text() {
    key_versions
    for f in "${inputs[@]}"; do
        echo "== ${f#"$here"/}"
        cat "$f"
    done
}
hash=$(key_text | sha256sum | cut -c1-16)
out=$cache/$hash
outputs=(vmlinux bzImage initramfs.cpio.gz initramfs.cpio initramfs-min.cpio config)

is_complete() {
    local f
    for f in "${outputs[@]}"; do [[ -s $1/$f ]] || return 1; done
}
if is_complete "$out"; then
    log "cached: $out"
    echo "$out" >&3
    exit 0
fi

# --- 3. Lock, clear leftovers of interrupted runs ----------------------------
mkdir -p "$cache/src"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "waiting for another build (lock $cache/.lock)"
    flock 9
fi
if is_complete "$out"; then          # built by whoever held the lock
    log "cached: $out"
    echo "$out" >&3
    exit 0
fi
rm -rf "$cache"/.build.* "$cache"/src/.tmp.*

start=$SECONDS

# --- 4. Patched kernel source, cached per (package version, patch set) -----
patch_hash=$( { echo "$src_ver"; for f in "${patches[@]}"; do cat "$f"; done; } \
    | sha256sum | cut -c1-12)
src=$cache/src/$srcpkg-$src_ver-$patch_hash
if [[ ! -f $src/Makefile ]]; then
    tmp=$(mktemp -d "$cache/src/.tmp.XXXXXX")
    log "unpacking $tarball ($src_ver)"
    tar -xf "$tarball" -C "$tmp"
    for f in "${patches[@]}"; do
        log "applying patches/${f##*/}"
        patch -d "$tmp/$srcpkg" -p1 --forward --batch --no-backup-if-mismatch <"$f" \
            || die "patch ${f##*/} does not apply to $srcpkg $src_ver"
    done
    rm -rf "$src"
    mv "$tmp/$srcpkg" "$src"
    rmdir "$tmp"
fi

# --- 5. Build tree (out-of-tree objects), removed unless SKIFF_KEEP_BUILD --
work=$(mktemp -d "$cache/.build.XXXXXX")
cleanup() {
    if [[ ${SKIFF_KEEP_BUILD:-0} == 1 ]]; then
        log "kept build tree: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
obj=$work/obj
mkdir -p "$obj" "$work/out"
kmake() { nice -n 10 make -C "$src" O="$obj" "${make_args[@]}" "$@"; }

# --- 6. Configure: tinyconfig + fragment, then check the fragment held -----
log "configuring (tinyconfig + config.fragment)"
kmake -s tinyconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$here/config.fragment" >/dev/null
kmake -s olddefconfig

lost=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF -- "$line" "$obj/.config" \
            || lost+=("$line (now: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$obj/.config" || echo unset))")
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        ! grep -qE "^${BASH_REMATCH[1]}=[ym]$" "$obj/.config" \
            || lost+=("$line (now: $(grep -E "^${BASH_REMATCH[1]}=" "$obj/.config"))")
    fi
done <"$here/config.fragment"
if ((${#lost[@]})); then
    printf 'images/linux: error: config.fragment option not honoured: %s\n' "${lost[@]}"
    die "${#lost[@]} option(s) from config.fragment did not survive olddefconfig (missing dependency?)"
fi

# --- 7. Kernel ----------------------------------------------------------------
log "building vmlinux and bzImage (make -j$jobs; takes a while)"
kmake -j"$jobs" vmlinux bzImage
notes=$(readelf -n "$obj/vmlinux")
[[ $notes == *Xen* ]] || die "vmlinux has no Xen/PVH ELF note; is CONFIG_PVH set?"

# --- 8. Initramfs: busybox-static + /init, written by the kernel's own tool --
[[ -x $obj/usr/gen_init_cpio ]] || kmake -s usr/gen_init_cpio
list=$work/initramfs.list
{
    echo "dir /dev 0755 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    for d in /bin /sbin /usr /usr/bin /usr/sbin /proc /sys /tmp /root; do
        echo "dir $d 0755 0 0"
    done
    echo "file /bin/busybox $busybox 0755 0 0"
    echo "file /init $here/init 0755 0 0"
    # One symlink per applet, where busybox itself would install it.
    "$busybox" --list-full | sort -u | while IFS= read -r applet; do
        [[ $applet == bin/busybox ]] && continue
        echo "slink /$applet /bin/busybox 0777 0 0"
    done
} >"$list"
"$obj/usr/gen_init_cpio" -t 0 "$list" >"$work/out/initramfs.cpio"
gzip -9 -n -c "$work/out/initramfs.cpio" >"$work/out/initramfs.cpio.gz"

# The minimal initramfs: /dev/console and a freestanding static /init.
gcc -static -nostdlib -ffreestanding -fno-stack-protector -fcf-protection=none \
    -fno-pie -no-pie -mgeneral-regs-only -Os -s -Wall -Wextra -Werror \
    -Wl,--build-id=none -o "$work/init-min" "$here/init-min.c"
printf '%s\n' "dir /dev 0755 0 0" "nod /dev/console 0600 0 0 c 5 1" \
    "file /init $work/init-min 0755 0 0" >"$work/initramfs-min.list"
"$obj/usr/gen_init_cpio" -t 0 "$work/initramfs-min.list" >"$work/out/initramfs-min.cpio"

# --- 9. Publish atomically -----------------------------------------------------
cp "$obj/vmlinux" "$work/out/vmlinux"
cp "$obj/arch/x86/boot/bzImage" "$work/out/bzImage"
cp "$obj/.config" "$work/out/config"
{
    echo "# inputs of this build (hash $hash)"
    key_versions
    for f in "${inputs[@]}"; do
        echo "$(sha256sum <"$f" | cut -c1-16)  ${f#"$here"/}"
    done
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s"
} >"$work/out/build-info"
is_complete "$work/out" || die "internal: some output is missing"
rm -rf "$out"
mv "$work/out" "$out"
log "done in $((SECONDS - start)) s: $out"
echo "$out" >&3
