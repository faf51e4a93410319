#!/usr/bin/env bash
# image/bench.sh [--no-cold] [--boots N] [--no-uefi]: measures the image and prints the figures.
#   build, cold    image/build.sh after deleting mkosi's caches and output (downloads every package)
#   build, cached  image/build.sh again, inside an empty network namespace (`unshare --net`): the
#                  run that follows a change of the spotinit binary, and proof that it downloads
#                  nothing
#   build, mkosi   the same with the mkosi stamp removed, i.e. mkosi re-run from its incremental
#   rerun          cache (what a change under image/mkosi.* costs), also without network
#   sizes          spotinit.raw (apparent and allocated), erofs root, its uncompressed tree,
#                  spotinit.raw | zstd -$ZSTD_LEVEL (default 3), initrd, kernel, UKI
#   boot           direct kernel boot under QEMU TCG, N times (default 3): wall time from QEMU start
#                  to the initrd's line and to the first line of the init, and the guest uptime the
#                  initrd reports; then one UEFI boot (OVMF, systemd-boot, UKI)
# The init is ${SPOTINIT_BIN:-target/release/spotinit} if it exists, else image/placeholder-init.
# Run it niced if the machine is busy; every figure depends on the load.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${SPOTINIT_BIN:-} ]]; then
    bin=$(realpath -m "$SPOTINIT_BIN")
elif [[ -n ${CARGO_TARGET_DIR:-} ]]; then
    bin=$(realpath -m "$CARGO_TARGET_DIR/release/spotinit")
else
    bin=$repo/target/release/spotinit
fi
[[ -x $bin ]] || bin=$repo/image/placeholder-init
export SPOTINIT_BIN=$bin
cd "$repo"

cold=1 boots=3 uefi=1
while (($#)); do
    case $1 in
    --no-cold) cold=0 ;;
    --no-uefi) uefi=0 ;;
    --boots) boots=${2:?--boots needs a number}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "usage: $0 [--no-cold] [--boots N] [--no-uefi]" >&2; exit 2 ;;
    esac
    shift
done


# elapsed START [END]: seconds between two $EPOCHREALTIME values
elapsed() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
mib() { awk -v n="$1" 'BEGIN { printf "%.1f MiB", n / 1048576 }'; }
row() { printf '%-44s %s\n' "$1" "$2"; }

# build LABEL LOG [COMMAND PREFIX...]: runs image/build.sh, prints its duration
build() {
    local label=$1 log=$2 start
    shift 2
    start=$EPOCHREALTIME
    "$@" image/build.sh >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "bench.sh: build failed, see $log" >&2; exit 1; }
    row "$label" "$(elapsed "$start") s"
}

echo "spotinit image benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), init $bin"
if ((cold)); then
    rm -rf build/mkosi.cache build/mkosi.pkgcache build/mkosi.output
    build "build, cold (empty caches, downloads)" build/bench-cold.log
fi
build "build, cached (spotinit changed, no network)" build/bench-cached.log unshare --net
rm -f build/mkosi.output/inputs.sha256
build "build, mkosi rerun from cache (no network)" build/bench-mkosi.log unshare --net

raw=build/image/spotinit.raw
row "spotinit.raw" "$(mib "$(stat -c %s "$raw")") ($(mib "$(($(stat -c %b "$raw") * 512))") allocated)"
row "erofs root (lz4hc level 6, 64 KiB pclusters)" "$(mib "$(stat -c %s build/work/root.erofs)")"
row "root tree uncompressed" "$(mib "$(du -s --apparent-size -B1 build/work/root | cut -f1)")"
row "spotinit.raw | zstd -${ZSTD_LEVEL:-3}" "$(mib "$(zstd -q -T0 "-${ZSTD_LEVEL:-3}" -c "$raw" | wc -c)")"
row "initrd.img / vmlinuz / UKI" "$(mib "$(stat -c %s build/image/initrd.img)") / $(mib "$(stat -c %s build/image/vmlinuz)") / $(mib "$(stat -c %s build/work/esp/EFI/Linux/spotinit.efi)")"

# boot MODE: one boot; prints the wall times to the initrd line and to the init's first line, the
# uptime the initrd reports, and that first line. QEMU is stopped as soon as the init has spoken.
boot() {
    local mode=$1 start line t_initrd='' t_init='' up='' first='' pid
    start=$EPOCHREALTIME
    coproc QEMU { exec timeout 300 image/qemu-boot.sh "$mode" </dev/null 2>&1; }
    pid=$QEMU_PID
    while IFS= read -r -u "${QEMU[0]}" line; do
        line=${line%$'\r'}
        if [[ -z $t_initrd && $line == *"initrd: root "* ]]; then
            t_initrd=$(elapsed "$start")
            up=$(sed -n 's/.* mounted at \([0-9.]*\) s uptime.*/\1/p' <<<"$line")
        elif [[ -n $t_initrd && -n ${line//[[:space:]]/} && ! $line =~ ^\[\ *[0-9]+\.[0-9]{6}\] ]]; then
            t_init=$(elapsed "$start")
            first=$line
            break
        fi
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    row "boot $mode: QEMU start -> initrd line / init line" "${t_initrd:-?} s / ${t_init:-?} s (initrd at ${up:-?} s uptime)"
    if [[ -n $first ]]; then
        row "" "${first:0:100}"
    elif [[ -n $t_initrd ]]; then
        row "" "(no line from the init: it exited or stayed silent; see image/qemu-boot.sh $mode)"
    fi
}
for ((i = 0; i < boots; i++)); do boot direct; done
((uefi)) && boot uefi
exit 0
