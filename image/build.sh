#!/usr/bin/env bash
# image/build.sh [--refresh]: builds the spotinit OS image into build/image/ (see image/README.md).
#
# It does not build Rust: run `cargo build --release` first, or point SPOTINIT_BIN at a binary.
#   1. package tree: mkosi (mkosi.conf, image/mkosi.*) into build/mkosi.output/tree, only when
#      those inputs changed (or with --refresh, which also drops mkosi's incremental cache so that
#      apt fetches current package versions). Otherwise nothing is run and nothing downloaded.
#      Then the version floor: image/check-versions.sh against image/minimum-versions.txt.
#   2. root: a copy of the tree plus spotinit, /sbin/init and the version stamp, packed into a
#      compressed read-only erofs (lz4hc).
#   3. initrd (image/mkinitrd.sh), kernel command line (image/cmdline), UKI (ukify),
#      ESP with systemd-boot, and the GPT disk (systemd-repart, image/repart.d).
# Environment: SPOTINIT_BIN, CARGO_TARGET_DIR, SPOTINIT_VERSION and SPOTINIT_GIT_COMMIT (override
# what is read from Cargo.toml and git), SOURCE_DATE_EPOCH (file times in the erofs).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Relative SPOTINIT_BIN and CARGO_TARGET_DIR are relative to the caller's directory, as for cargo.
if [[ -n ${SPOTINIT_BIN:-} ]]; then
    bin=$(realpath -m "$SPOTINIT_BIN")
elif [[ -n ${CARGO_TARGET_DIR:-} ]]; then
    bin=$(realpath -m "$CARGO_TARGET_DIR/release/spotinit")
else
    bin=$repo/target/release/spotinit
fi
cd "$repo"
tree=build/mkosi.output/tree
stamp=build/mkosi.output/inputs.sha256
work=build/work
out=build/image
ukify=(/usr/lib/systemd/ukify)
# ukify needs python3-pefile: use the system python even when another python3 comes first in PATH.
[[ -x /usr/bin/python3 ]] && ukify=(/usr/bin/python3 /usr/lib/systemd/ukify)

t0=$EPOCHREALTIME
log() { awk -v t="$EPOCHREALTIME" -v t0="$t0" -v m="$*" 'BEGIN { printf "build.sh [%6.1fs] %s\n", t - t0, m }' >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

refresh=0
case ${1:-} in
"") ;;
--refresh) refresh=1 ;;
-h | --help) sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
*) die "unknown argument $1 (usage: image/build.sh [--refresh])" ;;
esac

[[ $EUID -eq 0 ]] || die "run as root (mkosi, mknod and systemd-repart need it)"
[[ -f $bin && -x $bin ]] || die "no spotinit binary at $bin: run 'cargo build --release' first, or set SPOTINIT_BIN"
for tool in mkosi mkfs.erofs systemd-repart modprobe cpio dpkg "${ukify[-1]}" /usr/lib/systemd/boot/efi/systemd-bootx64.efi; do
    command -v "$tool" >/dev/null || [[ -e $tool ]] || die "missing $tool (see image/README.md, host packages)"
done

# --- 1. package tree -----------------------------------------------------------------------------
inputs_hash() {
    {
        mkosi --version
        cat mkosi.conf
        find image/mkosi.* -type f -printf '%m %p\n' | LC_ALL=C sort
        find image/mkosi.* -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}
hash=$(inputs_hash)
if ((refresh)) || [[ ! -d $tree || ! -f $tree.vmlinuz || $(cat "$stamp" 2>/dev/null) != "$hash" ]]; then
    rm -f "$stamp"
    force=(-f)
    ((refresh)) && force=(-ff)
    log "package tree: mkosi ${force[*]} build (log: build/mkosi.log)"
    mkosi "${force[@]}" build >build/mkosi.log 2>&1 || { tail -n 30 build/mkosi.log >&2; die "mkosi failed, see build/mkosi.log"; }
    echo "$hash" >"$stamp"
else
    log "package tree: mkosi inputs unchanged, reusing $tree (image/build.sh --refresh updates packages)"
fi
# The version floor (image/minimum-versions.txt), checked on the tree's package list (it becomes
# build/image/manifest.txt) before anything is built from it, so build/image/ never holds an image
# below the floor.
image/check-versions.sh image/minimum-versions.txt "$tree/usr/lib/spotinit/packages.txt" ||
    die "the image's packages are below the floor in image/minimum-versions.txt (see above); fix mkosi.conf or the apt sources, or run image/build.sh --refresh"
log "package tree: versions at or above image/minimum-versions.txt"

# --- 2. root file system -------------------------------------------------------------------------
log "root: staging $tree with $bin"
rm -rf "$work"
mkdir -p "$work" "$out"
cp -a --reflink=auto "$tree" "$work/root"
root=$work/root
install -m 0755 "$bin" "$root/usr/sbin/spotinit"
ln -s spotinit "$root/usr/sbin/init"
# A dynamically linked spotinit must find its libraries (and glibc symbol versions) in the image.
if [[ $(head -c4 "$bin" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then
    missing=$(chroot "$root" /usr/bin/ldd /usr/sbin/spotinit 2>&1 | grep 'not found' || true)
    [[ -z $missing ]] || die "spotinit needs what the image lacks (build it on Debian 12 or 13, or statically):"$'\n'"$missing"
fi

kvers=("$root"/usr/lib/modules/*)
kver=${kvers[0]##*/}
pkgver() {
    awk -F'\t' -v p="$1" '$1 == p { print $2; found = 1 } END { exit !found }' "$root/usr/lib/spotinit/packages.txt" ||
        die "package $1 missing from the image"
}
workspace_version() {
    awk '/^\[/ { section = $0 } section == "[workspace.package]" && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml
}
git_commit() {
    local commit
    commit=$(git rev-parse --short=12 HEAD 2>/dev/null) || { echo unknown; return; }
    [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && commit+=-dirty
    echo "$commit"
}
image_id=$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
cat >"$root/usr/lib/spotinit/version" <<EOF
spotinit_version=${SPOTINIT_VERSION:-$(workspace_version)}
git_commit=${SPOTINIT_GIT_COMMIT:-$(git_commit)}
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
kernel=$kver
docker=$(pkgver docker.io)
containerd=$(pkgver containerd)
runc=$(pkgver runc)
image_id=$image_id
EOF
printf 'IMAGE_ID=spotinit\nIMAGE_VERSION=%s\n' "$image_id" >>"$root/usr/lib/os-release"

log "root: mkfs.erofs -zlz4hc,6 -C65536 ($(du -sh --apparent-size "$root" | cut -f1) uncompressed)"
rm -f "$work/root.erofs"
mkfs.erofs --quiet -zlz4hc,6 -C65536 ${SOURCE_DATE_EPOCH:+-T "$SOURCE_DATE_EPOCH"} "$work/root.erofs" "$root"

# --- 3. boot: kernel, initrd, command line, UKI, ESP, disk ----------------------------------------
log "boot: initrd, UKI, ESP"
cp "$tree.vmlinuz" "$out/vmlinuz"
image/mkinitrd.sh "$root" "$out/initrd.img"
cmdline=$(grep -v '^#' image/cmdline | tr -s ' \n' '  ')
echo "${cmdline% }" >"$out/cmdline"
esp=$work/esp
mkdir -p "$esp/EFI/BOOT" "$esp/EFI/Linux" "$esp/loader"
cp /usr/lib/systemd/boot/efi/systemd-bootx64.efi "$esp/EFI/BOOT/BOOTX64.EFI"
printf 'timeout 0\neditor no\n' >"$esp/loader/loader.conf"
"${ukify[@]}" build --linux="$out/vmlinuz" --initrd="$out/initrd.img" --cmdline="@$out/cmdline" \
    --os-release="@$root/usr/lib/os-release" --uname="$kver" \
    --output="$esp/EFI/Linux/spotinit.efi" >"$work/ukify.log" 2>&1 ||
    { cat "$work/ukify.log" >&2; die "ukify failed"; }

log "disk: systemd-repart"
rm -f "$out/spotinit.raw"
systemd-repart --empty=create --size=auto --dry-run=no --offline=yes --json=off \
    --definitions=image/repart.d --root="$work" "$out/spotinit.raw" >"$work/repart.log" 2>&1 ||
    { cat "$work/repart.log" >&2; die "systemd-repart failed"; }

cp "$root/usr/lib/spotinit/packages.txt" "$out/manifest.txt"
cp "$root/usr/lib/spotinit/version" "$out/version"

log "done: $out/spotinit.raw ($(du -h --apparent-size "$out/spotinit.raw" | cut -f1), erofs $(du -h --apparent-size "$work/root.erofs" | cut -f1)), image_id=$image_id"
