#!/usr/bin/env bash
# mkinitrd.sh TREE OUTPUT: builds the spotinit initrd from the image tree TREE (its busybox-static
# and its kernel modules) into the cpio archive OUTPUT. /init is image/initrd/init. The archive is
# not compressed: it is about 2.3 MB, and unpacking is faster than decompressing under emulation.
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 TREE OUTPUT" >&2; exit 2; }
tree=$(realpath "$1")
output=$(realpath "$2")
here=$(dirname "$(realpath "${BASH_SOURCE[0]}")")

kvers=("$tree"/usr/lib/modules/*)
[[ ${#kvers[@]} -eq 1 && -d ${kvers[0]} ]] || { echo "mkinitrd: expected one kernel in $tree/usr/lib/modules" >&2; exit 1; }
kver=${kvers[0]##*/}
[[ -x $tree/usr/bin/busybox ]] || { echo "mkinitrd: no busybox in $tree (package busybox-static)" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,newroot,lib/modules}
mknod -m 0600 "$stage/dev/console" c 5 1
cp "$tree/usr/bin/busybox" "$stage/bin/busybox"
for applet in sh mount umount insmod switch_root sleep poweroff grep tr; do
    ln -s busybox "$stage/bin/$applet"
done
install -m 0755 "$here/initrd/init" "$stage/init"

# erofs and exactly its dependencies (soft ones included), in load order. Debian's trixie kernel
# ships them xz-compressed (.ko.xz); busybox insmod wants plain .ko, so they are decompressed here.
modprobe --dirname="$tree" --set-version="$kver" --show-depends erofs |
    awk '$1 == "insmod" { print $2 }' >"$stage/modules.list"
[[ -s $stage/modules.list ]] || { echo "mkinitrd: erofs is not a module of $kver?" >&2; exit 1; }
while read -r path; do
    name=${path##*/}
    case $name in
    *.ko) cp "$path" "$stage/lib/modules/$name" ;;
    *.ko.xz) xz -dc "$path" >"$stage/lib/modules/${name%.xz}" ;;
    *.ko.zst) zstd -qdc "$path" >"$stage/lib/modules/${name%.zst}" ;;
    *.ko.gz) gzip -dc "$path" >"$stage/lib/modules/${name%.gz}" ;;
    *) echo "mkinitrd: unexpected module file $path" >&2; exit 1 ;;
    esac
    name=${name%.ko*}.ko
    echo "$name" >>"$stage/lib/modules/load.order"
done <"$stage/modules.list"
rm "$stage/modules.list"

(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$output"
